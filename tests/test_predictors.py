"""The three predictors: zero-shot (recovers a planted gene-image relation), retrieval, ridge probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from napari_comtip.engine.predictors import Probe, fit_probe, probe_predict, retrieval, zero_shot
from napari_comtip.errors import ConfigError, InputError
from napari_comtip.model import build_model, get_preset
from _model_common import one_thread  # noqa: F401  (autouse: one torch thread)

GENES = ["KRT8", "ERBB2", "CD74", "PIP", "MGP", "COL1A1"]


# ----------------------------------------------------------------------------- retrieval
def test_retrieval_mean_of_k_nearest():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    expr = torch.tensor([[1.0, 10.0], [3.0, 30.0], [100.0, 0.0], [7.0, 7.0]])
    q = np.array([[2.0, 0.0], [0.0, 5.0]], np.float32)  # not normalised on purpose
    out = retrieval(q, bank, expr, k=2)
    assert out.dtype == np.float32 and out.shape == (2, 2)
    assert np.allclose(out[0], [2.0, 20.0])
    assert np.allclose(out[1], [(100 + 3) / 2, (0 + 30) / 2])
    assert np.allclose(retrieval(q, bank, expr, k=50), expr.mean(0).numpy())  # k clamped to M
    exact = retrieval(np.array([[1.0, 0.0]]), bank, expr, k=2, weighting="inverse_square")
    assert np.allclose(exact, [1.0, 10.0], atol=1e-2)  # distance 0 dominates
    w = retrieval(np.array([[1.0, 0.05]]), bank, expr, k=2, weighting="inverse_distance")
    assert 1.0 < w[0, 0] < 3.0


def test_retrieval_errors():
    with pytest.raises(InputError, match="do not match"):
        retrieval(np.zeros((1, 3)), np.zeros((2, 2)), np.zeros((2, 4)))
    with pytest.raises(InputError, match="expression rows"):
        retrieval(np.ones((1, 2)), np.ones((2, 2)), np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="weighting"):
        retrieval(np.ones((1, 2)), np.ones((2, 2)), np.zeros((2, 4)), weighting="median")


# ----------------------------------------------------------------------------- probe
def test_probe_recovers_a_linear_map_and_primal_equals_dual():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)) * rng.uniform(0.1, 10, size=10) + 5
    w = rng.normal(size=(10, 3))
    y = x @ w + 2.0 + 0.01 * rng.normal(size=(200, 3))
    probe = fit_probe(x, y, alpha=1e-6)
    pred = probe_predict(probe, x)
    assert pred.dtype == np.float32 and np.abs(pred - y).max() < 0.1
    # the dual (N < F) solution equals the primal one
    xs, ys = x[:8], y[:8]
    p_dual = fit_probe(xs, ys, alpha=3.0)
    a = (xs - p_dual.mean) / p_dual.std
    w_primal = np.linalg.solve(a.T @ a + 3.0 * np.eye(10), a.T @ (ys - ys.mean(0)))
    assert np.allclose(p_dual.weight, w_primal, atol=1e-4)
    # stronger ridge shrinks towards the mean
    big = probe_predict(fit_probe(x, y, alpha=1e9), x)
    assert np.allclose(big, y.mean(0), atol=1e-2)
    # storable and restorable
    again = Probe.from_dict(probe.to_dict())
    assert np.array_equal(probe_predict(again, x), pred)


def test_probe_errors():
    with pytest.raises(InputError, match="same N"):
        fit_probe(np.zeros((3, 2)), np.zeros((4, 1)))
    with pytest.raises(InputError, match="NaN"):
        fit_probe(np.array([[np.nan], [1.0]]), np.zeros((2, 1)))
    p = fit_probe(np.random.default_rng(0).normal(size=(5, 2)), np.zeros((5, 1)))
    with pytest.raises(InputError, match="expects"):
        probe_predict(p, np.zeros((1, 3)))
    constant = fit_probe(np.ones((5, 2)), np.arange(5.0).reshape(5, 1))  # zero-variance features
    assert np.allclose(probe_predict(constant, np.ones((1, 2))), 2.0)


# ----------------------------------------------------------------------------- zero-shot
def _planted(n, gen):
    """Patches whose brightness is set by z; gene 0 (KRT8) = 4 z, the other genes are noise."""
    z = torch.rand(n, generator=gen)
    expr = torch.rand(n, len(GENES), generator=gen) * 3
    expr[:, 0] = 4 * z
    img = (40 + 180 * z).view(n, 1, 1, 1).expand(n, 32, 32, 3) + 10 * torch.randn(n, 32, 32, 3, generator=gen)
    return img.clamp(0, 255).to(torch.uint8), expr


def _train_planted(steps, lr, **upd):
    cfg = get_preset("micro").replace(**{"text.max_genes": len(GENES), "text.p_single": 0.3, **upd})
    torch.manual_seed(0)
    # random name embeddings: this test is about values; real names are tested in test_model_text
    model = build_model(cfg, GENES, name_embeddings=torch.randn(len(GENES), 384))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        img, expr = _planted(32, gen)
        out = model(model.preprocess(img), *model.sample_text(expr, gen))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model.eval()


def _score(model):
    img, expr = _planted(200, torch.Generator().manual_seed(5))
    with torch.no_grad():
        emb = model.encode_image(model.preprocess(img))
    pred = zero_shot(model, emb, ["KRT8", "ERBB2"])
    assert pred.shape == (200, 2) and pred.dtype == np.float32
    true = expr[:, :2].numpy()
    rho = [spearmanr(pred[:, j], true[:, j]).correlation for j in range(2)]
    mae = float(np.abs(pred[:, 0] - true[:, 0]).mean())
    return rho, mae, pred


def test_zero_shot_recovers_a_planted_relation_fast():
    """InfoNCE only, 200 steps (~5-10 s): rank and scale of the planted gene are recovered.

    A constant prediction at the mean has MAE 1.0 here; an untrained model's expectation sits in
    the middle of the grid with MAE ~1.0, and the noise gene must stay uncorrelated.
    """
    untrained = _train_planted(0, 1e-3, w_mfm=0.0, w_paat=0.0)
    _, mae0, _ = _score(untrained)
    model = _train_planted(200, 1e-3, w_mfm=0.0, w_paat=0.0)
    rho, mae, pred = _score(model)
    assert rho[0] > 0.9, rho
    assert abs(rho[1]) < 0.3, rho
    assert mae < 0.7 < mae0, (mae, mae0)
    lo, hi = model.value_grid(torch.tensor([0]))[0, [0, -1]].tolist()
    assert lo < 0.05 and 3.9 < hi <= 4.0  # the grid spans the training range of KRT8
    assert (pred[:, 0] >= lo - 1e-4).all() and (pred[:, 0] <= hi + 1e-4).all()


@pytest.mark.slow
def test_zero_shot_recovers_a_planted_relation_with_mfm_and_paat():
    """The full CoMTIP loss (InfoNCE + MFM + PAAT), 300 steps (~40 s on a busy 2-core machine)."""
    model = _train_planted(300, 5e-4)
    rho, mae, _ = _score(model)
    assert rho[0] > 0.95 and abs(rho[1]) < 0.3, rho
    assert mae < 0.4, mae


def test_zero_shot_options_and_errors():
    model = _train_planted(0, 1e-3)
    emb = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    full = zero_shot(model, emb)
    assert full.shape == (5, len(GENES))
    by_index = zero_shot(model, emb.numpy(), [1, 0])
    assert np.allclose(by_index, full[:, [1, 0]], atol=1e-5)
    sharp = zero_shot(model, emb, [0], grid=5, temperature=1e-4)
    grid = model.value_grid(torch.tensor([0]), 5)[0].numpy()
    assert np.isclose(sharp[:, :1], grid[None, :], atol=1e-3).any(axis=1).all()  # ~argmax: a grid value
    flat = zero_shot(model, emb, [0], grid=5, temperature=1e4)
    assert np.allclose(flat, grid.mean(), atol=1e-2)  # ~uniform: the grid mean
    with pytest.raises(KeyError, match="NOPE"):
        zero_shot(model, emb, ["NOPE"])
    with pytest.raises(InputError, match="expected"):
        zero_shot(model, torch.randn(2, 7))
    names_only = build_model(get_preset("micro").replace(**{"text.mode": "names"}), GENES, torch.randn(len(GENES), 384))
    with pytest.raises(ConfigError, match="text.mode='names'"):
        zero_shot(names_only, emb)


def test_probe_alpha_by_leave_one_out_matches_brute_force():
    """The closed-form leave-one-out error equals refitting without each spot, and the automatic
    alpha is a heavy penalty for pure noise and a light one for a clean linear relation."""
    from napari_comtip.engine.predictors import loo_ridge_alpha

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5))
    y = x @ rng.standard_normal((5, 3)) + 0.1 * rng.standard_normal((40, 3))
    xs = (x - x.mean(0)) / x.std(0)
    yc = y - y.mean(0)
    alpha, scores = loo_ridge_alpha(xs, yc, alphas=(0.1, 10.0))
    for a in (0.1, 10.0):  # brute force: refit without spot i (same standardisation and centring)
        errs = []
        for i in range(40):
            keep = np.arange(40) != i
            w = np.linalg.solve(xs[keep].T @ xs[keep] + a * np.eye(5), xs[keep].T @ yc[keep])
            errs.append((yc[i] - xs[i] @ w) ** 2)
        assert scores[a] == pytest.approx(float(np.mean(errs)), rel=1e-6)
    assert alpha == 0.1
    p = fit_probe(x, y, alpha=None)
    assert p.alpha == 0.1 and p.alpha_scores and set(p.to_dict()) >= {"alpha_rule", "alpha_scores"}
    assert p.to_dict()["alpha_rule"] == "leave-one-out"
    noise = fit_probe(x, rng.standard_normal((40, 3)), alpha=None)
    assert noise.alpha == 10000.0
    assert fit_probe(x, y, alpha=3.0).to_dict()["alpha_rule"] == "given"
