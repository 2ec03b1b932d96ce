"""Spatial context for the probe: section-level standardisation and neighbourhood views of each spot.

A spot's expression depends on its surroundings as much as on its own patch (TRIPLEX, Hist2ST
and peers.md report large gains from neighbour and slide-level views on her2st), and two
sections of one study differ in stain and scan far more than neighbouring spots do. The probe
therefore reads, per spot, not only its own pooled features but a *context vector* built from
the features of every spot of the same section (pure numpy, no model, no expression):

``none``
    the spot's own features (the probe's original input).
``section``
    the features standardised within the section (mean 0, std 1 over its spots): the section's
    stain and scanner offset is removed before the ridge sees it.
``neighbours`` (the default of new checkpoints)
    ``section``, concatenated with the same standardised features averaged over the spots within
    1.6 and 3.5 grid pitches of the spot (its ring of direct neighbours and a wider disc: the
    tissue compartment it sits in).

The context is computed the same way for the probe's training spots (each section on its own)
and for the predicted sample, and the probe stores its context name, so a checkpoint always
applies the rule it was fitted with. A sample with fewer than ``MIN_SECTION_SPOTS`` spots (a
few hand-drawn points) has too few spots for a stable section mean: its features are then
used as they are (``none``; the probe's own standardisation from its training spots applies)
and its neighbourhood is the spots it has.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, InputError

CONTEXTS = ("none", "section", "neighbours")
#: zero-shot's input (embedding_context): the spot's own image embedding, or with its neighbourhood's
ZERO_SHOT_CONTEXTS = ("none", "neighbours")
#: neighbourhood radii in grid pitches (median nearest-neighbour distance of the section's spots)
NEIGHBOUR_RADII = (1.6, 3.5)
#: below this many spots a section is not standardised on its own (see the module docstring)
MIN_SECTION_SPOTS = 20


def check_context(context: str) -> str:
    c = str(context).lower()
    if c not in CONTEXTS:
        raise ConfigError(f"unknown probe context {context!r}", hint=f"choose one of {', '.join(CONTEXTS)}")
    return c


def spot_pitch(centres: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot (the grid pitch), in the centres' unit."""
    from scipy.spatial import cKDTree

    c = np.asarray(centres, dtype=np.float64)
    if len(c) < 2:
        return float("nan")
    d, _ = cKDTree(c).query(c, k=2)
    nn = d[:, 1]
    nn = nn[nn > 0]
    return float(np.median(nn)) if len(nn) else float("nan")


