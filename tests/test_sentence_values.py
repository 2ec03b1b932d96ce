"""Sentence values: the library-size token (text.library_token) and within-spot ranks (text.value_transform)."""

import numpy as np
import pytest
import torch

from napari_comtip.engine import training as T
from napari_comtip.engine import run_config as RC
from napari_comtip.engine.data import build_training_set
from napari_comtip.engine.run_config import DataConfig
from napari_comtip.engine.predictors import zero_shot
from napari_comtip.errors import ConfigError
from napari_comtip.model.presets import get_preset
from napari_comtip.model.factory import build_model


def _model(**text):
    cfg = get_preset("micro")
    for k, v in text.items():
        setattr(cfg.text, k, v)
    return build_model(cfg, [f"G{i}" for i in range(6)], name_embeddings=torch.randn(6, 8))


def test_the_token_changes_the_sentence_and_never_touches_a_gene():
    torch.manual_seed(0)
    m = _model(library_token=True).eval()
    gi = torch.tensor([[0, 1, 2]])
    vals = torch.tensor([[1.0, 2.0, 0.5]])
    mask = torch.ones_like(gi, dtype=torch.bool)
    a, b, c = m.with_library_token(gi, vals, mask, 0.0)
    assert a.tolist() == [[0, 1, 2, 6]] and b[0, -1] == 0 and bool(c.all())
    deep = m.encode_genes(*m.with_library_token(gi, vals, mask, 2.0))
    shallow = m.encode_genes(*m.with_library_token(gi, vals, mask, -2.0))
    assert not torch.allclose(deep, shallow)
    # the token's value is not recorded as a gene's training range
    m.train()
    m.observe_values(a, b, c & (a < m.n_genes))
    assert int(m.value_count.sum()) == 3
    assert _model().with_library_token(gi, vals, mask)[0] is gi  # no token: unchanged


def test_only_names_plus_values_can_have_it():
    cfg = get_preset("micro")
    cfg.text.mode, cfg.text.library_token = "values", True
    with pytest.raises(ConfigError, match="library_token"):
        cfg.validate()


def test_training_with_the_token_then_zero_shot(tmp_path):
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    s = load_sample("@demo")
    ts = build_training_set([s], DataConfig(n_hvg=30, n_mean=10, unlabelled=False), patch_um=175.0, img_size=32)
    assert ts.library_z.shape == (ts.n_spots,) and abs(float(ts.library_z.mean())) < 1e-4
    lib = np.log1p(np.asarray(s.expression.X.sum(1)).ravel())
    assert np.corrcoef(ts.library_z, lib)[0, 1] == pytest.approx(1.0)
    cfg = RC.run_config_from_dict({"preset": "micro", "model": {"text": {"library_token": True}},
                                  "data": {"n_hvg": 30, "n_mean": 10, "unlabelled": False},
                                  "training": {"epochs": 1, "batch_size": 16, "threads": 1}})
    path = T.pretrain(cfg, [], tmp_path / "run", max_steps=3, training_set=ts, device="cpu")
    ck = load_checkpoint(path)
    assert ck.model.library_token_index == len(ck.gene_panel)
    assert "text.lib_ident" in ck.model.state_dict()
    pred = zero_shot(ck.model, torch.randn(5, ck.model.embed_dim), [0, 1])
    assert pred.shape == (5, 2) and np.isfinite(pred).all()


