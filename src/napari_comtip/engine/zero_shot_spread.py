"""Zero-shot's residual spread: how far its predictions fall from measured values on labelled spots.

The zero-shot readout's own uncertainty, the spread of its softmax over the value grid, says how
sharply one spot's image picks a value; it does not say how noisy the measured value is there.
On log-normalised counts that noise depends on the level: a spot predicted low is one where a few
counts (or none) decide the value, so its error is larger (docs/results.md, round of 2026-12-07c:
on the training sections of the stored folds the error of a gene ranks against its predicted
value with Spearman -0.16 to -0.34). So the checkpoint stores, per gene, a line for the log of the
squared residual against the predicted value, fitted on labelled spots (its training spots at the
end of training, or the sections given to ``comtip refit-probe``; ``engine/bank_probe.py``), and
zero-shot's uncertainty is ``sqrt(softmax variance + exp(a_g + b_g * clip(mu)))``
(:func:`engine.predictors.zero_shot` with ``spread=``). Pure numpy: no model, no IO.

The entry, stored as ``extras["zero_shot_spread"]`` of a checkpoint::

    {"a": (G,), "b": (G,), "lo": (G,), "hi": (G,), "context": str, "n_spots": int, "source": str}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.checkpoint import ZERO_SHOT_SPREAD_KEY as EXTRAS_KEY


def fit_spread(mu: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene line ``log(r^2 + eps_g) = a_g + b_g * mu`` over spots (rows), with ``r = truth - mu``
    and ``eps_g`` 1 % of the gene's mean squared residual (a zero residual has a finite log); the
    intercept is shifted so that the line's variances average to the mean squared residual (the
    log-normal bias of a fit in logs, as the probe's variance head does). A gene whose predictions
    do not vary gets ``b = 0``. ``lo``/``hi``: the range of ``mu`` it was fitted on (prediction clips
    to it: the line is not extrapolated)."""
    mu = np.asarray(mu, np.float64)
    y = np.asarray(truth, np.float64)
    if mu.shape != y.shape or mu.ndim != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu {mu.shape} and truth {y.shape} must be one (spots >= 2, genes) shape")
    r2 = (y - mu) ** 2
    m2 = r2.mean(0)
    lg = np.log(r2 + 0.01 * m2 + 1e-12)
    xm, lm = mu.mean(0), lg.mean(0)
    xc = mu - xm
    vx = (xc ** 2).mean(0)
    b = np.where(vx > 1e-12, (xc * (lg - lm)).mean(0) / np.maximum(vx, 1e-12), 0.0)
    a = lm - b * xm
    fitted = a + b * mu
    a = a + np.log(np.maximum(m2, 1e-12)) - np.log(np.exp(fitted).mean(0))
    f32 = np.float32
    return {"a": a.astype(f32), "b": b.astype(f32), "lo": mu.min(0).astype(f32), "hi": mu.max(0).astype(f32)}


def _vector(entry: dict[str, Any], key: str) -> np.ndarray:
    """One per-gene array of the entry (a tensor as loaded from a checkpoint, or numpy) as float64."""
    v = entry[key]
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float64)


def spread_variance(entry: dict[str, Any], mu: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """The residual variance (N, G') at predictions ``mu`` (N, G') of the panel columns ``cols``
    (None: all genes of the entry, in order)."""
    idx = slice(None) if cols is None else np.asarray(cols, dtype=np.int64)
    a, b, lo, hi = (_vector(entry, k)[idx] for k in ("a", "b", "lo", "hi"))
    m = np.clip(np.asarray(mu, np.float64), lo, hi)
    return np.exp(a + b * m).astype(np.float32)


def check_spread(entry: Any, n_genes: int) -> dict[str, Any] | None:
    """The entry if it is complete and has one value per panel gene, else None (an old or a
    foreign checkpoint: zero-shot then reports its softmax spread alone)."""
    if not isinstance(entry, dict):
        return None
    try:
        ok = all(_vector(entry, k).shape == (n_genes,) for k in ("a", "b", "lo", "hi"))
    except (KeyError, TypeError, ValueError):
        return None
    return entry if ok else None


__all__ = ["EXTRAS_KEY", "fit_spread", "spread_variance", "check_spread"]
