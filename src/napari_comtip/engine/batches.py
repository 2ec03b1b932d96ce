"""What one training step sees: a seeded batch of augmented spot patches and gene sentences.

* :class:`BatchSet` -- item ``i`` is the whole batch ``i`` of an epoch, built from ``(seed, step,
  rank)`` alone, so 0 or many DataLoader workers give the same batches and a resumed run needs no
  replay;
* :class:`Augment` -- seeded flips, 90 degree rotations, HED stain jitter and
  brightness/contrast/saturation jitter on uint8 patch batches (staining differs strongly
  between patients, peers.md);
* :func:`expressed_sentences` -- gene sentences weighted towards expressed genes (names+values);
* :func:`random_crops` -- the image self-distillation's second views (``model.w_image_ssl``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.sentences import draw_sentence_sizes, gene_z, gene_z_stats, sample_gene_subsets, spot_rank
from .data import TrainingSet
from .distributed import Dist
from .run_config import DataConfig, RunConfig


def step_seed(seed: int, step: int, rank: int, salt: int) -> int:
    # a fixed mixing of the four numbers; same on every machine and run
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + salt * 15_485_863) % (2**63 - 1)


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


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


def random_crops(x: torch.Tensor, gen: torch.Generator, min_scale: float) -> torch.Tensor:
    """A random square crop of each uint8 patch ``x`` (B, S, S, 3), of an area fraction drawn
    uniformly in [``min_scale``, 1] and anywhere in the patch, resized back to S (bilinear)."""
    b, side = x.shape[0], x.shape[1]
    if b == 0 or min_scale >= 1.0:
        return x
    frac = min_scale + (1.0 - min_scale) * torch.rand(b, generator=gen)
    sides = torch.clamp((frac.sqrt() * side).round().long(), 2, side)
    u, v = torch.rand(b, generator=gen), torch.rand(b, generator=gen)
    out = torch.empty_like(x)
    for i in range(b):
        c = int(sides[i])
        r0, c0 = int(u[i] * (side - c + 1)), int(v[i] * (side - c + 1))
        crop = x[i, r0:r0 + c, c0:c0 + c].permute(2, 0, 1).unsqueeze(0).float()
        crop = torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False)
        out[i] = crop[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------- gene sentences
def expressed_sentences(expr: torch.Tensor, text_cfg, weight: float, gen: torch.Generator,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training sentences for ``names+values`` mode, weighted towards expressed genes.

    A panel of ~1,200 genes is mostly zeros in any one spot: uniform subsets of 32 genes carry
    almost no signal for the contrastive loss. Here each spot's genes are drawn without
    replacement with weight ``weight`` for an expressed gene and 1 for a zero (Gumbel top-k),
    so sentences hold mostly expressed genes and still some zeros. Lengths are drawn like
    :func:`napari_comtip.model.sentences.sample_gene_subsets` (log-uniform in [min_genes, max_genes],
    one gene with probability ``p_single``), so single-gene zero-shot sentences stay
    in-distribution.
    """
    b, g = expr.shape
    sizes = draw_sentence_sizes(text_cfg, g, b, gen)
    length = int(sizes.max())
    w = torch.where(expr > 0, torch.full_like(expr, float(weight)), torch.ones_like(expr))
    r = torch.rand(b, g, generator=gen).clamp_(1e-12, 1 - 1e-7)
    keys = torch.log(w) - torch.log(-torch.log(r))
    idx = keys.topk(length, dim=1).indices
    mask = torch.arange(length).unsqueeze(0) < sizes.unsqueeze(1)
    return idx, expr.float().gather(1, idx), mask


