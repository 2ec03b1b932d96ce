"""Zero-shot's residual spread (engine/zero_shot_spread.py): the per-gene line of the log squared
residual on the predicted value, how zero-shot adds it to its softmax spread, and how a
checkpoint gets it (at the end of training, and again with refit_probe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_comtip.engine.evaluation import uncertainty_error_spearman
from napari_comtip.engine.predictors import zero_shot
from napari_comtip.engine.zero_shot_spread import check_spread, fit_spread, spread_variance
from _model_common import micro_model, one_thread  # noqa: F401  (one_thread is autouse: one torch thread)

GENES = ["KRT8", "ERBB2", "CD74", "PIP"]


def _noisy_low(n=2000, seed=0):
    """Gene 0: noise sd exp(-mu) (noisier where predicted low), gene 1: noise rising with mu,
    gene 2: constant noise, gene 3: a constant prediction."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0.0, 3.0, size=(n, 4))
    mu[:, 3] = 1.5
    sd = np.stack([np.exp(-mu[:, 0]), 0.1 + 0.3 * mu[:, 1], np.full(n, 0.5), np.full(n, 0.5)], 1)
    return mu, mu + sd * rng.normal(size=(n, 4)), sd


def test_the_line_follows_how_the_noise_depends_on_the_level():
    mu, y, sd = _noisy_low()
    e = fit_spread(mu, y)
    assert e["b"][0] < -1.0 and e["b"][1] > 0.3 and abs(e["b"][2]) < 0.1 and e["b"][3] == 0.0
    var = spread_variance(e, mu)
    # its mean is the mean squared residual (no log-normal bias), gene by gene
    np.testing.assert_allclose(var.mean(0), ((y - mu) ** 2).mean(0), rtol=1e-4)
    # and it ranks the errors of the heteroscedastic genes (the metric the benchmark reports)
    r = uncertainty_error_spearman(mu[:, :2], np.sqrt(var[:, :2]), y[:, :2], n_top=2)
    assert r["per_gene"] > 0.25
    # outside the fitted range the line is not extrapolated; a column subset picks its genes
    far = spread_variance(e, np.full((1, 4), 50.0))
    edge = spread_variance(e, mu.max(0, keepdims=True))
    np.testing.assert_allclose(far, edge, rtol=1e-6)
    np.testing.assert_allclose(spread_variance(e, mu[:, [2, 0]], np.array([2, 0])), var[:, [2, 0]], rtol=1e-6)


def test_fit_refuses_mismatched_shapes_and_check_drops_foreign_entries():
    with pytest.raises(ValueError, match="one \\(spots >= 2, genes\\) shape"):
        fit_spread(np.zeros((5, 3)), np.zeros((5, 2)))
    e = fit_spread(*_noisy_low(50)[:2])
    assert check_spread(e, 4) is e
    assert check_spread(e, 5) is None  # another panel
    assert check_spread({"a": e["a"]}, 4) is None and check_spread(None, 4) is None


def test_zero_shot_adds_the_residual_variance_to_its_softmax_spread():
    model = micro_model(GENES)
    emb = torch.nn.functional.normalize(torch.randn(9, model.config.embed_dim), dim=-1)
    mu, sd = zero_shot(model, emb, return_std=True)
    e = fit_spread(np.vstack([mu, mu + 1.0]), np.vstack([mu + 0.5, mu]))  # some residuals around mu
    mu2, sd2 = zero_shot(model, emb, return_std=True, spread=e)
    np.testing.assert_array_equal(mu2, mu)  # the prediction does not change
    np.testing.assert_allclose(sd2 ** 2, sd.astype(np.float64) ** 2 + spread_variance(e, mu), rtol=1e-4, atol=1e-6)
    _, sub = zero_shot(model, emb, [2, 0], return_std=True, spread=e)
    np.testing.assert_allclose(sub, sd2[:, [2, 0]], rtol=1e-5)


def test_a_trained_checkpoint_stores_it_and_zero_shot_reports_it(tmp_path):
    """End to end: the checkpoint written at the end of training has the spread of its training
    spots; predict_sample's zero-shot uncertainty includes it and its provenance says so."""
    from _model_common import train_on_demo

    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    model, ts, _ = train_on_demo(tmp_path, {"mode": "names+values"})
    ck = load_checkpoint(tmp_path / "run" / "model.pt")
    e = check_spread(ck.zero_shot_spread, len(ts.panel))
    assert e is not None and e["n_spots"] == ts.n_spots and e["context"] == "neighbours"
    pred = predict_sample(load_sample("@demo"), checkpoint=str(ck.path), mode="zero-shot", device="cpu")
    note = pred.uns["comtip"]["uncertainty"]["what"]
    assert "residual variance" in note
    mu = np.asarray(pred.X)
    cols = [ts.panel.index(g) for g in pred.var_names]
    floor = np.sqrt(spread_variance(e, mu, np.asarray(cols)))
    assert (np.asarray(pred.layers["uncertainty"]) >= floor - 1e-4).all()