def neighbour_mean(features: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    """Mean of ``features`` over the spots within ``radius`` of each spot (the spot included)."""
    from scipy.sparse import csr_matrix
    from scipy.spatial import cKDTree

    f = np.asarray(features, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    if len(c) == 0:
        return f.copy()
    pairs = cKDTree(c).query_pairs(float(radius), output_type="ndarray")
    n = len(c)
    rows = np.concatenate([np.arange(n), pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([np.arange(n), pairs[:, 1], pairs[:, 0]])
    w = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    deg = np.asarray(w.sum(axis=1)).ravel()
    return np.asarray(w @ f) / deg[:, None]


def _standardise(f: np.ndarray) -> np.ndarray:
    if len(f) < MIN_SECTION_SPOTS:
        return f
    sd = f.std(0)
    return (f - f.mean(0)) / np.where(sd < 1e-8, 1.0, sd)


def context_features(features: np.ndarray, centres: np.ndarray | None, context: str) -> np.ndarray:
    """The probe's input (N, F') for the spots of ONE section (see the module docstring)."""
    context = check_context(context)
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise InputError(f"features must be (N, F), got shape {f.shape}")
    if context == "none":
        return f.astype(np.float32)
    fs = _standardise(f)
    if context == "section":
        return fs.astype(np.float32)
    if centres is None or len(centres) != len(f):
        raise InputError("the 'neighbours' probe context needs one spot centre per feature row")
    pitch = spot_pitch(centres)
    parts = [fs]
    for r in NEIGHBOUR_RADII:
        parts.append(fs if not np.isfinite(pitch) else neighbour_mean(fs, centres, r * pitch))
    return np.hstack(parts).astype(np.float32)


def check_zero_shot_context(context: str) -> str:
    if context not in ZERO_SHOT_CONTEXTS:
        raise ConfigError(f"unknown zero-shot context {context!r}", hint=f"choose from {', '.join(ZERO_SHOT_CONTEXTS)}")
    return context


def embedding_context(emb: np.ndarray, centres: np.ndarray | None, context: str) -> np.ndarray:
    """Zero-shot's input (N, D) for the spots of ONE section: ``none`` the image embeddings as
    they are; ``neighbours`` each spot's embedding plus its means over the spots within the
    probe's radii (``NEIGHBOUR_RADII`` grid pitches), equal weights (zero-shot renormalises).
    Why: expression is spatially smooth and one spot's patch is a noisy view of it
    (docs/results.md, round of 2026-12-07b: higher zero-shot HEG-50 on 25 of 26 held-out folds,
    up to +0.03). A sample of fewer than two spots, or without centres, is read as it is."""
    e = np.asarray(emb, dtype=np.float32)
    if e.ndim != 2:
        raise InputError(f"image embeddings must be (N, D), got shape {e.shape}")
    if check_zero_shot_context(context) == "none" or centres is None or len(e) < 2:
        return e
    if len(centres) != len(e):
        raise InputError("the 'neighbours' zero-shot context needs one spot centre per embedding row")
    pitch = spot_pitch(centres)
    if not np.isfinite(pitch):
        return e
    out = e.astype(np.float64)
    for r in NEIGHBOUR_RADII:
        out += neighbour_mean(e, centres, r * pitch)
    return out.astype(np.float32)


def _per_section(fn, values: np.ndarray, centres: np.ndarray | None, groups: Sequence[int] | np.ndarray) -> np.ndarray:
    """``fn(values[rows], centres[rows])`` for the rows of each section (``groups``: section index
    per row) on its own, put back in row order (float32)."""
    f = np.asarray(values)
    g = np.asarray(groups)
    out = None
    for k in np.unique(g):
        rows = np.flatnonzero(g == k)
        part = fn(f[rows], None if centres is None else np.asarray(centres)[rows])
        if out is None:
            out = np.empty((len(f), part.shape[1]), dtype=np.float32)
        out[rows] = part
    return out if out is not None else np.zeros((0, f.shape[1] if f.ndim == 2 else 0), np.float32)


def context_features_grouped(features: np.ndarray, centres: np.ndarray | None, groups: Sequence[int] | np.ndarray,
                             context: str) -> np.ndarray:
    """:func:`context_features` applied to each section (``groups``: section index per row) on its own."""
    context = check_context(context)
    return _per_section(lambda f, c: context_features(f, c, context), features, centres, groups)


def embedding_context_grouped(emb: np.ndarray, centres: np.ndarray | None, groups: Sequence[int] | np.ndarray,
                              context: str) -> np.ndarray:
    """:func:`embedding_context` applied to each section (``groups``: section index per row) on its own."""
    context = check_zero_shot_context(context)
    return _per_section(lambda e, c: embedding_context(e, c, context), emb, centres, groups)


__all__ = [
    "CONTEXTS", "ZERO_SHOT_CONTEXTS", "check_zero_shot_context", "embedding_context", "embedding_context_grouped",
    "NEIGHBOUR_RADII", "MIN_SECTION_SPOTS", "check_context", "spot_pitch", "neighbour_mean",
    "context_features", "context_features_grouped"
]


# --------------------------------------------------------------------------- the penalty of a context probe
#: spatial blocks per section for the penalty choice of a probe in context
N_BLOCKS = 4


def spatial_blocks(centres: np.ndarray, groups: Sequence[int] | np.ndarray | None = None, n_blocks: int = N_BLOCKS,
                   seed: int = 0) -> np.ndarray:
    """Block index (0..n_blocks-1) of each spot: k-means of the spot centres within each section, so
    that block b of every section forms cross-validation fold b (contiguous tissue held out)."""
    from scipy.cluster.vq import kmeans2

    c = np.asarray(centres, dtype=np.float64)
    g = np.zeros(len(c), int) if groups is None else np.asarray(groups)
    out = np.zeros(len(c), dtype=np.int64)
    for k in np.unique(g):
        rows = np.flatnonzero(g == k)
        if len(rows) < 2 * n_blocks:
            out[rows] = np.arange(len(rows)) % n_blocks
            continue
        _, lab = kmeans2(c[rows], n_blocks, seed=seed + int(k), minit="++")
        out[rows] = lab
    return out


def block_cv_alpha(xs: np.ndarray, y: np.ndarray, blocks: np.ndarray, alphas: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The ridge penalty with the smallest held-out-block squared error (standardised features ``xs``).

    Leave-one-out is optimistic for features that average a spot's neighbours (the held-out spot's
    neighbours, whose expression is correlated with its own, stay in the fit and pick too small a
    penalty: on a mouse-brain fold it chose 0.1 and lost a third of the floor's PCC), so a probe in
    context holds out contiguous tissue instead."""
    gene_mse = block_cv_gene_mse(xs, y, blocks, alphas)
    scores = {a: float(np.mean(e)) for a, e in gene_mse.items()}
    return min(scores, key=lambda k: scores[k]), scores


def block_cv_gene_mse(xs: np.ndarray, y: np.ndarray, blocks: np.ndarray, alphas: Sequence[float]) -> dict[float, np.ndarray]:
    """Held-out-block mean squared error (G,) of each gene for each penalty (see :func:`block_cv_alpha`);
    the chosen penalty's errors are the probe's residual variance per gene (its predictive spread)."""
    xs = np.asarray(xs, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    err = {float(a): np.zeros(y.shape[1]) for a in alphas}
    n = 0
    for b in np.unique(blocks):
        te = blocks == b
        tr = ~te
        if tr.sum() < 2 or te.sum() == 0:
            continue
        mu, ym = xs[tr].mean(0), y[tr].mean(0)
        u, s, vt = np.linalg.svd(xs[tr] - mu, full_matrices=False)
        uty = u.T @ (y[tr] - ym)
        xt = (xs[te] - mu) @ vt.T
        for a in alphas:
            pred = xt @ ((s / (s * s + float(a)))[:, None] * uty) + ym
            err[float(a)] += ((pred - y[te]) ** 2).sum(0)
        n += int(te.sum())
    return {a: e / max(n, 1) for a, e in err.items()}


def fit_context_probe(x: np.ndarray, y: np.ndarray, context: str, centres: np.ndarray | None, groups=None, *,
                      alpha: float | None = None, genes: Sequence[str] | None = None):
    """The probe on context features ``x`` (from :func:`context_features_grouped`): the penalty by
    leave-one-out for ``none`` (the floor's rule) and by spatial-block cross-validation otherwise,
    unless ``alpha`` is given. Returns a :class:`~napari_comtip.engine.predictors.Probe`."""
    from ..constants import Default
    from . import predictors

    context = check_context(context)
    if alpha is not None or context == "none" or centres is None:
        return predictors.fit_probe(x, y, alpha=alpha, genes=genes)
    x64 = np.asarray(x, dtype=np.float64)
    sd = x64.std(0)
    xs = (x64 - x64.mean(0)) / np.where(sd < 1e-8, 1.0, sd)
    gene_mse = block_cv_gene_mse(xs, y, spatial_blocks(centres, groups), Default.PROBE_ALPHAS)
    scores = {a: float(np.mean(e)) for a, e in gene_mse.items()}
    a = min(scores, key=lambda k: scores[k])
    probe = predictors.fit_probe(x, y, alpha=a, genes=genes)
    probe.alpha_scores = scores
    probe.alpha_rule = f"{N_BLOCKS} spatial blocks per section"
    # the residual variance of the spread: held-out contiguous tissue, not leave-one-out (which a
    # spot's correlated neighbours make optimistic, as for the penalty)
    probe.set_resid_var(gene_mse[a], probe.alpha_rule)
    return probe
