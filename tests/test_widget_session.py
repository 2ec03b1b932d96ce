"""The Predict widget's session (``_widgets/_session.py``, no Qt): embeddings kept between Runs.

The in-memory key of the session is the engine's embedding signature (the one the disk cache is
keyed and checked by), so anything that changes the pixels the encoder sees (µm per pixel, spot
positions, weights, patch size, input size, precision, padding) gives other embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

napari_layers = pytest.importorskip("napari.layers")

from napari_comtip._widgets._layers import sample_from_layers  # noqa: E402
from napari_comtip._widgets._session import PredictSession  # noqa: E402

PANEL = ["ERBB2", "KRT19", "CD74", "COL1A1", "ACTB", "SCGB2A2"]


@pytest.fixture(scope="module")
def tiny_model():
    from napari_comtip.model import build_model, get_preset

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.text.use_name_embedding = False
    return build_model(cfg, PANEL).eval()


@pytest.fixture(scope="module")
def layers():
    """A plain RGB image layer (not opened by the plugin) and hand-drawn points on it."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)  # 640 x 640, textured
    image = napari_layers.Image(img, rgb=True, name="he")
    points = napari_layers.Points(np.array([[120.0, 140.0], [320.0, 300.0], [500.0, 210.0]]), size=40,
                                  name="spots")
    return image, points


def test_changing_um_per_pixel_gives_new_embeddings(tiny_model, layers):
    image, points = layers
    session = PredictSession()
    a, ran_a = session.embeddings(sample_from_layers(image, points, 0.5), tiny_model, device="cpu")
    b, ran_b = session.embeddings(sample_from_layers(image, points, 1.0), tiny_model, device="cpu")
    assert ran_a and ran_b and session.encoder_runs == 2
    assert np.abs(np.asarray(a.image) - np.asarray(b.image)).max() > 1e-4  # other patches, other embeddings
    assert b.signature["mpp"] == 1.0
    # back to the first value: served from memory, the encoder does not run again
    c, ran_c = session.embeddings(sample_from_layers(image, points, 0.5), tiny_model, device="cpu")
    assert not ran_c and c is a and session.encoder_runs == 2


def test_session_prediction_uses_embeddings_of_this_resolution(tiny_model, layers, tmp_path):
    """The session's embeddings pass the engine's full signature check in ``predict_sample``."""
    from napari_comtip.model import save_checkpoint

    image, _ = layers
    points = napari_layers.Points(np.array([[200.0, 200.0], [410.0, 330.0]]), size=40, name="other spots")
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, tiny_model, extras={"provenance": {"note": "untrained, for tests"}})
    session = PredictSession()
    p1 = session.predict(sample_from_layers(image, points, 0.5), path, mode="zero-shot", device="cpu")
    p2 = session.predict(sample_from_layers(image, points, 2.0), path, mode="zero-shot", device="cpu")
    assert p1.encoder_ran and p2.encoder_ran
    assert not np.allclose(np.asarray(p1.adata.X), np.asarray(p2.adata.X))
