"""The probe's colour statistics (vision.colour_features): model/colour.py beside the ViT features."""

import numpy as np
import torch

from napari_comtip.model.factory import build_model
from napari_comtip.model.presets import get_preset

GENES = [f"G{i}" for i in range(6)]


def test_colour_statistics_follow_the_vit_features_and_the_floor():
    """vision.colour_features: the probe's features = ViT features, then the floor's 70 statistics
    of the model's own (un-normalised) input patch; the embedding and the ViT part are unchanged."""
    from napari_comtip.engine.baselines import colour_texture_features

    cfg = get_preset("micro")
    cfg.w_mfm = 0.0
    plain = build_model(cfg, GENES, name_embeddings=torch.randn(6, 8)).eval()
    cfg.vision.colour_features = True
    torch.manual_seed(0)
    withc = build_model(cfg, GENES, name_embeddings=torch.randn(6, 8)).eval()
    withc.load_state_dict(plain.state_dict())
    s = cfg.vision.img_size
    patches = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, s, s, 3), dtype=np.uint8))
    with torch.no_grad():
        x = plain.preprocess(patches)
        f0, f1 = plain.probe_features(x), withc.probe_features(x)
        e0, fe0 = plain.encode_image_and_features(x)
        e1, fe1 = withc.encode_image_and_features(x)
    assert f0.shape[1] == plain.feature_dim and f1.shape[1] == plain.feature_dim + 70
    torch.testing.assert_close(f1[:, :plain.feature_dim], f0)
    torch.testing.assert_close(e1, e0)
    torch.testing.assert_close(fe1, f1)
    np.testing.assert_allclose(f1[:, plain.feature_dim:].numpy(), colour_texture_features(patches.numpy()), atol=2e-3)
    assert plain.probe_feature_spec != withc.probe_feature_spec
