"""Evaluation of predicted expression against measured expression (protocol A of the field).

The protocol (``docs/results.md`` states it next to every table):

* values compared: library-size normalised (``Default.TARGET_SUM``) then ``log1p`` expression,
  i.e. ``layers[Key.LOGNORM]`` of the measured sample and ``X`` of a prediction;
* ``gene_pcc``: Pearson correlation per gene across the spots of the held-out section; a gene
  that is constant in the prediction or in the truth has no correlation (NaN) and is dropped
  from every mean;
* ``pcc_all``: mean over all genes shared by prediction and truth;
* ``pcc_heg50``: mean over the 50 genes with the highest mean *measured* expression in the
  held-out section (HEG-50, as in Hist2ST / BLEEP / mclSTExp);
* ``pcc_hvg50``: mean over the 50 genes with the highest variance of the *measured*
  log-normalised values in the held-out section (HVG-50);
* ``mse`` / ``mae``: over all spots x genes of the log-normalised values.

Ties in the HEG/HVG ranking are broken by gene name so the sets are stable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..constants import Key
from ..errors import InputError
from ..progress import Cancel, Progress

N_TOP = 50  # size of the HEG / HVG gene sets


def gene_pcc(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-gene Pearson correlation across spots.

    ``pred`` and ``true`` are (n_spots, n_genes). Returns (n_genes,) float64 with NaN where a
    gene is constant (zero variance) in either array or where fewer than two spots exist.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must be the same (spots, genes) shape")
    n = pred.shape[0]
    if n < 2:
        return np.full(pred.shape[1], np.nan)
    pc = pred - pred.mean(axis=0)
    tc = true - true.mean(axis=0)
    num = (pc * tc).sum(axis=0)
    den = np.sqrt((pc * pc).sum(axis=0) * (tc * tc).sum(axis=0))
    # a gene whose values are constant up to rounding has no correlation
    tiny = 1e-12 * np.maximum(1.0, np.abs(pred).max(axis=0) * np.abs(true).max(axis=0)) * n
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > tiny, num / np.where(den > tiny, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def pearson_r(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson r of one gene across spots (1-D arrays aligned by spot): :func:`gene_pcc` of that one
    column over the spots where both are finite (NaN marks a spot missing from one side, as
    :func:`evaluate_predictions` keeps only the shared spots), so the widget's "Pearson r" of a gene
    is the number ``comtip evaluate`` computes for it."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must have one value per spot")
    ok = np.isfinite(pred) & np.isfinite(true)
    return float(gene_pcc(pred[ok, None], true[ok, None])[0])


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _top_genes(score: np.ndarray, names: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, ties broken by gene name (stable)."""
    order = np.lexsort((names, -score))
    return order[: min(n, len(order))]


def _dense(m) -> np.ndarray:
    if hasattr(m, "toarray"):
        m = m.toarray()
    return np.asarray(m, dtype=np.float64)


def _true_lognorm(true_adata) -> np.ndarray:
    if Key.LOGNORM in true_adata.layers:
        return _dense(true_adata.layers[Key.LOGNORM])
    from ..io.expression import normalize_log1p

    ad = true_adata.copy()
    normalize_log1p(ad)
    return _dense(ad.layers[Key.LOGNORM])


