"""Protocol-A metrics against hand-computed values."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from napari_comtip.constants import Key
from napari_comtip.engine.evaluation import evaluate_predictions, gene_pcc, metrics_from_arrays
from napari_comtip.errors import InputError


def test_gene_pcc_matches_hand_computed_values():
    true = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0]])
    pred = np.array([[2.0, 5.0], [4.0, 5.0], [6.0, 5.0], [7.0, 5.0]])
    r = gene_pcc(pred, true)
    # gene 0: pred = (2, 4, 6, 7), true = (1, 2, 3, 4): cov = 5.25*... computed by hand:
    # pred - 4.75 = (-2.75, -0.75, 1.25, 2.25); true - 2.5 = (-1.5, -0.5, 0.5, 1.5)
    # num = 4.125 + 0.375 + 0.625 + 3.375 = 8.5; |p| = sqrt(14.75); |t| = sqrt(5)
    assert r[0] == pytest.approx(8.5 / np.sqrt(14.75 * 5.0), abs=1e-12)
    # gene 1: constant prediction -> no correlation
    assert np.isnan(r[1])
    assert gene_pcc(-pred[:, :1], true[:, :1])[0] == pytest.approx(-r[0])


def test_metrics_drop_nan_genes_and_pick_heg_hvg_from_truth():
    rng = np.random.default_rng(0)
    n, g = 30, 120
    genes = [f"g{i:03d}" for i in range(g)]
    # gene i has mean 3 i (HEG-50 = the last 50); the first 50 vary 10x more (HVG-50)
    sd = np.where(np.arange(g) < 50, 2.0, 0.2)
    true = 3.0 * np.arange(g) + rng.standard_normal((n, g)) * sd
    pred = true.copy()
    pred[:, 70:] = -true[:, 70:]  # perfectly anti-correlated on genes 70..119 (inside the HEG set)
    pred[:, 0] = 1.0  # constant: NaN, dropped
    m = metrics_from_arrays(pred, true, genes)
    assert m["n_genes_nan"] == 1
    assert m["pcc_all"] == pytest.approx((69 * 1.0 + 50 * -1.0) / 119)
    assert m["pcc_hvg50"] == pytest.approx(1.0)  # genes 1..49 (gene 0 dropped)
    assert m["pcc_heg50"] == pytest.approx(-1.0)  # genes 70..119
    diff = pred - true
    assert m["mse"] == pytest.approx(np.mean(diff**2))
    assert m["mae"] == pytest.approx(np.mean(np.abs(diff)))
    assert (m["n_spots"], m["n_genes"]) == (n, g)


def _adata(X, spots, genes, lognorm=True):
    ad = anndata.AnnData(X=np.asarray(X, np.float32))
    ad.obs_names = spots
    ad.var_names = genes
    if lognorm:
        ad.layers[Key.LOGNORM] = ad.X.copy()
    return ad


def test_evaluate_predictions_aligns_spots_and_genes_by_name():
    rng = np.random.default_rng(1)
    spots = [f"s{i}" for i in range(20)]
    genes = [f"G{i}" for i in range(8)]
    true = rng.random((20, 8))
    truth = _adata(true, spots, genes)
    order_s = rng.permutation(20)
    order_g = [3, 1, 0, 7]
    pred = _adata(true[order_s][:, order_g] * 2 + 1, [spots[i] for i in order_s], [genes[j] for j in order_g] + [], False)
    m = evaluate_predictions(pred, truth)
    assert m["pcc_all"] == pytest.approx(1.0)
    assert m["n_genes"] == 4 and m["n_spots"] == 20


def test_evaluate_predictions_refuses_disjoint_spots():
    a = _adata(np.ones((3, 2)), ["a", "b", "c"], ["G1", "G2"])
    b = _adata(np.ones((3, 2)), ["x", "y", "z"], ["G1", "G2"])
    with pytest.raises(InputError, match="spot ids"):
        evaluate_predictions(a, b)


def test_comtip_evaluate_takes_genes_like_predict(capsys):
    """`comtip evaluate --genes` (docs/cli.md: the options of predict) scores only those genes."""
    import json

    from napari_comtip.cli import main

    assert main(["evaluate", "--data", "@demo", "--genes", "ERBB2, KRT19", "--device", "cpu", "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["n_genes"] == 2 and m["n_spots"] == 187 and np.isfinite(m["pcc_all"])


def test_widget_r_is_the_evaluate_r_of_that_gene():
    """One Pearson function: the widget's r of a gene (pearson_r) equals comtip evaluate's per-gene PCC."""
    from napari_comtip.engine.evaluation import pearson_r

    rng = np.random.default_rng(3)
    true = rng.gamma(1.0, 1.0, size=(40, 5))
    pred = true + rng.normal(0, 0.8, size=true.shape)
    r = gene_pcc(pred, true)
    for j in range(true.shape[1]):
        assert pearson_r(pred[:, j], true[:, j]) == pytest.approx(r[j], abs=1e-12)
    # a spot missing from one side (NaN) is left out, like a spot the prediction does not share
    p, t = pred[:, 0].copy(), true[:, 0].copy()
    p[3] = np.nan
    keep = np.arange(40) != 3
    assert pearson_r(p, t) == pytest.approx(gene_pcc(pred[keep, :1], true[keep, :1])[0], abs=1e-12)
    assert np.isnan(pearson_r(np.ones(40), t))
