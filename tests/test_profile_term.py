"""The profile term (model.w_profile): the spot's whole expression vector as a second text view."""

import numpy as np
import pytest
import torch

from napari_comtip.engine import run_config as RC
from napari_comtip.engine import training as T
from napari_comtip.errors import ConfigError
from napari_comtip.model.factory import build_model
from napari_comtip.model.presets import get_preset

GENES = [f"G{i}" for i in range(6)]


def _model(w_profile=1.0):
    cfg = get_preset("micro")
    cfg.w_profile = w_profile
    cfg.w_mfm = 0.0
    return build_model(cfg, GENES, name_embeddings=torch.randn(6, 8))


def _batch(m, b=8):
    g = torch.Generator().manual_seed(0)
    s = m.config.vision.img_size
    imgs = torch.randn(b, 3, s, s, generator=g)
    expr = torch.rand(b, len(GENES), generator=g) * 3 * (torch.rand(b, len(GENES), generator=g) > 0.3)
    gi, vals, mask = m.sample_text(expr, g)
    return imgs, gi, vals, mask, expr


def test_off_by_default_and_no_head():
    m = _model(0.0)
    assert m.profile_head is None
    imgs, gi, vals, mask, expr = _batch(m)
    out = m(imgs, gi, vals, mask, profile=expr)
    assert float(out["profile"]) == 0.0
    assert torch.allclose(out["loss"], out["infonce"] + m.config.w_paat * out["paat"])


def test_the_term_is_in_the_loss_and_trains_the_image_side():
    torch.manual_seed(0)
    m = _model(2.0).train()
    imgs, gi, vals, mask, expr = _batch(m)
    out = m(imgs, gi, vals, mask, profile=expr)
    assert float(out["profile"].detach()) > 0
    assert torch.allclose(out["loss"], out["infonce"] + m.config.w_paat * out["paat"] + 2.0 * out["profile"])
    # its gradient alone reaches the ViT and the head
    m.zero_grad()
    out["profile"].backward()
    assert m.profile_head.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.vision.parameters())
    # without the profile the term is 0 (e.g. a batch of another kind)
    assert float(m(imgs, gi, vals, mask)["profile"]) == 0.0


def test_the_head_reads_values_and_detection():
    torch.manual_seed(0)
    head = _model().profile_head.eval()
    x = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 3.0]])
    e = head(x)
    assert e.shape == (1, get_preset("micro").embed_dim)
    assert torch.allclose(e.norm(dim=-1), torch.ones(1))
    assert not torch.allclose(head(x * 2), e)


def test_only_names_plus_values_and_never_negative():
    cfg = get_preset("micro")
    cfg.text.mode, cfg.w_profile = "values", 1.0
    cfg.text.value_transform = "lognorm"
    with pytest.raises(ConfigError, match="w_profile"):
        cfg.validate()
    cfg = get_preset("micro")
    cfg.w_profile = -1.0
    with pytest.raises(ConfigError, match="w_profile"):
        cfg.validate()


def test_a_run_with_the_term_trains_and_the_checkpoint_predicts(tmp_path):
    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.run_config import DataConfig

    s = load_sample("@demo")
    ts = build_training_set([s], DataConfig(n_hvg=30, n_mean=10, unlabelled=False), patch_um=175.0, img_size=32)
    cfg = RC.run_config_from_dict({"preset": "micro", "model": {"w_profile": 1.0, "w_mfm": 0.0},
                                  "data": {"n_hvg": 30, "n_mean": 10, "unlabelled": False},
                                  "training": {"epochs": 1, "batch_size": 16, "threads": 1}})
    path = T.pretrain(cfg, [], tmp_path / "run", max_steps=3, training_set=ts, device="cpu")
    ck = load_checkpoint(path)
    assert ck.model.profile_head is not None and ck.model.config.w_profile == 1.0
    # the total loss logged is more than the sentence InfoNCE + PAAT: the profile term is in it
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert all(float(r["loss"]) > float(r["infonce"]) + 0.5 * float(r["paat"]) + 1.0 for r in rows)
    pred = predict_sample(s, checkpoint=str(path), mode="probe")
    assert pred.n_obs == s.n_spots and np.isfinite(pred.X).all()

