"""What the probe reads (vision.probe_input): the features, the features and the image embedding, or
the embedding alone; a reading, so it can be switched on a trained checkpoint and its probe re-fitted."""

import numpy as np
import pytest
import torch

from napari_comtip.errors import ConfigError
from napari_comtip.model.config import PROBE_INPUTS, READING_KEYS
from napari_comtip.model.presets import get_preset

GENES = [f"G{i}" for i in range(6)]


def _model(probe_input: str, colour: bool = True):
    from _model_common import micro_reading_model

    return micro_reading_model(GENES, colour_features=colour, probe_input=probe_input)


def _patches(n=5, seed=0):
    side = get_preset("micro").vision.img_size
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))


def test_each_probe_input_reads_what_it_names():
    """The embedding is the same for every choice; the probe's input is the features, the features
    followed by the embedding, or the embedding; the one-pass and separate paths agree."""
    models = {w: _model(w) for w in PROBE_INPUTS}
    base = models["features"]
    for m in models.values():
        m.load_state_dict(base.state_dict())
    p = _patches()
    with torch.no_grad():
        e0, f0 = base.encode_image_and_features(base.preprocess(p))
        for w, m in models.items():
            e, f = m.encode_image_and_features(m.preprocess(p))
            torch.testing.assert_close(e, e0)
            want = {"features": f0, "features+embedding": torch.cat([f0, e0], 1), "embedding": e0}[w]
            torch.testing.assert_close(f.float(), want.float())
            torch.testing.assert_close(m.probe_features(m.preprocess(p)).float(), want.float())
    specs = {m.probe_feature_spec for m in models.values()}
    assert len(specs) == len(PROBE_INPUTS)  # separate embedding-cache entries


def test_probe_input_is_a_reading_and_a_bad_one_is_refused():
    assert "vision.probe_input" in READING_KEYS
    cfg = get_preset("micro")
    cfg.vision.probe_input = "pixels"
    with pytest.raises(ConfigError, match="vision.probe_input must be one of features, features\\+embedding, embedding"):
        cfg.validate()


def test_refit_switches_a_trained_checkpoint_to_the_embedding(tmp_path):
    """A trained checkpoint switched to probe_input=embedding (scripts/derive_fold_arm.py, refit
    --set) stores a probe over the embedding's columns, and the user's probe path predicts with it."""
    from _model_common import train_on_demo

    from napari_comtip.engine.bank_probe import refit_probe
    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    train_on_demo(tmp_path, {"mode": "names+values"})
    path = tmp_path / "run" / "model.pt"
    sample = load_sample("@demo")
    before = predict_sample(sample, checkpoint=str(path), mode="probe", device="cpu")
    n_features = load_checkpoint(path).probe.mean.shape[0]
    from napari_comtip.model.checkpoint import update_checkpoint

    blob = path.read_bytes()
    with pytest.raises(ConfigError, match="vision.probe_input must be one of"):
        update_checkpoint(path, reading={"vision.probe_input": "pixels"})
    assert path.read_bytes() == blob  # nothing written on a refusal
    refit_probe(path, [sample], device="cpu", reading={"vision.probe_input": "embedding"})
    ck = load_checkpoint(path)
    assert ck.model.config.vision.probe_input == "embedding"
    assert ck.probe.mean.shape[0] % ck.model.config.embed_dim == 0  # the embedding in each context ring
    assert ck.probe.mean.shape[0] != n_features
    after = predict_sample(sample, checkpoint=str(path), mode="probe", device="cpu")
    assert after.shape == before.shape and np.isfinite(np.asarray(after.X)).all()
    assert not np.allclose(np.asarray(after.X), np.asarray(before.X))
