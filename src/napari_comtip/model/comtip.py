"""The CoMTIP network: masked vision branch + Gene-Text Encoder, aligned with InfoNCE, plus PAAT.

``forward(images, gene_idx, values, mask)`` returns the training losses as a dict::

    loss    = infonce + w_mfm * mfm + w_paat * paat + w_profile * profile + w_grid * grid
    infonce   symmetric CLIP loss, learnable temperature (logit scale clamped at max_logit_scale)
    mfm       masked feature modelling (0 when w_mfm == 0 or the ViT is frozen, ``vision.freeze: true``)
    paat      pair-aware adversarial term (0 when w_paat == 0 or text.mode == "names"):
              hard-negative CE (image vs its true text and its value-permuted texts)
              [+ w_discriminator * pair-consistency BCE] [+ w_adversarial * FGSM consistency KL]
    profile   InfoNCE of the image against the whole expression vector (ProfileHead; 0 when off)
    grid      the zero-shot readout trained directly (model/grid_term.py; 0 when off)

Inference uses :meth:`CoMTIP.preprocess`, :meth:`CoMTIP.encode_image`,
:meth:`CoMTIP.image_features` and :meth:`CoMTIP.encode_genes`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ComtipConfig
from .foundation import fully_frozen
from .grid_term import value_grid_loss
from .image_ssl import ImageSSLHead
from .sentences import gene_z, gene_z_stats, permute_values, sample_gene_subsets, spot_rank
from . import reading
from .colour import N_COLOUR_FEATURES
from .morphology import N_MORPHOLOGY_FEATURES
from .text import GeneTextEncoder, ProfileHead
from .vision import MaskedViT, mean_over_views, resolve_normalization


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (row i of img matches row i of txt)."""
    logits = logit_scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class PairDiscriminator(nn.Module):
    """Scores whether a (image embedding, text embedding) pair has the true gene-value pairing."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([img, txt, img * txt], dim=-1)).squeeze(-1)


class CoMTIP(nn.Module):
    """Contrastive Masked Text-Image Pretraining for spatial transcriptomics."""

    def __init__(self, config: ComtipConfig, gene_panel: Sequence[str], name_embeddings: torch.Tensor | None = None):
        super().__init__()
        config = copy.deepcopy(config)
        config.validate()
        self.config = config
        self.gene_panel = [str(g) for g in gene_panel]
        g = len(self.gene_panel)
        self.vision = MaskedViT(config, with_generator=config.w_mfm > 0 and not fully_frozen(config.vision.freeze))
        mean, std = resolve_normalization(self.vision.vit, config)
        config.vision.mean, config.vision.std = mean, std  # make the checkpoint's config explicit
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.image_proj = nn.Linear(self.vision.feature_dim, config.embed_dim)
        # image self-distillation's student head (model/image_ssl.py; engine/training.py runs the term)
        self.image_ssl_head = ImageSSLHead(self.vision.feature_dim, config.image_ssl.dim) if config.w_image_ssl > 0 else None
        self.text = GeneTextEncoder(config, g, name_embeddings)
        t = config.text
        self.profile_head = (ProfileHead(g, t.width, config.embed_dim, t.values_mlp_layers, t.dropout)
                             if config.w_profile > 0 else None)
        init = math.log(1.0 / config.init_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=config.learn_temperature)
        use_disc = config.w_paat > 0 and config.paat.discriminator and self.text.encodes_values
        self.pair_disc = PairDiscriminator(config.embed_dim) if use_disc else None
        # training range of each gene's log-normalised value (zero-shot grid); all finite so
        # that "no inf/NaN in the weights" checks hold; value_count == 0 marks an unseen gene
        self.register_buffer("value_lo", torch.zeros(g))
        self.register_buffer("value_hi", torch.zeros(g))
        self.register_buffer("value_count", torch.zeros(g, dtype=torch.long))
        if config.text.value_transform != "lognorm":
            # zero-shot output back in log-normalised units: lognorm ~ cal[0] + cal[1] * value (per gene)
            self.register_buffer("value_cal", torch.stack([torch.zeros(g), torch.ones(g)]))
        if config.text.value_transform == "gene_z":
            # per-gene mean and sd of the training spots' log-normalised values (set_gene_stats)
            self.register_buffer("value_mu", torch.zeros(g))
            self.register_buffer("value_sd", torch.ones(g))
        self.weights_report: dict | None = None

    # ------------------------------------------------------------------ properties
    @property
    def n_genes(self) -> int:
        return len(self.gene_panel)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def feature_dim(self) -> int:
        return self.vision.feature_dim

    @property
    def img_size(self) -> int:
        return self.config.vision.img_size

    @property
    def input_px(self) -> int:
        """The side patches are read at for this model's reading: ``vision.morphology_px`` when the
        probe reads full-resolution morphology (the ViT then sees them at ``img_size``), else ``img_size``."""
        return reading.input_px(self.config)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at ``max_logit_scale`` (CLIP)."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def gene_index(self, genes: Sequence[str | int]) -> torch.Tensor:
        """Panel indices of gene symbols (or pass-through ints); KeyError names unknown genes."""
        lookup = {g: i for i, g in enumerate(self.gene_panel)}
        out, unknown = [], []
        for gname in genes:
            if isinstance(gname, (int, np.integer)):
                if not 0 <= int(gname) < self.n_genes:
                    unknown.append(str(gname))
                out.append(int(gname))
            elif gname in lookup:
                out.append(lookup[gname])
            else:
                unknown.append(str(gname))
        if unknown:
            raise KeyError(f"not in the model's gene panel: {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
        return torch.tensor(out, dtype=torch.long)

    def count_parameters(self, trainable: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if (p.requires_grad or not trainable))

    # ------------------------------------------------------------------ images
    def preprocess(self, patches) -> torch.Tensor:
        """uint8 patches (B, H, W, 3) -> normalised (B, 3, S, S) at ``input_px`` on the model's device
        (model/reading.py :func:`~napari_comtip.model.reading.preprocess`)."""
        return reading.preprocess(self, patches)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-projection ViT features (B, F) of the patches as given (what the projection reads in training)."""
        return self.vision(self._vit_input(x))

    def _vit_input(self, x: torch.Tensor) -> torch.Tensor:
        return reading.vit_input(x, self.img_size)

    def probe_features(self, x: torch.Tensor) -> torch.Tensor:
        """The probe's input (B, F'): the pooled ViT features, followed by the colour-texture
        statistics of the ViT's input patch when ``vision.colour_features`` (model/colour.py) and the
        full-resolution morphology statistics when ``vision.morphology_px`` (model/morphology.py);
        ``vision.probe_input`` may add the image embedding after them or read it alone."""
        return self.encode_image_and_features(x)[1]

    def _pooled(self, xv: torch.Tensor) -> torch.Tensor:
        """Pooled ViT features of patches at the ViT's side; at inference (eval mode) their mean over
        ``vision.test_views`` flips and rotations of each patch (model/vision.py ``mean_over_views``;
        the colour statistics likewise)."""
        return mean_over_views(self.vision, xv, self._views())

    def _views(self) -> int:
        return 1 if self.training else int(self.config.vision.test_views)

    @property
    def probe_feature_spec(self) -> str:
        """What :meth:`probe_features` (and, for the views, the embedding) returns, for the embedding cache's signature."""
        v = self.config.vision
        views = f"+views{v.test_views}" if v.test_views > 1 else ""
        spec = f"vit-{v.pool}" + (f"+colour{N_COLOUR_FEATURES}" if v.colour_features else "") + views + (
            f"+morph{N_MORPHOLOGY_FEATURES}@{v.morphology_px}" if v.morphology_px else "")
        return {"features": spec, "features+embedding": spec + "+embedding"}.get(v.probe_input, "embedding" + views)

    def _with_colour(self, x: torch.Tensor, xv: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return reading.reading_stats(self, x, xv, feats, self._views())

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding in the shared space (B, D)."""
        return F.normalize(self.image_proj(self._pooled(self._vit_input(x))), dim=-1)

    def encode_image_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both at the cost of one ViT pass: ((B, D) embedding, (B, F) features)."""
        xv = self._vit_input(x)  # resized once for the ViT and the colour statistics
        feats = self._pooled(xv)
        emb = F.normalize(self.image_proj(feats), dim=-1)
        which = self.config.vision.probe_input
        if which == "embedding":
            return emb, emb
        probe_in = self._with_colour(x, xv, feats)
        if which == "features+embedding":
            probe_in = torch.cat([probe_in.float(), emb.float()], 1)
        return emb, probe_in

    # ------------------------------------------------------------------ genes
    def encode_genes(self, gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embedding of gene sentences (B, D); all spots and genes in one pass."""
        return self.text(gene_idx, values, mask)

    def text_values(self, expr: torch.Tensor) -> torch.Tensor:
        """The sentence values of log-normalised expression (B, G), per ``text.value_transform``."""
        vt = self.config.text.value_transform
        if vt == "spot_rank":
            return spot_rank(expr)
        if vt == "gene_z":
            idx = torch.arange(expr.shape[1], device=expr.device).expand(expr.shape[0], -1)
            return gene_z(expr, idx, self.value_mu.to(expr.device), self.value_sd.to(expr.device))
        return expr

    @torch.no_grad()
    def set_gene_stats(self, expr) -> None:
        """``gene_z`` models: store the per-gene mean and sd of the training expression (before training)."""
        if hasattr(self, "value_mu"):
            mu, sd = gene_z_stats(expr)
            self.value_mu.copy_(mu.to(self.value_mu))
            self.value_sd.copy_(sd.to(self.value_sd))

    @torch.no_grad()
    def calibrate_values(self, expr) -> None:
        """Fit the per-gene line lognorm ~ a + b * text value on training spots (``value_cal``)."""
        if not hasattr(self, "value_cal"):
            return
        y = torch.as_tensor(np.asarray(expr), dtype=torch.float64)
        x = self.text_values(y.float()).double()
        xm, ym = x.mean(0), y.mean(0)
        b = ((x - xm) * (y - ym)).sum(0) / ((x - xm) ** 2).sum(0).clamp_min(1e-12)
        b = b.clamp_min(1e-6)
        self.value_cal.copy_(torch.stack([ym - b * xm, b]).to(self.value_cal.dtype))

    @property
    def library_token_index(self) -> int | None:
        """Gene index of the library-size token (``text.library_token``), else None."""
        return self.n_genes if getattr(self.text, "library_token", False) else None

    def with_library_token(self, gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           library_z: torch.Tensor | float = 0.0):
        """Sentences with the library-size token appended (value ``library_z``; 0 = the training mean).
        Unchanged when the model has no such token."""
        if self.library_token_index is None:
            return gene_idx, values, mask
        b = gene_idx.shape[0]
        li = torch.full((b, 1), self.library_token_index, dtype=gene_idx.dtype, device=gene_idx.device)
        lv = torch.as_tensor(library_z, dtype=values.dtype, device=values.device).reshape(-1, 1).expand(b, 1)
        return (torch.cat([gene_idx, li], 1), torch.cat([values, lv], 1),
                torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], 1))

    def sample_text(self, expr: torch.Tensor, generator: torch.Generator | None = None):
        """Training sentences for a batch of log-normalised expression vectors (B, G), per config."""
        return sample_gene_subsets(expr, self.config, generator)

    # ------------------------------------------------------------------ value range (zero-shot grid)
    @torch.no_grad()
    def observe_values(self, gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Widen each gene's recorded [min, max] with the valid tokens of a batch (one tensor op)."""
        idx = gene_idx[mask]
        if idx.numel() == 0:
            return
        vals = values[mask].to(self.value_hi.dtype)
        g = self.value_hi.shape[0]
        b_hi = torch.full((g,), float("-inf"), dtype=vals.dtype, device=vals.device).scatter_reduce(0, idx, vals, "amax")
        b_lo = torch.full((g,), float("inf"), dtype=vals.dtype, device=vals.device).scatter_reduce(0, idx, vals, "amin")
        n = torch.zeros(g, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
        got, seen = n > 0, self.value_count > 0
        self.value_hi.copy_(torch.where(got, torch.where(seen, torch.maximum(self.value_hi, b_hi), b_hi), self.value_hi))
        self.value_lo.copy_(torch.where(got, torch.where(seen, torch.minimum(self.value_lo, b_lo), b_lo), self.value_lo))
        self.value_count.add_(n)

    @torch.no_grad()
    def set_value_range(self, lo, hi) -> None:
        """Set each gene's zero-shot grid range explicitly (e.g. quantiles of the training data)."""
        self.value_lo.copy_(torch.as_tensor(lo, dtype=self.value_lo.dtype).expand_as(self.value_lo))
        self.value_hi.copy_(torch.as_tensor(hi, dtype=self.value_hi.dtype).expand_as(self.value_hi))
        self.value_count.clamp_(min=1)

    def value_grid(self, gene_idx: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Candidate values (G', n) for zero-shot prediction, spanning each gene's training range.

        Genes never seen in training span [0, zero_shot.default_max].
        """
        n = n or self.config.zero_shot.grid
        gi = gene_idx.to(self.value_lo.device)
        lo, hi = self.value_lo[gi].float(), self.value_hi[gi].float()
        unseen = (self.value_count[gi] == 0) | ~(hi >= lo) | ~torch.isfinite(lo) | ~torch.isfinite(hi)
        # values below 0 exist only for gene_z (standardised) sentences
        lo = torch.where(unseen, torch.zeros_like(lo), lo if self.config.text.value_transform == "gene_z" else lo.clamp_min(0.0))
        hi = torch.where(unseen, torch.full_like(hi, self.config.zero_shot.default_max), hi)
        hi = torch.where(hi - lo < 1e-3, lo + 1e-3, hi)
        steps = torch.linspace(0.0, 1.0, n, device=lo.device)
        return lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * steps

    # ------------------------------------------------------------------ training
    def forward(
        self,
        images: torch.Tensor,
        gene_idx: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        pooled: bool = False,
        profile: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``pooled=True``: ``images`` are pooled ViT features (B, F) of a frozen ViT (the
        frozen-feature cache, engine/feature_cache.py); the ViT and MFM are skipped. ``profile``:
        the spots' log-normalised expression (B, G) for the ``w_profile`` and ``w_grid`` terms (ignored when off)."""
        cfg = self.config
        mask = mask.bool()
        if self.training:
            self.observe_values(gene_idx, values, mask & (gene_idx < self.n_genes))
        zero = images.new_zeros(())
        if pooled:
            tokens = None
            img = F.normalize(self.image_proj(images.to(self.image_proj.weight.dtype)), dim=-1)
        else:
            tokens = self.vision.forward_tokens(images)
            img = F.normalize(self.image_proj(self.vision.pool(tokens)), dim=-1)
        ident, vpart, tmask = self.text.token_parts(gene_idx, values, mask)
        sparse = self.text.sparse_part(gene_idx, values, mask)
        txt = self.text.encode_parts(ident, vpart, tmask, sparse)
        scale = self.scale()
        infonce = clip_loss(img, txt, scale)

        mfm = zero
        if cfg.w_mfm > 0 and tokens is not None and self.vision.generator is not None:
            mfm = self.vision.mfm_loss(images, tokens, cfg.mask_ratio, generator)

        out = {"infonce": infonce, "mfm": mfm}
        paat = zero
        if cfg.w_paat > 0 and self.text.encodes_values:
            paat_terms = self._paat(img, txt, ident, vpart, tmask, gene_idx, values, mask, scale, generator, sparse)
            out.update(paat_terms)
            paat = paat_terms["paat_hard"] + paat_terms.get("paat_disc", zero) * cfg.paat.w_discriminator
            paat = paat + paat_terms.get("paat_adv", zero) * cfg.paat.w_adversarial
        out["paat"] = paat
        prof = zero
        if self.profile_head is not None and profile is not None and profile.shape[0] == img.shape[0]:
            prof = clip_loss(img, self.profile_head(profile), scale)
        out["profile"] = prof
        grid = zero
        if cfg.w_grid > 0 and profile is not None and profile.shape[0] == img.shape[0]:
            grid = value_grid_loss(self, img, profile, scale, generator)
        out["grid"] = grid
        out["loss"] = infonce + cfg.w_mfm * mfm + cfg.w_paat * paat + cfg.w_profile * prof + cfg.w_grid * grid
        with torch.no_grad():
            logits = img @ txt.t()
            out["i2t_acc"] = (logits.argmax(1) == torch.arange(len(img), device=img.device)).float().mean()
            out["logit_scale"] = scale.detach()
        return out

    def _paat(self, img, txt, ident, vpart, tmask, gene_idx, values, mask, scale, generator, sparse=None):
        """Pair-aware terms: hard negatives with permuted values, optional discriminator and FGSM."""
        pc = self.config.paat
        n = pc.n_negatives
        b, length = gene_idx.shape
        # the library-size token keeps its value: only genes swap values among themselves
        neg_values, differs = permute_values(values, mask & (gene_idx < self.n_genes), n, generator)
        neg_txt = self.text(
            gene_idx.repeat_interleave(n, dim=0),
            neg_values.reshape(b * n, length),
            mask.repeat_interleave(n, dim=0),
        ).view(b, n, -1)
        pos_logit = scale * (img * txt).sum(-1, keepdim=True)
        neg_logit = scale * torch.einsum("bd,bnd->bn", img, neg_txt)
        neg_logit = neg_logit.masked_fill(~differs, float("-inf"))
        rows = differs.any(dim=1)
        zero = img.new_zeros(())
        terms = {}
        if bool(rows.any()):
            logits = torch.cat([pos_logit, neg_logit], dim=1)[rows]
            terms["paat_hard"] = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=img.device))
        else:
            terms["paat_hard"] = zero
        if self.pair_disc is not None:
            if bool(rows.any()):
                pos = self.pair_disc(img, txt)
                neg = self.pair_disc(img.unsqueeze(1).expand_as(neg_txt)[differs], neg_txt[differs])
                s = torch.cat([pos, neg])
                y = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
                terms["paat_disc"] = F.binary_cross_entropy_with_logits(s, y)
            else:
                terms["paat_disc"] = zero
        if pc.adversarial:
            terms["paat_adv"] = self._fgsm_consistency(img, txt, ident, vpart, tmask, scale, sparse)
        return terms

    def _fgsm_consistency(self, img, txt, ident, vpart, tmask, scale, sparse=None) -> torch.Tensor:
        """FGSM step on the value embeddings that most hurts image-text alignment, then a KL term
        keeping the image->text distribution of the perturbed texts equal to the clean one."""
        v_adv = vpart.detach().requires_grad_(True)
        with torch.enable_grad():
            t_tmp = self.text.encode_parts(None if ident is None else ident.detach(), v_adv, tmask,
                                           None if sparse is None else sparse.detach())
            l_tmp = clip_loss(img.detach(), t_tmp, scale.detach())
            (grad,) = torch.autograd.grad(l_tmp, v_adv)
        rms = vpart.detach().pow(2).mean().sqrt()
        delta = self.config.paat.adv_epsilon * rms * grad.sign()
        t_adv = self.text.encode_parts(ident, vpart + delta, tmask, sparse)
        clean = (scale * img @ txt.t()).detach()
        adv = scale * img @ t_adv.t()
        return F.kl_div(F.log_softmax(adv, dim=1), F.log_softmax(clean, dim=1), log_target=True, reduction="batchmean")
