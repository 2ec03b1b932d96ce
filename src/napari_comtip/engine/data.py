"""Training data: gene panel rule, on-disk patch cache, augmentation, gene sentences.

Pieces, each usable alone:

* :func:`select_gene_panel` -- the documented panel rule (stored in every checkpoint):
  genes present in *all* training sections and detected in at least ``min_spot_frac`` of the
  training spots; the top ``n_hvg`` by Seurat-style normalised dispersion of the pooled
  log-normalised training spots, plus the top ``n_mean`` by mean log-normalised expression
  (union; HVGs first by rank, then the added high-mean genes by rank). With the defaults
  (1000 + 250) this gives about 1,240 genes on her2st, the panel size of peers.md.
* :class:`PatchCache` -- spot patches (and unlabelled tissue patches) cut once from the slide
  and stored as ``.npy`` under ``cache_dir("patches")``, keyed by the sample's image identity,
  the exact patch centres, ``patch_um`` and the output size; epochs then never decode slides.
* :func:`tissue_centres` -- centres of unlabelled tissue patches between and around the spots
  (for vision-only MFM batches).
* :class:`Augment` -- seeded flips, 90 degree rotations, HED stain jitter and
  brightness/contrast/saturation jitter on uint8 patch batches (staining differs strongly
  between patients, peers.md).
* :func:`expressed_sentences` -- gene sentences weighted towards expressed genes (names+values).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..constants import Key
from ..errors import InputError
from ..io.tissue import tissue_mask

ProgressFn = Callable[[int, "int | None", "str | None"], None]


# --------------------------------------------------------------------------- data config
@dataclass
class DataConfig:
    """The ``data:`` section of a training config (see training/configs/*.yaml)."""

    n_hvg: int = 1000  # panel: top-N by normalised dispersion
    n_mean: int = 250  # panel: plus top-N by mean log-normalised expression
    min_spot_frac: float = 0.01  # panel: gene detected in at least this fraction of training spots
    min_shared_genes: float = 0.5  # a training sample must carry this fraction of the panel
    unlabelled: bool = True  # vision-only tissue patches for the MFM term
    unlabelled_per_sample: int = 1500  # cap on unlabelled tissue patches per sample
    unlabelled_batch: int = 32  # vision-only patches per step
    tissue_frac: float = 0.5  # unlabelled patch must be at least this fraction tissue
    # augmentation
    flips: bool = True
    rot90: bool = True
    hed_sigma: float = 0.05  # HED stain jitter: per-channel scale ~ 1 + N(0, sigma)
    hed_bias: float = 0.02  # and shift ~ N(0, bias) in optical density
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    # gene sentences (names+values mode); lengths / single-gene share come from model.text
    sentence_sampler: str = "expressed"  # "expressed": weighted towards expressed genes; "uniform": the model's sampler
    expressed_weight: float = 10.0  # "expressed": sampling weight of an expressed gene (a zero has 1)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


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


# --------------------------------------------------------------------------- patch cache
def _cache_root() -> Path:
    from ..io.cache import cache_dir

    return Path(cache_dir("patches"))


def _patch_key(identity: str, centres_rc: np.ndarray, patch_um: float, out_px: int, mpp: float, kind: str) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"id": identity, "patch_um": float(patch_um), "out_px": int(out_px),
                         "mpp": round(float(mpp), 6), "kind": kind, "v": 1}).encode())
    h.update(np.round(np.asarray(centres_rc, dtype=np.float64), 3).tobytes())
    return h.hexdigest()[:24]


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    from ..io.writers import atomic_replace

    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, arr)

    atomic_replace(path, write, ".npy")


def read_patches(sample, centres_rc: np.ndarray, patch_um: float, out_px: int, *,
                 progress: ProgressFn | None = None, cancel=None, num_workers: int = 2) -> np.ndarray:
    """Cut (N, out_px, out_px, 3) uint8 patches of ``patch_um`` centred on ``centres_rc``."""
    from ..errors import Cancelled
    from ..io.patches import patch_geometry, read_patch

    side = patch_geometry(sample.mpp, patch_um, out_px)
    n = len(centres_rc)
    out = np.empty((n, out_px, out_px, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = read_patch(sample.image, tuple(centres_rc[i]), side, out_px)

    chunk = 64
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for s in range(0, n, chunk):
            if cancel is not None and cancel():
                raise Cancelled("patch extraction cancelled")
            list(pool.map(one, range(s, min(n, s + chunk))))
            if progress is not None:
                progress(min(n, s + chunk), n, f"patches {sample.name}")
    return out


class PatchCache:
    """Patches of a sample computed once and stored on disk (``.npy``), then memory-mapped."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else None

    def _dir(self) -> Path:
        return self.root if self.root is not None else _cache_root()

    def get(self, sample, centres_rc: np.ndarray, patch_um: float, out_px: int, kind: str = "spots", *,
            progress: ProgressFn | None = None, cancel=None) -> np.ndarray:
        key = _patch_key(sample.identity, centres_rc, patch_um, out_px, sample.mpp, kind)
        path = self._dir() / f"{kind}-{key}.npy"
        if path.exists():
            try:
                arr = np.load(path, mmap_mode="r")
                if arr.shape == (len(centres_rc), out_px, out_px, 3):
                    return arr
            except (ValueError, OSError):
                pass  # a damaged cache file is rebuilt
        arr = read_patches(sample, centres_rc, patch_um, out_px, progress=progress, cancel=cancel)
        _save_npy_atomic(path, arr)
        return np.load(path, mmap_mode="r")

    def spots(self, sample, patch_um: float, out_px: int, **kw) -> np.ndarray:
        return self.get(sample, sample.centers_rc(), patch_um, out_px, "spots", **kw)


def tissue_centres(sample, patch_um: float, *, max_n: int = 1500, tissue_frac: float = 0.5,
                   seed: int = 0, thumb_side: int = 1024) -> np.ndarray:
    """Centres (row, col) of unlabelled tissue patches on a grid between and around the spots.

    Tissue: :func:`napari_comtip.io.tissue.tissue_mask` of a thumbnail; a grid of step ``patch side / 3``; a position is kept when its patch area is at least ``tissue_frac`` tissue and its
    centre is at least half a patch side from every spot centre. At most ``max_n``, chosen
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
    if len(cand) and sample.n_spots:
        spots = sample.centers_rc()
        d2 = ((cand[:, None, :] - spots[None, :, :]) ** 2).sum(-1).min(1)
        cand = cand[d2 >= (side / 2) ** 2]
    if len(cand) > max_n:
        rng = np.random.default_rng(seed)
        cand = cand[np.sort(rng.choice(len(cand), size=max_n, replace=False))]
    return cand


# --------------------------------------------------------------------------- augmentation
# Ruifrok & Johnston H&E-DAB stain matrix (as skimage.color.rgb_from_hed)
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


class Augment:
    """Seeded augmentation of (B, H, W, 3) uint8 patch batches; returns uint8.

    Every random draw comes from the ``torch.Generator`` passed in, so a step's augmentation
    depends only on (seed, step): resuming a run reproduces it exactly.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.hed_from_rgb = torch.tensor(_HED_FROM_RGB, dtype=torch.float32)
        self.rgb_from_hed = torch.tensor(_RGB_FROM_HED, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.cfg
        B = x.shape[0]
        if B == 0:
            return x
        if c.flips:
            f = torch.rand(B, generator=gen) < 0.5
            if f.any():
                x = x.clone()
                x[f] = torch.flip(x[f], dims=[2])
        if c.rot90:
            k = torch.randint(0, 4, (B,), generator=gen)
            x = torch.stack([torch.rot90(x[i], int(k[i]), dims=(0, 1)) for i in range(B)])
        need_colour = c.hed_sigma > 0 or c.hed_bias > 0 or c.brightness > 0 or c.contrast > 0 or c.saturation > 0
        if not need_colour:
            return x.contiguous()
        xf = x.float() / 255.0
        if c.hed_sigma > 0 or c.hed_bias > 0:
            od = -torch.log(torch.clamp(xf, min=1e-6) * (255.0 / 256.0) + 1.0 / 256.0)  # optical density
            hed = od @ self.hed_from_rgb
            scale = 1 + c.hed_sigma * torch.randn(B, 1, 1, 3, generator=gen)
            bias = c.hed_bias * torch.randn(B, 1, 1, 3, generator=gen)
            hed = hed * scale + bias
            od = hed @ self.rgb_from_hed
            xf = torch.clamp((torch.exp(-od) - 1.0 / 256.0) * (256.0 / 255.0), 0, 1)
        if c.brightness > 0:
            xf = xf * (1 + c.brightness * (2 * torch.rand(B, 1, 1, 1, generator=gen) - 1))
        if c.contrast > 0:
            m = xf.mean(dim=(1, 2, 3), keepdim=True)
            xf = (xf - m) * (1 + c.contrast * (2 * torch.rand(B, 1, 1, 1, generator=gen) - 1)) + m
        if c.saturation > 0:
            grey = (xf * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
            xf = (xf - grey) * (1 + c.saturation * (2 * torch.rand(B, 1, 1, 1, generator=gen) - 1)) + grey
        return torch.clamp(xf * 255.0 + 0.5, 0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- gene sentences
def expressed_sentences(expr: torch.Tensor, text_cfg, weight: float, gen: torch.Generator,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training sentences for ``names+values`` mode, weighted towards expressed genes.

    A panel of ~1,200 genes is mostly zeros in any one spot: uniform subsets of 32 genes carry
    almost no signal for the contrastive loss. Here each spot's genes are drawn without
    replacement with weight ``weight`` for an expressed gene and 1 for a zero (Gumbel top-k),
    so sentences hold mostly expressed genes and still some zeros. Lengths are drawn like
    :func:`napari_comtip.model.text.sample_gene_subsets` (log-uniform in [min_genes, max_genes],
    one gene with probability ``p_single``), so single-gene zero-shot sentences stay
    in-distribution.
    """
    import math

    b, g = expr.shape
    lo, hi = min(text_cfg.min_genes, g), min(text_cfg.max_genes, g)
    u = torch.rand(b, generator=gen)
    sizes = torch.exp(math.log(lo) + u * (math.log(hi + 1) - math.log(lo))).floor().long().clamp(lo, hi)
    if text_cfg.p_single > 0:
        single = torch.rand(b, generator=gen) < text_cfg.p_single
        sizes = torch.where(single, torch.ones_like(sizes), sizes)
    length = int(sizes.max())
    w = torch.where(expr > 0, torch.full_like(expr, float(weight)), torch.ones_like(expr))
    r = torch.rand(b, g, generator=gen).clamp_(1e-12, 1 - 1e-7)
    keys = torch.log(w) - torch.log(-torch.log(r))
    idx = keys.topk(length, dim=1).indices
    mask = torch.arange(length).unsqueeze(0) < sizes.unsqueeze(1)
    return idx, expr.float().gather(1, idx), mask


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

    @property
    def n_spots(self) -> int:
        return int(self.patches.shape[0])


def build_training_set(samples: Sequence, cfg: DataConfig, *, patch_um: float, img_size: int,
                       panel: Sequence[str] | None = None, cache: PatchCache | None = None,
                       seed: int = 0, progress: ProgressFn | None = None, cancel=None) -> TrainingSet:
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
        libs.append(np.log1p(np.asarray(ad.X.sum(axis=1), dtype=np.float64).ravel()))
        patches.append(np.asarray(cache.spots(s, patch_um, img_size, progress=progress, cancel=cancel)))
        owner.append(np.full(s.n_spots, i))
        centres.append(s.centers_rc())
        ids.extend(f"{s.name}:{x}" for x in spot_ids)
        if cfg.unlabelled and cfg.unlabelled_per_sample > 0:
            c = tissue_centres(s, patch_um, max_n=cfg.unlabelled_per_sample, tissue_frac=cfg.tissue_frac, seed=seed)
            if len(c):
                unl.append(np.asarray(cache.get(s, c, patch_um, img_size, "tissue", progress=progress, cancel=cancel)))
    return TrainingSet(
        panel=panel,
        patches=np.concatenate(patches, 0),
        expr=np.concatenate(exprs, 0).astype(np.float32),
        sample_of=np.concatenate(owner, 0),
        names=[s.name for s in samples],
        spot_ids=ids,
        unlabelled=np.concatenate(unl, 0) if unl else None,
        info={"n_unlabelled": int(sum(len(u) for u in unl))},
        centres_rc=np.concatenate(centres, 0),
        library_z=_standardised(np.concatenate(libs, 0)),
    )


def _standardised(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return ((x - x.mean()) / (sd if sd > 1e-8 else 1.0)).astype(np.float32)


__all__ = [
    "DataConfig", "select_gene_panel", "panel_matrix", "lognorm_matrix", "PatchCache", "read_patches",
    "tissue_centres", "Augment", "expressed_sentences", "TrainingSet", "build_training_set",
]
