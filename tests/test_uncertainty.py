"""Every predictor's uncertainty: shapes, non-negative, larger where it is less sure, stored with
the probe (and absent, not invented, for a probe stored before it), and the error-ranking metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_comtip.engine.baselines import RidgeFloor
from napari_comtip.engine.context import fit_context_probe
from napari_comtip.engine.evaluation import uncertainty_error_spearman
from napari_comtip.engine.predictors import Probe, fit_probe, probe_predict, retrieval, zero_shot
from _model_common import micro_model, one_thread  # noqa: F401  (one_thread is autouse: one torch thread)

GENES = ["KRT8", "ERBB2", "CD74", "PIP", "MGP", "COL1A1"]


def _linear_data(n=300, f=8, g=3, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    w = rng.normal(size=(f, g))
    y = x @ w + noise * rng.normal(size=(n, g)) * np.array([1.0, 2.0, 4.0])[:g]
    return x, y, w


# --------------------------------------------------------------------------- retrieval
def test_retrieval_spread_is_the_neighbours_standard_deviation():
    bank = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]], np.float32)
    expr = np.array([[2.0, 5.0], [2.0, 1.0], [0.0, 3.0], [4.0, 3.0]], np.float32)
    q = np.array([[1.0, 0.05], [0.05, 1.0]], np.float32)
    pred, sd = retrieval(q, bank, expr, k=2, return_std=True)
    assert pred.shape == sd.shape == (2, 2) and sd.dtype == np.float32 and (sd >= 0).all()
    assert np.allclose(pred, retrieval(q, bank, expr, k=2))
    # spot 0: neighbours agree on gene 0 (sd 0), disagree on gene 1 (5 vs 1: sd 2); spot 1 the other way
    assert np.allclose(sd, [[0.0, 2.0], [2.0, 0.0]], atol=1e-5)
    _, sdw = retrieval(q, bank, expr, k=2, weighting="inverse_distance", return_std=True)
    assert (sdw >= 0).all() and sdw[0, 1] > 1.0 and sdw[0, 0] < 1e-5


# --------------------------------------------------------------------------- zero-shot
def test_zero_shot_spread_of_the_softmax():
    model = micro_model(GENES)
    emb = torch.nn.functional.normalize(torch.randn(7, model.config.embed_dim), dim=-1)
    pred, sd = zero_shot(model, emb, return_std=True)
    assert pred.shape == sd.shape == (7, len(GENES)) and (sd >= 0).all()
    assert np.allclose(pred, zero_shot(model, emb), atol=1e-6)
    grid = model.value_grid(torch.tensor([0]), 5)[0].numpy()
    _, sharp = zero_shot(model, emb, [0], grid=5, temperature=1e-4, return_std=True)
    _, flat = zero_shot(model, emb, [0], grid=5, temperature=1e4, return_std=True)
    assert np.median(sharp) < 1e-3 and sharp.max() < 0.2 * flat.min()  # mass on one grid value: sure
    assert np.allclose(flat, grid.std(), atol=1e-2)  # uniform over the grid: as unsure as it can be
    # the calibration line to log-normalised units scales the spread by |slope|
    model.register_buffer("value_cal", torch.stack([torch.zeros(len(GENES)), torch.ones(len(GENES))]))
    model.value_cal[1, 0] = -3.0
    _, cal = zero_shot(model, emb, [0], grid=5, temperature=1e4, return_std=True)
    assert np.allclose(cal, 3.0 * grid.std(), atol=3e-2)


# --------------------------------------------------------------------------- probe
def test_probe_spread_grows_far_from_the_training_features():
    x, y, _ = _linear_data()
    probe = fit_probe(x, y, alpha=1.0)
    assert probe.has_spread and probe.cov.shape == (8, 8) and probe.resid_var.shape == (3,)
    near = x[:5]
    far = 30.0 * np.sign(x[:5])  # the same directions, far outside the training cloud
    p, sd = probe_predict(probe, near, return_std=True)
    assert p.shape == sd.shape == (5, 3) and (sd > 0).all()
    assert np.allclose(p, probe_predict(probe, near))
    _, sd_far = probe_predict(probe, far, return_std=True)
    assert (sd_far > sd).all()
    # the noisier gene is the less sure one, and the spread matches its residual scale in-sample
    assert sd[:, 2].mean() > sd[:, 1].mean() > sd[:, 0].mean()
    assert np.allclose(np.sqrt(probe.resid_var), [0.3, 0.6, 1.2], rtol=0.25)


def test_probe_spread_is_stored_and_old_probes_predict_without_it():
    x, y, _ = _linear_data()
    probe = fit_probe(x, y, alpha=None)  # leave-one-out penalty: the residual variance is leave-one-out too
    d = probe.to_dict()
    assert isinstance(d["cov"], torch.Tensor) and d["resid_rule"] == "leave-one-out" and d["n_train"] == len(x)
    back = Probe.from_dict(d)
    assert np.allclose(probe_predict(back, x[:4], return_std=True)[1], probe_predict(probe, x[:4], return_std=True)[1])
    old = {k: v for k, v in d.items() if k not in ("cov", "resid_var", "n_train", "resid_rule", "var_weight", "var_bias")}
    pred, sd = probe_predict(old, x[:4], return_std=True)
    assert sd is None and np.allclose(pred, probe_predict(probe, x[:4]))


def test_probe_spread_follows_noise_that_depends_on_the_tissue():
    rng = np.random.default_rng(2)
    n = 600
    x = rng.normal(size=(n, 5))
    scale = np.exp(0.8 * x[:, 0])  # the noise of both genes grows with feature 0 (e.g. a tissue type)
    y = x @ rng.normal(size=(5, 2)) + scale[:, None] * rng.normal(size=(n, 2))
    probe = fit_probe(x[:400], y[:400], alpha=None)
    _, sd = probe_predict(probe, x[400:], return_std=True)
    from scipy.stats import spearmanr

    for g in range(2):
        assert spearmanr(sd[:, g], scale[400:]).statistic > 0.8
    # its mean level is the held-out residual variance
    _, sd_tr = probe_predict(probe, x[:400], return_std=True)
    assert np.allclose(np.mean(sd_tr ** 2, 0), probe.resid_var, rtol=0.1)


def test_context_probe_residual_variance_comes_from_the_spatial_blocks():
    rng = np.random.default_rng(1)
    n = 200
    centres = np.stack(np.meshgrid(np.arange(20), np.arange(10)), -1).reshape(-1, 2).astype(float)
    x = rng.normal(size=(n, 6)) + centres[:, :1] / 10.0
    y = x @ rng.normal(size=(6, 2)) + 0.5 * rng.normal(size=(n, 2))
    probe = fit_context_probe(x, y, "section", centres, np.zeros(n, int))
    assert probe.has_spread and "spatial blocks" in probe.resid_rule
    assert probe.resid_var.shape == (2,) and np.allclose(np.mean(probe.resid_var), probe.alpha_scores[probe.alpha])
    _, sd = probe_predict(probe, x, return_std=True)
    assert sd.shape == (n, 2) and (sd > 0).all()


def test_colour_texture_floor_spread():
    x, y, _ = _linear_data()
    floor = RidgeFloor().fit(x, y)
    p, sd = floor.predict(x[:5], return_std=True)
    assert np.allclose(p, floor.predict(x[:5])) and sd.shape == (5, 3) and (sd > 0).all()
    _, sd_far = floor.predict(30.0 * np.sign(x[:5]), return_std=True)
    assert (sd_far > sd).all()


# --------------------------------------------------------------------------- the metric
def test_uncertainty_error_spearman():
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 1.0, size=(400, 60)) + np.arange(60)[None, :] * 0.01
    scale = rng.uniform(0.1, 2.0, size=truth.shape)
    pred = truth + scale * rng.normal(size=truth.shape)
    good = uncertainty_error_spearman(pred, scale, truth)  # the true noise scale ranks the errors
    assert good["n_genes"] == 50 and 0.3 < good["per_gene"] < 0.9 and 0.3 < good["pooled"] < 0.9
    rand = uncertainty_error_spearman(pred, rng.uniform(size=truth.shape), truth)
    assert abs(rand["per_gene"]) < 0.05 and abs(rand["pooled"]) < 0.05
    inv = uncertainty_error_spearman(pred, -scale, truth)
    assert inv["per_gene"] < -0.3
    const = uncertainty_error_spearman(pred, np.ones_like(truth), truth)  # no ranking at all: no number
    assert np.isnan(const["per_gene"]) and np.isnan(const["pooled"])
    with pytest.raises(ValueError, match="shape"):
        uncertainty_error_spearman(pred, scale[:, :3], truth)
