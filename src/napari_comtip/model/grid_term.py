"""The one-gene value sentences of zero-shot prediction, and the training term that aligns them.

Zero-shot prediction (engine/predictors.py ``zero_shot``) scores an image embedding against the
sentences "gene g at value v" for a grid of values v and reads the softmax-weighted mean of v.
:func:`value_sentence_embeddings` builds and encodes those sentences, for prediction and for
training alike, so that both read exactly the same sentences.

:func:`value_grid_loss` (``w_grid``, *our decision*; docs/model.md "Value-grid term") trains
that readout directly: for genes drawn from the batch, image i is contrasted with the one-gene
sentences of the gene's own value grid, and the target is a soft label centred on the spot's
value. The negatives are the same gene at other values, so the term also binds each gene to its
own value (what PAAT's permuted pairings aim at) in the one-gene sentences that zero-shot reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def value_sentence_embeddings(model, gene_idx: torch.Tensor, grid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Embeddings (G', V, D) of the one-gene sentences (gene g, value grid[g, v]), chunked.

    A model with a library-size token reads each sentence at the training mean depth (0).
    Differentiable (training) or not (under ``torch.no_grad``, prediction)."""
    g, v = grid.shape
    dev = model.device
    idx = gene_idx.to(dev).view(g, 1).expand(g, v).reshape(-1, 1)
    vals = grid.to(dev).reshape(-1, 1)
    mask = torch.ones_like(idx, dtype=torch.bool)
    out = []
    for s in range(0, idx.shape[0], chunk):
        gi, gv, gm = model.with_library_token(idx[s : s + chunk], vals[s : s + chunk], mask[s : s + chunk])
        out.append(model.encode_genes(gi, gv, gm).float())
    return torch.cat(out).view(g, v, -1)


def draw_grid_genes(text_values: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` panel genes that vary in the batch, drawn without replacement with probability
    proportional to their variance over the batch's spots (a gene constant in the batch teaches
    the readout nothing). Fewer when fewer genes vary; empty when none does."""
    if text_values.shape[0] > 1:
        var = text_values.float().var(0, unbiased=False)
    else:
        var = text_values.new_zeros(text_values.shape[1])
    var = torch.nan_to_num(var, nan=0.0).clamp_min(0.0)
    n = int((var > 0).sum())
    if n == 0 or k < 1:
        return torch.zeros(0, dtype=torch.long, device=text_values.device)
    return torch.multinomial(var, min(k, n), replacement=False, generator=generator)


def soft_targets(true: torch.Tensor, grid: torch.Tensor, sigma_steps: float) -> torch.Tensor:
    """(B, K, V) labels: a Gaussian over gene k's grid centred on the spot's value ``true`` (B, K),
    ``sigma_steps`` grid steps wide (0 = the nearest grid value alone)."""
    d = true.unsqueeze(-1) - grid.unsqueeze(0)  # (B, K, V)
    if sigma_steps <= 0:
        return F.one_hot(d.abs().argmin(-1), grid.shape[-1]).to(true.dtype)
    step = ((grid[:, -1] - grid[:, 0]) / max(grid.shape[-1] - 1, 1)).clamp_min(1e-6)  # (K,)
    return torch.softmax(-0.5 * (d / (sigma_steps * step).view(1, -1, 1)) ** 2, dim=-1)


def value_grid_loss(model, img: torch.Tensor, expr: torch.Tensor, scale: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of each spot's softmax over its genes' value grids against soft labels at the
    spot's values. ``img``: (B, D) unit image embeddings; ``expr``: (B, G) log-normalised expression
    (the sentences' values are ``model.text_values(expr)``); ``scale``: the CLIP logit scale, the
    one zero-shot's default temperature comes from."""
    zs = model.config.zero_shot
    tv = model.text_values(expr.float())
    gi = draw_grid_genes(tv, zs.train_genes, generator)
    if gi.numel() == 0:
        return img.new_zeros(())
    true = tv[:, gi]  # (B, K)
    if model.training:  # the grid spans the gene's training range, these values included
        model.observe_values(gi.expand(tv.shape[0], -1), true, torch.ones_like(true, dtype=torch.bool))
    grid = model.value_grid(gi).to(img.device).float()  # (K, V)
    text = value_sentence_embeddings(model, gi, grid, zs.chunk)  # (K, V, D)
    logits = scale * torch.einsum("bd,kvd->bkv", img.float(), text)
    target = soft_targets(true.clamp(grid[:, 0], grid[:, -1]), grid, zs.train_sigma)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


__all__ = ["value_sentence_embeddings", "draw_grid_genes", "soft_targets", "value_grid_loss"]
