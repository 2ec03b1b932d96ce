"""Training data: what to train on, the gene panel rule, the training set of a run.

Pieces, each usable alone:

* :class:`DataSpec` / :func:`resolve_data_specs` / :func:`load_training_samples` -- the samples
  of ``comtip pretrain --data ... --sample ...``;

* :func:`select_gene_panel` -- the documented panel rule (stored in every checkpoint):
  genes present in *all* training sections and detected in at least ``min_spot_frac`` of the
  training spots; the top ``n_hvg`` by Seurat-style normalised dispersion of the pooled
  log-normalised training spots, plus the top ``n_mean`` by mean log-normalised expression
  (union; HVGs first by rank, then the added high-mean genes by rank). With the defaults
  (1000 + 250) this gives about 1,240 genes on her2st, the panel size of peers.md.
* :func:`tissue_centres` -- centres of unlabelled tissue patches between and around the spots
  (for vision-only MFM batches).
* :func:`build_training_set` -- panel, spot patches and tissue patches in memory
  (:class:`TrainingSet`); the patches come from the on-disk cache of ``engine/patch_cache.py``.

The ``data:`` config section is :class:`engine.run_config.DataConfig`; augmentation and the
gene sentences of a step are in ``engine/batches.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..constants import Key
from ..errors import InputError
from ..io.tissue import tissue_mask
from ..progress import Cancel, Progress
from .patch_cache import PatchCache
from .run_config import DataConfig


# --------------------------------------------------------------------------- gene panel
def _dense(m) -> np.ndarray:
    if hasattr(m, "toarray"):
        m = m.toarray()
    return np.asarray(m, dtype=np.float32)


def lognorm_matrix(adata) -> np.ndarray:
    """The (spots, genes) log-normalised matrix of an AnnData (computed when the layer is absent)."""
    if Key.LOGNORM not in adata.layers:
        from ..io.expression import normalize_log1p

        normalize_log1p(adata)
    return _dense(adata.layers[Key.LOGNORM])


def select_gene_panel(adatas: Sequence, n_hvg: int = 1000, n_mean: int = 250,
                      min_spot_frac: float = 0.01, names: Sequence[str] | None = None) -> list[str]:
    """The gene panel rule (see module docstring). ``adatas`` are the training sections."""
    if not adatas:
        raise InputError("no training sample to choose a gene panel from")
    names = list(names) if names is not None else [f"sample {i}" for i in range(len(adatas))]
    common = None
    for ad in adatas:
        g = set(map(str, ad.var_names))
        common = g if common is None else common & g
    common_list = sorted(common or [])
    if not common_list:
        raise InputError("the training samples share no gene symbol",
                         hint="train on samples measured with overlapping gene sets")
    mats = []
    counts_detected = np.zeros(len(common_list))
    for ad in adatas:
        col = {g: i for i, g in enumerate(map(str, ad.var_names))}
        idx = np.array([col[g] for g in common_list])
        ln = lognorm_matrix(ad)[:, idx]
        mats.append(ln)
        counts_detected += (ln > 0).sum(axis=0)
    X = np.concatenate(mats, axis=0).astype(np.float64)
    n_spots = X.shape[0]
    keep = counts_detected >= max(1.0, min_spot_frac * n_spots)
    genes = np.asarray(common_list)[keep]
    X = X[:, keep]
    mean = X.mean(axis=0)
    # Seurat flavour: dispersion of expm1 values, z-scored within 20 bins of mean
    E = np.expm1(X)
    m_e = E.mean(axis=0)
    v_e = E.var(axis=0, ddof=1) if n_spots > 1 else np.zeros_like(m_e)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(np.where(m_e > 0, v_e / np.maximum(m_e, 1e-12), np.nan))
        lmean = np.log1p(m_e)
    bins = np.minimum((np.digitize(lmean, np.linspace(lmean.min(), lmean.max() + 1e-9, 21)) - 1), 19)
    ndisp = np.full_like(disp, -np.inf)
    for b in np.unique(bins):
        sel = (bins == b) & np.isfinite(disp)
        if sel.sum() == 0:
            continue
        d = disp[sel]
        sd = d.std(ddof=1) if sel.sum() > 1 else 0.0
        ndisp[sel] = (d - d.mean()) / sd if sd > 0 else 1.0  # single-gene bins: seurat sets 1
    ndisp = np.where(np.isfinite(ndisp), ndisp, -np.inf)
    hvg_order = np.lexsort((genes, -ndisp))[: min(n_hvg, len(genes))]
    mean_order = np.lexsort((genes, -mean))[: min(n_mean, len(genes))]
    panel: list[str] = [str(genes[i]) for i in hvg_order]
    seen = set(panel)
    for i in mean_order:
        g = str(genes[i])
        if g not in seen:
            panel.append(g)
            seen.add(g)
    return panel


def panel_matrix(adata, panel: Sequence[str], sample_name: str = "", path=None,
                 min_shared: float = 0.5) -> np.ndarray:
    """(spots, len(panel)) log-normalised expression of ``adata`` over ``panel``.

    Genes of the panel missing from the sample are 0; a sample sharing fewer than
    ``min_shared`` of the panel raises :class:`InputError`.
    """
    col = {g: i for i, g in enumerate(map(str, adata.var_names))}
    present = [g in col for g in panel]
    frac = float(np.mean(present)) if len(panel) else 0.0
    if frac < min_shared:
        raise InputError(
            f"sample {sample_name!r} shares only {sum(present)} of the {len(panel)} panel genes "
            f"({frac:.0%} < {min_shared:.0%})",
            path=path,
            hint="use gene symbols as var_names, or train/predict with a panel chosen from matching data",
        )
    ln = lognorm_matrix(adata)
    out = np.zeros((adata.n_obs, len(panel)), dtype=np.float32)
    for j, g in enumerate(panel):
        if g in col:
            out[:, j] = ln[:, col[g]]
    return out


def tissue_centres(sample, patch_um: float, *, max_n: int = 1500, tissue_frac: float = 0.5,
                   seed: int = 0, thumb_side: int = 1024, avoid_spots: bool = True) -> np.ndarray:
    """Centres (row, col) of unlabelled tissue patches on a grid between and around the spots.

    Tissue: :func:`napari_comtip.io.tissue.tissue_mask` of a thumbnail; a grid of step ``patch side / 3``; a position is kept when its patch area is at least ``tissue_frac`` tissue and its
    centre is at least half a patch side from every spot centre (``avoid_spots``; off for a
    slide read for its tissue alone, ``data.tissue_only``). At most ``max_n``, chosen
    with a seeded generator.
    """
    img = sample.image
    thumb = np.asarray(img.thumbnail(thumb_side))
    H, W = img.shape[:2]
    sy, sx = H / thumb.shape[0], W / thumb.shape[1]
    tissue = tissue_mask(thumb)
    side = patch_um / sample.mpp  # full-res px
    step = side / 3
    rows = np.arange(side / 2, H - side / 2, step)
    cols = np.arange(side / 2, W - side / 2, step)
    if len(rows) == 0 or len(cols) == 0:
        return np.zeros((0, 2))
    # integral image for tissue fraction of each patch
    ii = np.pad(tissue.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    r0 = np.clip(((rr - side / 2) / sy).astype(int), 0, tissue.shape[0])
    r1 = np.clip(((rr + side / 2) / sy).astype(int), 0, tissue.shape[0])
    c0 = np.clip(((cc - side / 2) / sx).astype(int), 0, tissue.shape[1])
    c1 = np.clip(((cc + side / 2) / sx).astype(int), 0, tissue.shape[1])
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    frac = (ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0]) / area
    cand = np.stack([rr[frac >= tissue_frac], cc[frac >= tissue_frac]], axis=1)
    if len(cand) and sample.n_spots and avoid_spots:
        spots = sample.centers_rc()
        d2 = ((cand[:, None, :] - spots[None, :, :]) ** 2).sum(-1).min(1)
        cand = cand[d2 >= (side / 2) ** 2]
    if len(cand) > max_n:
        rng = np.random.default_rng(seed)
        cand = cand[np.sort(rng.choice(len(cand), size=max_n, replace=False))]
    return cand


# --------------------------------------------------------------------------- training set
@dataclass
class TrainingSet:
    """Everything an epoch needs, in memory: spot patches, panel expression, tissue patches."""

    panel: list[str]
    patches: np.ndarray  # (N, S, S, 3) uint8
    expr: np.ndarray  # (N, G) float32 log-normalised over the panel
    sample_of: np.ndarray  # (N,) int index into names
    names: list[str]
    spot_ids: list[str]
    unlabelled: np.ndarray | None = None  # (U, S, S, 3) uint8
    centres_rc: np.ndarray | None = None  # (N, 2) spot centres (row, col), full-resolution px of their sample
    library_z: np.ndarray | None = None  # (N,) log total counts, standardised over these spots (library token)
    info: dict[str, Any] = field(default_factory=dict)
    # spots with expression but no image (data.expression_only): panel expression and library token
    # value (standardised with the training spots' mean and sd), for the expression-only term
    text_only_expr: np.ndarray | None = None  # (M, G) float32
    text_only_library_z: np.ndarray | None = None  # (M,)

    @property
    def n_spots(self) -> int:
        return int(self.patches.shape[0])


def build_training_set(samples: Sequence, cfg: DataConfig, *, patch_um: float, img_size: int,
                       panel: Sequence[str] | None = None, cache: PatchCache | None = None,
                       seed: int = 0, progress: Progress | None = None, cancel: Cancel | None = None) -> TrainingSet:
    """Panel (chosen here unless given), spot patches and tissue patches of the training samples."""
    for s in samples:
        if s.expression is None or s.expression.n_obs == 0:
            raise InputError(f"sample {s.name!r} has no expression data; pretraining needs spots with counts",
                             path=s.provenance.get("source") or s.provenance.get("image"),
                             hint="give a dataset with a count matrix (or drop this sample)")
    if panel is None:
        panel = select_gene_panel([s.expression for s in samples], cfg.n_hvg, cfg.n_mean,
                                  cfg.min_spot_frac, names=[s.name for s in samples])
    panel = list(panel)
    cache = cache or PatchCache()
    patches, exprs, owner, ids, unl, centres, libs = [], [], [], [], [], [], []
    for i, s in enumerate(samples):
        ad = s.expression
        # align expression rows to the spot table
        spot_ids = [str(x) for x in s.spots.index]
        if list(map(str, ad.obs_names)) != spot_ids:
            ad = ad[spot_ids]
        exprs.append(panel_matrix(ad, panel, s.name, s.provenance.get("source"), cfg.min_shared_genes))
        libs.append(_log_library(ad))
        patches.append(np.asarray(cache.spots(s, patch_um, img_size, progress=progress, cancel=cancel)))
        owner.append(np.full(s.n_spots, i))
        centres.append(s.centers_rc())
        ids.extend(f"{s.name}:{x}" for x in spot_ids)
        if cfg.unlabelled and cfg.unlabelled_per_sample > 0:
            c = tissue_centres(s, patch_um, max_n=cfg.unlabelled_per_sample, tissue_frac=cfg.tissue_frac, seed=seed)
            if len(c):
                unl.append(np.asarray(cache.get(s, c, patch_um, img_size, "tissue", progress=progress, cancel=cancel)))
    tissue_names = []
    if cfg.unlabelled and cfg.unlabelled_per_sample > 0:
        for name, tissue in tissue_only_patches(cfg, patch_um, img_size, cache, seed, progress, cancel):
            unl.append(tissue)
            tissue_names.append(name)
    lib = np.concatenate(libs, 0)
    text_only, text_only_lib, text_only_names = expression_only_set(cfg, panel, lib)
    return TrainingSet(
        panel=panel,
        patches=np.concatenate(patches, 0),
        expr=np.concatenate(exprs, 0).astype(np.float32),
        sample_of=np.concatenate(owner, 0),
        names=[s.name for s in samples],
        spot_ids=ids,
        unlabelled=np.concatenate(unl, 0) if unl else None,
        info={"n_unlabelled": int(sum(len(u) for u in unl)), **({"tissue_only": tissue_names} if tissue_names else {}),
              **({"expression_only": text_only_names, "n_expression_only": int(len(text_only))} if text_only_names else {})},
        centres_rc=np.concatenate(centres, 0),
        library_z=_standardised(lib),
        text_only_expr=text_only if text_only_names else None,
        text_only_library_z=text_only_lib if text_only_names else None,
    )


def _standardised(x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    ref = x if ref is None else ref
    sd = float(ref.std())
    return ((x - ref.mean()) / (sd if sd > 1e-8 else 1.0)).astype(np.float32)


def _log_library(ad) -> np.ndarray:
    return np.log1p(np.asarray(ad.X.sum(axis=1), dtype=np.float64).ravel())


def tissue_only_patches(cfg: DataConfig, patch_um: float, img_size: int, cache: PatchCache, seed: int = 0,
                        progress: Progress | None = None, cancel: Cancel | None = None):
    """``(path:sample, patches)`` of every readable sample of ``cfg.tissue_only``: up to
    ``unlabelled_per_sample`` tissue patches each, spots included (their counts are never read)."""
    from ..io import list_samples, load_sample

    for path in cfg.tissue_only:
        for name in list_samples(path) or [None]:
            s = load_sample(path, sample=name, progress=progress)
            c = tissue_centres(s, patch_um, max_n=cfg.unlabelled_per_sample, tissue_frac=cfg.tissue_frac, seed=seed,
                               avoid_spots=False)
            if not len(c):
                raise InputError(f"no tissue patch found in sample {s.name!r} of data.tissue_only", path=path,
                                 hint="check the slide, or lower data.tissue_frac")
            yield f"{path}:{s.name}", np.asarray(cache.get(s, c, patch_um, img_size, "tissue", progress=progress, cancel=cancel))


def expression_only_set(cfg: DataConfig, panel: Sequence[str], train_library: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Panel expression (M, G), library token values (M,) and ``path:section`` names of the spots of
    ``cfg.expression_only`` (io/expression_only.py); each section must share ``min_shared_genes`` of
    the panel. The library values are standardised with the *training* spots' ``train_library``, so a
    token means the same depth in both."""
    from ..io.expression_only import read_expression_only

    exprs, libs, names = [], [], []
    for path in cfg.expression_only:
        for name, ad in read_expression_only(path):
            exprs.append(panel_matrix(ad, panel, name, path, cfg.min_shared_genes))
            libs.append(_log_library(ad))
            names.append(f"{path}:{name}")
    if not names:
        return np.zeros((0, len(panel)), np.float32), np.zeros(0, np.float32), []
    return (np.concatenate(exprs, 0).astype(np.float32), _standardised(np.concatenate(libs, 0), train_library), names)