def metrics_from_arrays(pred: np.ndarray, true: np.ndarray, genes: list[str] | np.ndarray) -> dict[str, Any]:
    """All metrics of the protocol from aligned (spots, genes) arrays of log-normalised values."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    names = np.asarray([str(g) for g in genes])
    r = gene_pcc(pred, true)
    heg = _top_genes(true.mean(axis=0), names, N_TOP)
    hvg = _top_genes(true.var(axis=0), names, N_TOP)
    diff = pred - true
    return {
        "pcc_all": _nanmean(r),
        "pcc_heg50": _nanmean(r[heg]),
        "pcc_hvg50": _nanmean(r[hvg]),
        "mse": float(np.mean(diff * diff)),
        "mae": float(np.mean(np.abs(diff))),
        "n_spots": int(pred.shape[0]),
        "n_genes": int(pred.shape[1]),
        "n_genes_nan": int(np.sum(~np.isfinite(r))),
    }


def evaluate_predictions(pred_adata, true_adata) -> dict[str, Any]:
    """Compare a prediction (``X`` = log-normalised) with the measured expression of a sample.

    Spots are matched by ``obs_names`` and genes by ``var_names``; only the shared ones count.
    Raises :class:`InputError` when fewer than two spots or no genes are shared.
    """
    spots = [s for s in pred_adata.obs_names if s in set(true_adata.obs_names)]
    true_genes = set(map(str, true_adata.var_names))
    genes = [g for g in map(str, pred_adata.var_names) if g in true_genes]
    if len(spots) < 2:
        raise InputError(
            f"the prediction shares {len(spots)} spot ids with the measured sample",
            hint="evaluate on the same sample the prediction was made for",
        )
    if not genes:
        raise InputError("the prediction shares no gene with the measured sample",
                         hint="use a checkpoint whose gene panel overlaps the sample's genes")
    pred = _dense(pred_adata[spots, genes].X)
    true_all = true_adata[spots]
    tl = _true_lognorm(true_all)
    col = {g: i for i, g in enumerate(map(str, true_all.var_names))}
    true = tl[:, [col[g] for g in genes]]
    out = metrics_from_arrays(pred, true, genes)
    out["n_genes_missing"] = int(pred_adata.n_vars - len(genes))
    return out


def evaluate_sample(sample, checkpoint=None, mode: str = "retrieval", *, device: str = "auto",
                    batch_size: int | None = None, reference=None, reference_samples=None,
                    progress: Progress | None = None, cancel: Cancel | None = None,
                    genes=None) -> dict[str, Any]:
    """Predict ``sample`` through :func:`engine.predict.predict_sample` (the path users run) and
    score it against the sample's own measured expression (``genes``: only these, as ``--genes``
    of ``predict``; the top-50 sets are then taken among them)."""
    if sample.expression is None:
        raise InputError(f"sample {sample.name!r} has no measured expression to evaluate against",
                         path=sample.provenance.get("source"),
                         hint="evaluate on a dataset with counts (e.g. a her2st section)")
    from .predict import predict_sample

    pred = predict_sample(sample, checkpoint=checkpoint, mode=mode, genes=genes, device=device, batch_size=batch_size,
                          reference=reference, reference_samples=reference_samples,
                          progress=progress, cancel=cancel)
    out = evaluate_predictions(pred, sample.expression)
    out["mode"] = mode
    out["sample"] = sample.name
    prov = pred.uns.get(Key.PROVENANCE, {}) if hasattr(pred, "uns") else {}
    if isinstance(prov, dict) and "checkpoint" in prov:
        out["checkpoint"] = str(prov["checkpoint"])
    return out


def uncertainty_error_spearman(pred: np.ndarray, unc: np.ndarray, truth: np.ndarray, n_top: int = N_TOP) -> dict[str, Any]:
    """How well a predictor's uncertainty ranks its own errors on a held-out section.

    All three arrays are aligned (spots, genes) log-normalised values. Over the ``n_top`` genes of
    highest measured mean (HEG-50, ties broken by column order): ``per_gene`` is the mean over genes
    of the Spearman correlation, across spots, between the uncertainty and the absolute error
    ``|pred - truth|`` (the headline: the widget shows one gene at a time, so what matters is
    whether the uncertainty map of a gene points at its wrong spots; a gene whose uncertainty or
    error is constant has no correlation and is dropped); ``pooled`` is one Spearman correlation
    over all spots x genes of that set (it also rewards ranking genes by how hard they are).
    Non-finite values are dropped.
    """
    from scipy.stats import rankdata

    pred, unc, truth = (np.asarray(a, dtype=np.float64) for a in (pred, unc, truth))
    if not (pred.shape == unc.shape == truth.shape) or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape}, uncertainty {unc.shape} and truth {truth.shape} must be one (spots, genes) shape")
    ok_cols = np.isfinite(unc).all(0) & np.isfinite(pred).all(0) & np.isfinite(truth).all(0)
    cols = np.flatnonzero(ok_cols)
    cols = cols[np.argsort(-truth[:, cols].mean(0), kind="stable")[:n_top]]
    err = np.abs(pred[:, cols] - truth[:, cols])
    u = unc[:, cols]
    out: dict[str, Any] = {"per_gene": float("nan"), "pooled": float("nan"), "n_genes": int(len(cols)),
                           "n_spots": int(pred.shape[0])}
    if len(cols) == 0 or pred.shape[0] < 3:
        return out
    r = gene_pcc(rankdata(u, axis=0), rankdata(err, axis=0))
    out["per_gene"] = _nanmean(r)
    out["n_genes_nan"] = int(np.sum(~np.isfinite(r)))
    ru, re = rankdata(u.ravel()), rankdata(err.ravel())
    if ru.std() > 0 and re.std() > 0:
        out["pooled"] = float(np.corrcoef(ru, re)[0, 1])
    return out


__all__ = ["gene_pcc", "pearson_r", "evaluate_predictions", "evaluate_sample", "metrics_from_arrays",
           "uncertainty_error_spearman"]
