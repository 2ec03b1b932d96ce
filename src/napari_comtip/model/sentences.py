"""Gene sentences for training: the sets of (gene, value) tokens the Gene-Text Encoder reads.

* :func:`sample_gene_subsets` -- a batch of expression vectors -> (gene_idx, values, mask) in the
  config's text mode (names+values subsets, OmiCLIP top-k names, BLEEP whole vector);
* :func:`spot_rank` -- within-spot ranks (``text.value_transform: spot_rank``);
* :func:`gene_z_stats` / :func:`gene_z` -- per-gene standardised values (``gene_z``);
* :func:`permute_values` -- PAAT's negatives (the same genes, their values permuted).

The encoder itself is :mod:`napari_comtip.model.text`.
"""

from __future__ import annotations

import math

import torch

from .config import ComtipConfig


def sample_gene_subsets(
    expr: torch.Tensor,
    cfg: ComtipConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn a batch of expression vectors (B, G) into gene sentences (gene_idx, values, mask).

    * ``names+values``: a random gene subset per spot, its size drawn log-uniformly in
      [min_genes, max_genes] (and, with probability ``p_single``, exactly one gene) so that the
      single-gene sentences used by zero-shot prediction are in the training distribution.
      ``subset_sizes="batch"`` draws one size for the whole batch (no padding: the set
      transformer's cost follows the mean size, not the batch maximum); ``"spot"`` one per spot.
      Genes are drawn without replacement, an expressed gene ``expressed_weight`` times as
      likely as a zero (most of a large panel is zero in any one spot: uniform subsets would
      be nearly all zeros); ``expressed_weight=1`` is uniform.
    * ``names``: the top_k expressed genes (OmiCLIP).
    * ``values``: the whole expression vector (BLEEP).

    One tensor operation for the whole batch (no loop over spots or genes).
    """
    if expr.ndim != 2:
        raise ValueError(f"expr must be (B, G), got {tuple(expr.shape)}")
    b, g = expr.shape
    dev = expr.device
    t = cfg.text
    if t.mode == "values":
        idx = torch.arange(g, device=dev).expand(b, -1).contiguous()
        return idx, expr.float(), torch.ones(b, g, dtype=torch.bool, device=dev)
    if t.mode == "names":
        k = min(t.top_k, g)
        vals, idx = expr.float().topk(k, dim=1)
        mask = vals > 0
        mask[:, 0] = True
        return idx, vals, mask
    sizes = draw_sentence_sizes(t, g, 1 if t.subset_sizes == "batch" else b, generator, dev).expand(b)
    length = int(sizes.max())
    keys = torch.rand(b, g, device=dev, generator=generator)
    if t.expressed_weight != 1.0:
        # weighted sampling without replacement (Gumbel top-k): an expressed gene is
        # `expressed_weight` times as likely to be drawn as a zero
        w = torch.where(expr > 0, float(t.expressed_weight), 1.0).to(keys.dtype)
        keys = w.log() - (-keys.clamp(1e-12, 1 - 1e-7).log()).log()
    idx = keys.topk(length, dim=1).indices
    mask = torch.arange(length, device=dev).unsqueeze(0) < sizes.unsqueeze(1)
    return idx, expr.float().gather(1, idx), mask


def draw_sentence_sizes(text_cfg, n_genes: int, n: int, generator: torch.Generator | None = None,
                        device=None) -> torch.Tensor:
    """``n`` sentence lengths (long): log-uniform in [min_genes, max_genes] (capped at the panel),
    each one gene instead with probability ``p_single`` (zero-shot's sentences stay in-distribution).
    Every sampler of training sentences draws its lengths here."""
    lo, hi = min(text_cfg.min_genes, n_genes), min(text_cfg.max_genes, n_genes)
    u = torch.rand(n, device=device, generator=generator)
    sizes = torch.exp(math.log(lo) + u * (math.log(hi + 1) - math.log(lo))).floor().long().clamp(lo, hi)
    if text_cfg.p_single > 0:
        single = torch.rand(n, device=device, generator=generator) < text_cfg.p_single
        sizes = torch.where(single, torch.ones_like(sizes), sizes)
    return sizes


def spot_rank(expr: torch.Tensor) -> torch.Tensor:
    """Within-spot values (``text.value_transform: spot_rank``): each detected gene's mid-rank among
    the spot's detected genes divided by their number, in (0, 1]; undetected genes stay 0.
    Ties share their mid-rank. One batched sort, no loop. ``expr`` (B, G), any monotone scale."""
    x = expr.float()
    s, _ = x.sort(dim=1)
    left = torch.searchsorted(s, x.contiguous(), right=False)
    right = torch.searchsorted(s, x.contiguous(), right=True)
    nz = (x > 0).sum(1, keepdim=True)
    zeros = x.shape[1] - nz
    mid = (left - zeros).float() + (right - left + 1).float() / 2.0
    return torch.where(x > 0, mid / nz.clamp_min(1).float(), torch.zeros_like(x))


def gene_z_stats(expr) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gene mean and standard deviation (G,) of log-normalised training expression (N, G), the
    statistics of ``text.value_transform: gene_z`` (sd floored at 1e-3: a gene never detected)."""
    x = torch.as_tensor(expr).double()
    return x.mean(0).float(), x.std(0, unbiased=False).clamp_min(1e-3).float()


def gene_z(values: torch.Tensor, gene_idx: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """Sentence values standardised per gene: (value - mean[gene]) / sd[gene], clamped to
    ``Default.GENE_Z_RANGE``. Tokens whose index is past the panel (the library-size token) keep
    their value."""
    from ..constants import Default

    g = mean.shape[0]
    inside = gene_idx < g
    gi = gene_idx.clamp(max=g - 1)
    z = ((values.float() - mean[gi]) / sd[gi]).clamp(*Default.GENE_Z_RANGE)
    return torch.where(inside, z, values.float()).to(values.dtype)


def permute_values(
    values: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAAT negatives: permute each spot's values across its valid genes, ``n`` times.

    Returns ``(neg_values (B, n, L), differs (B, n) bool)``: the same genes (positions), the
    same multiset of values, another pairing; ``differs`` is False where the permutation left
    every gene with its own value (a single gene, all-equal values, or the identity drawn), and
    such "negatives" must not be used.
    """
    b, length = values.shape
    dev = values.device
    v = values.unsqueeze(1).expand(b, n, length)
    m = mask.bool().unsqueeze(1).expand(b, n, length)
    ar = torch.arange(length, device=dev).float().expand(b, n, length)
    # destination slots: the valid positions in ascending order, then the padding
    dst = torch.where(m, ar, ar + length).argsort(dim=-1)
    # sources: the valid positions in a random order, then the padding
    r = torch.rand(b, n, length, device=dev, generator=generator)
    src = torch.where(m, r, r + 2.0).argsort(dim=-1)
    out = torch.empty_like(v)
    out.scatter_(-1, dst, v.gather(-1, src))
    out = torch.where(m, out, v)
    differs = ((out != v) & m).any(dim=-1)
    return out, differs


__all__ = ["sample_gene_subsets", "draw_sentence_sizes", "spot_rank", "gene_z_stats", "gene_z", "permute_values"]