# --------------------------------------------------------------------------- what to train on
@dataclass
class DataSpec:
    """One training sample: a dataset path and an optional sample name inside it."""

    path: str
    sample: str | None = None

    def label(self) -> str:
        return f"{self.path}" + (f" [{self.sample}]" if self.sample else "")


def resolve_data_specs(data: Sequence[str], samples: Sequence[str] | None) -> list[DataSpec]:
    """The CLI's ``--data``/``--sample`` rule: one --data with several --sample -> all from it;
    several --data with --sample -> one sample per --data; no --sample -> every sample of each."""
    from ..io import list_samples

    data = list(data)
    if samples:
        if len(data) == 1:
            return [DataSpec(data[0], s) for s in samples]
        if len(samples) != len(data):
            raise InputError(f"got {len(data)} --data and {len(samples)} --sample",
                             hint="give one --sample per --data, or one --data with several --sample")
        return [DataSpec(p, s) for p, s in zip(data, samples)]
    out: list[DataSpec] = []
    for p in data:
        names = list_samples(p)
        if len(names) > 1:
            out.extend(DataSpec(p, n) for n in names)
        else:
            out.append(DataSpec(p, names[0] if names else None))
    return out


def load_training_samples(specs: Sequence[DataSpec | str | tuple], progress=None) -> list:
    from ..io import load_sample

    out = []
    for s in specs:
        if isinstance(s, str):
            s = DataSpec(s)
        elif isinstance(s, tuple):
            s = DataSpec(*s)
        if hasattr(s, "image") and hasattr(s, "spots"):  # already a SpatialSample
            out.append(s)
            continue
        sample = load_sample(s.path, sample=s.sample, progress=progress)
        if sample.expression is None:
            raise InputError(f"sample {sample.name!r} has no expression data; pretraining needs spots with counts",
                             path=s.path, hint="give a dataset with a count matrix (or drop this --data)")
        out.append(sample)
    return out


__all__ = [
    "select_gene_panel", "panel_matrix", "lognorm_matrix", "tissue_centres", "TrainingSet",
    "build_training_set", "tissue_only_patches", "expression_only_set", "DataSpec", "resolve_data_specs", "load_training_samples",
]