def test_spot_rank_is_a_within_spot_mid_rank():
    from napari_comtip.model.sentences import spot_rank

    x = torch.tensor([[0.0, 3.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0], [0.0] * 5])
    r = spot_rank(x)
    torch.testing.assert_close(r[0], torch.tensor([0.0, 1.0, 1.5 / 3, 1.5 / 3, 0.0]))
    torch.testing.assert_close(r[1], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    assert float(r[2].abs().sum()) == 0.0
    # depth does not matter: a spot scaled up gives the same ranks
    torch.testing.assert_close(spot_rank(x * 7.0), r)


def _trained_on_demo(tmp_path, value_transform: str):
    """(loaded model, training set, run config) of 3 micro steps on the demo sample with these sentence values."""
    from _model_common import train_on_demo

    return train_on_demo(tmp_path, {"value_transform": value_transform})


def test_spot_rank_training_calibrates_zero_shot_to_lognorm(tmp_path):
    m, ts, _ = _trained_on_demo(tmp_path, "spot_rank")
    assert float(m.value_hi.max()) <= 1.0  # the zero-shot grid spans ranks
    a, b = m.value_cal.numpy()
    assert (b > 0).all()
    # the line maps the training spots' ranks onto their log-normalised values in the mean
    ranks = m.text_values(torch.from_numpy(ts.expr)).numpy()
    np.testing.assert_allclose((a + b * ranks).mean(0), ts.expr.mean(0), atol=2e-2)  # fp16 storage
    pred = zero_shot(m, torch.randn(4, m.embed_dim), [0, 1, 2])
    assert pred.shape == (4, 3) and np.isfinite(pred).all()


def test_gene_z_standardises_per_gene_and_leaves_the_library_token():
    from napari_comtip.constants import Default
    from napari_comtip.model.sentences import gene_z, gene_z_stats

    x = torch.tensor([[0.0, 2.0, 1.0], [2.0, 2.0, 3.0], [4.0, 2.0, 2.0]])
    mu, sd = gene_z_stats(x.numpy())
    torch.testing.assert_close(mu, torch.tensor([2.0, 2.0, 2.0]))
    assert float(sd[1]) == pytest.approx(1e-3)  # a constant gene: sd floored, not a division by zero
    idx = torch.tensor([[0, 2, 3]])  # index 3 = past the panel: the library-size token
    z = gene_z(torch.tensor([[4.0, 1.0, 0.7]]), idx, mu, sd)
    torch.testing.assert_close(z[0, :2], torch.tensor([4.0, 1.0]).sub(2.0).div(sd[[0, 2]]))
    assert float(z[0, 2]) == pytest.approx(0.7)
    lo, hi = Default.GENE_Z_RANGE
    assert float(gene_z(torch.tensor([[9.0]]), torch.tensor([[1]]), mu, sd)) == hi  # clamped


def test_gene_z_training_stores_the_statistics_and_zero_shot_spans_negative_values(tmp_path):
    from napari_comtip.engine.batches import BatchSet
    from napari_comtip.model.sentences import gene_z_stats

    m, ts, cfg = _trained_on_demo(tmp_path, "gene_z")
    mu, sd = gene_z_stats(ts.expr)
    torch.testing.assert_close(m.value_mu, mu)  # kept in float32 in the fp16 file
    torch.testing.assert_close(m.value_sd, sd)
    assert float(m.value_lo.min()) < 0.0  # training saw below-mean values
    assert float(m.value_grid(torch.arange(m.n_genes)).min()) < 0.0  # ... and the grid keeps them
    # the calibration line inverts the standardisation (up to the clamp)
    a, b = m.value_cal.numpy()
    z = m.text_values(torch.from_numpy(ts.expr)).numpy()
    np.testing.assert_allclose((a + b * z).mean(0), ts.expr.mean(0), atol=2e-2)  # fp16 storage
    assert (b > 0).all()
    # a training batch's sentence values are the same standardisation of the lognorm values
    from napari_comtip.engine.distributed import Dist

    batches = BatchSet(ts, cfg, 0, 1, Dist(), lambda x, g: x.float())
    _, gi, vals, mask, _, _, _, _ = batches[0]
    raw = torch.from_numpy(np.asarray(ts.expr[batches.batches[0]])).float()
    want = m.text_values(raw).gather(1, gi)
    torch.testing.assert_close(vals[mask], want[mask], atol=1e-4, rtol=1e-4)
    pred = zero_shot(m, torch.randn(4, m.embed_dim), [0, 1, 2])
    assert pred.shape == (4, 3) and np.isfinite(pred).all()