def shared_sentences(expr: torch.Tensor, text_cfg, weight: float, gen: torch.Generator,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training sentences with **one gene set for the whole batch** (``data.sentence_sampler: shared``).

    With a set drawn per spot (:func:`expressed_sentences`), two spots' sentences differ first by
    *which* genes were drawn, at random, and an image cannot tell which genes its sentence will
    hold: the contrastive loss then has little to learn from. With the batch's spots sharing
    their genes, their sentences differ only by the values, the expression the image must
    explain, and a one-gene batch is exactly zero-shot's question (which spot has most of gene g).
    The length is drawn once per batch like :func:`expressed_sentences`; genes without replacement
    with weight ``1 + (weight - 1) * f`` for a gene detected in a fraction ``f`` of the batch's spots.
    """
    b, g = expr.shape
    size = int(draw_sentence_sizes(text_cfg, g, 1, gen)[0])
    frac = (expr > 0).float().mean(0)
    w = 1.0 + (float(weight) - 1.0) * frac
    r = torch.rand(g, generator=gen).clamp_(1e-12, 1 - 1e-7)
    keys = torch.log(w) - torch.log(-torch.log(r))
    idx = keys.topk(size).indices.unsqueeze(0).expand(b, size).contiguous()
    return idx, expr.float().gather(1, idx), torch.ones(b, size, dtype=torch.bool)


# --------------------------------------------------------------------------- batches
def section_batches(sample_of: np.ndarray, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
    """One epoch's batches when each is drawn from one section (``data.batches: per_section``):
    every section's spots shuffled and split into ceil(n / batch_size) batches of near-equal size
    (none larger than ``batch_size``, no spot twice), then the batches of all sections shuffled."""
    groups = np.asarray(sample_of)
    out: list[np.ndarray] = []
    for k in np.unique(groups):
        rows = np.flatnonzero(groups == k)
        rows = rows[torch.randperm(len(rows), generator=gen).numpy()]
        out.extend(np.array_split(rows, -(-len(rows) // batch_size)))
    return [out[j] for j in torch.randperm(len(out), generator=gen).tolist()]


class BatchSet(torch.utils.data.Dataset):
    """Item ``i`` = the whole batch ``i`` of an epoch, built deterministically from (seed, step).

    Works the same with 0 or many DataLoader workers, and resuming at batch ``i`` needs no
    replay of earlier batches.
    """

    def __init__(self, ts: TrainingSet, cfg: RunConfig, epoch: int, steps_per_epoch: int, dist: Dist,
                 augment: Augment, pixels: bool = True):
        self.ts, self.cfg, self.epoch, self.spe, self.dist, self.aug = ts, cfg, epoch, steps_per_epoch, dist, augment
        self.pixels = pixels  # False (feature cache): item 0 is the spot indices, the cache has the images
        seed = cfg.training.seed
        gen = generator(step_seed(seed, epoch, 0, 1))
        B = cfg.training.batch_size
        if cfg.data.batches == "per_section":
            batches = section_batches(ts.sample_of, B, gen)
            self.batches = batches[dist.rank::dist.world]  # this rank's share of the epoch
        else:
            order = torch.randperm(ts.n_spots, generator=gen)[dist.rank::dist.world].numpy()
            self.batches = [order[i:i + B] for i in range(0, len(order), B)]
        # gene_z sentence values: the same statistics the model stores (CoMTIP.set_gene_stats)
        self.zstats = gene_z_stats(ts.expr) if cfg.model.text.value_transform == "gene_z" else None

    def __len__(self):
        return self.spe

    def __getitem__(self, i: int):
        step = self.epoch * self.spe + i
        idx = self.batches[i]
        idx_sorted = np.sort(idx)
        g = generator(step_seed(self.cfg.training.seed, step, self.dist.rank, 2))
        if self.pixels:
            pos = {v: k for k, v in enumerate(idx_sorted)}
            patches = np.asarray(self.ts.patches[idx_sorted])[[pos[v] for v in idx]]
            imgs = self.aug(torch.from_numpy(patches), g)
        else:
            imgs = torch.from_numpy(idx.astype(np.int64))
        expr = torch.from_numpy(np.asarray(self.ts.expr[idx]))
        # the profile and value-grid terms' input: the log-normalised vector itself (empty when both are off)
        m = self.cfg.model
        profile = expr.float() if m.w_profile > 0 or m.w_grid > 0 else torch.zeros((0, expr.shape[1]))
        lib = None if self.ts.library_z is None else self.ts.library_z[idx]
        gene_idx, values, mask = self.sentences(expr, lib, g)
        dc = self.cfg.data
        extra = torch.zeros((0,) + tuple(imgs.shape[1:]), dtype=torch.uint8)
        raw_extra = None
        if self.pixels and self.ts.unlabelled is not None and dc.unlabelled and dc.unlabelled_batch > 0 and (
                m.w_mfm > 0 or m.w_image_ssl > 0):
            u = torch.randint(0, len(self.ts.unlabelled), (dc.unlabelled_batch,), generator=g).numpy()
            us = np.sort(u)
            raw_extra = torch.from_numpy(np.array(self.ts.unlabelled[us]))  # a writable copy of the (read-only) cache
            extra = self.aug(raw_extra, g)
        second = torch.zeros((0,) + tuple(imgs.shape[1:]), dtype=torch.uint8)
        if self.pixels and m.w_image_ssl > 0:  # drawn from their own stream: the first views stay as without the term
            raw = torch.from_numpy(patches) if raw_extra is None else torch.cat([torch.from_numpy(patches), raw_extra])
            g2 = generator(step_seed(self.cfg.training.seed, step, self.dist.rank, 4))
            second = random_crops(self.aug(raw, g2), g2, m.image_ssl.crop_scale)
        return imgs, gene_idx, values, mask, extra, profile, self.ssl_views(g), second

    def sentences(self, expr: torch.Tensor, library_z: np.ndarray | None, g: torch.Generator,
                  sampler_name: str | None = None):
        """Gene sentences ``(gene_idx, values, mask)`` of log-normalised spots ``expr`` (B, G), as the
        run's text config draws them (sampler, value transform, library-size token); ``sampler_name``
        replaces ``data.sentence_sampler``."""
        dc, tc = self.cfg.data, self.cfg.model.text
        name = sampler_name or dc.sentence_sampler
        if tc.value_transform == "spot_rank":
            expr = spot_rank(expr)
        if tc.mode == "names+values" and name in ("expressed", "shared"):
            sampler = expressed_sentences if name == "expressed" else shared_sentences
            gene_idx, values, mask = sampler(expr, tc, dc.expressed_weight, g)
        else:
            gene_idx, values, mask = sample_gene_subsets(expr, self.cfg.model, g)
        if self.zstats is not None:  # genes drawn by their lognorm values, then standardised per gene
            values = gene_z(values, gene_idx, *self.zstats)
        if tc.library_token and library_z is not None:  # the spot's depth as its own token
            n = len(expr)
            gene_idx = torch.cat([gene_idx, torch.full((n, 1), len(self.ts.panel), dtype=gene_idx.dtype)], 1)
            values = torch.cat([values, torch.from_numpy(np.asarray(library_z)).to(values.dtype).view(n, 1)], 1)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], 1)
        return gene_idx, values, mask

    def ssl_views(self, g: torch.Generator) -> tuple:
        """The expression-only term's input (``model.w_text_ssl``; empty when off): two independently
        drawn sentences ``(gene_idx, values, mask) * 2`` of each of ``data.expression_only_batch`` spots
        drawn from all expression of the run, the training spots and those of ``data.expression_only``,
        by ``data.expression_only_sampler`` (``run``: the run's sentence sampler; ``shared``: one gene
        set per view for all the spots, so the views of a spot can only be matched by their values)."""
        if self.cfg.model.w_text_ssl <= 0:
            return ()
        ts = self.ts
        pool = ts.n_spots + (0 if ts.text_only_expr is None else len(ts.text_only_expr))
        rows = torch.randperm(pool, generator=g)[: int(self.cfg.data.expression_only_batch)].numpy()
        expr, lib = self._pool_rows(rows)
        name = None if self.cfg.data.expression_only_sampler == "run" else self.cfg.data.expression_only_sampler
        return self.sentences(expr, lib, g, name) + self.sentences(expr, lib, g, name)

    def _pool_rows(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
        """Expression (and library token values) of ``rows`` of the pool: the training spots, then the
        expression-only spots (index ``n_spots + j``), in the order given; nothing is concatenated."""
        ts = self.ts
        own = rows < ts.n_spots
        expr = np.empty((len(rows), ts.expr.shape[1]), dtype=ts.expr.dtype)
        expr[own] = ts.expr[rows[own]]
        lib = None if ts.library_z is None else np.empty(len(rows), dtype=ts.library_z.dtype)
        if lib is not None:
            lib[own] = ts.library_z[rows[own]]
        if not own.all():
            j = rows[~own] - ts.n_spots
            expr[~own] = ts.text_only_expr[j]
            if lib is not None:
                lib[~own] = ts.text_only_library_z[j]
        return torch.from_numpy(expr), lib


__all__ = ["BatchSet", "Augment", "random_crops", "expressed_sentences", "shared_sentences", "step_seed", "generator"]
