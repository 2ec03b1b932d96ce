"""Vision branch: a timm ViT with a full branch, a masked branch and a mask feature generator.

* Full branch: every patch token goes through the ViT; its pooled output is the global image
  feature, its token features are the (stop-gradient) targets of Masked Feature Modelling.
* Masked branch: a random ``mask_ratio`` of the patch tokens is dropped *after* patch and
  position embedding and *before* the transformer blocks, so the blocks only ever compute on
  the visible tokens (MAE-style; this is what makes the masked branch cheap).
* Mask feature generator: one learnable mask query per hidden position (plus that position's
  positional embedding) attends, through one cross-attention layer, to the masked branch's
  visible-token features and predicts the full branch's feature of that hidden token.

Written against timm 1.0.x ``VisionTransformer`` internals (``patch_embed``, ``_pos_embed``,
``norm_pre``, ``blocks``, ``norm``); any timm model with these attributes works (ViT, DeiT,
most pathology foundation models published as timm ViTs).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .config import TEST_VIEWS, ComtipConfig
from .foundation import apply_freeze, fully_frozen, hub_settings, load_vision_weights

__all__ = ["MaskedViT", "create_vit", "resolve_normalization", "load_vision_weights", "mfm_distance",
           "TEST_VIEWS", "dihedral_view", "mean_over_views"]

_REQUIRED = ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens")


def create_vit(cfg: ComtipConfig) -> nn.Module:
    """``timm.create_model(name, pretrained=False, img_size=..., num_classes=0, **overrides)``."""
    import timm

    v = cfg.vision
    kwargs = dict(v.overrides)
    if v.drop_path_rate:
        kwargs.setdefault("drop_path_rate", v.drop_path_rate)
    try:
        vit = timm.create_model(v.name, pretrained=False, img_size=v.img_size, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(f"timm cannot build vision.name={v.name!r}: {exc}", hint="use a timm ViT name such as vit_tiny_patch16_224") from None
    except TypeError as exc:
        raise ConfigError(f"timm rejected vision.overrides {v.overrides} for {v.name!r}: {exc}") from None
    missing = [a for a in _REQUIRED if not hasattr(vit, a)]
    if missing:
        raise ConfigError(
            f"vision.name={v.name!r} is not a ViT this model can mask (it lacks {', '.join(missing)})",
            hint="choose a timm VisionTransformer (vit_*, deit_*)",
        )
    if getattr(vit, "dynamic_img_size", False):
        raise ConfigError(f"vision.overrides for {v.name!r} sets dynamic_img_size, which the masked branch does not support",
                          hint="leave dynamic_img_size out and set vision.img_size to the model's input size")
    return vit


def resolve_normalization(vit: nn.Module, cfg: ComtipConfig) -> tuple[list[float], list[float]]:
    """RGB mean/std: the config's if given, else the ``config.json`` beside ``vision.weights``
    (a Hugging Face timm model folder), else the timm model's data config."""
    mean, std = cfg.vision.mean, cfg.vision.std
    if mean is None or std is None:
        hub = hub_settings(cfg.vision.weights)
        mean = mean if mean is not None else hub.get("mean")
        std = std if std is not None else hub.get("std")
    if mean is None or std is None:
        from timm.data import resolve_data_config

        dc = resolve_data_config({}, model=vit)
        mean = list(mean) if mean is not None else [float(x) for x in dc["mean"]]
        std = list(std) if std is not None else [float(x) for x in dc["std"]]
    return [float(x) for x in mean], [float(x) for x in std]


class MaskFeatureGenerator(nn.Module):
    """One cross-attention layer: mask queries attend to visible-token features (pre-norm)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = max(1, int(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(visible)
        q = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        q = q + self.mlp(self.norm_mlp(q))
        return self.head(self.norm_out(q))


class MaskedViT(nn.Module):
    """A timm ViT with a full branch, a visible-tokens-only masked branch and an MFM head."""

    def __init__(self, cfg: ComtipConfig, *, with_generator: bool = True):
        super().__init__()
        self.vit = create_vit(cfg)
        self.trainable_blocks = apply_freeze(self.vit, cfg.vision.freeze, cfg.vision.name)
        self.frozen = fully_frozen(cfg.vision.freeze)
        self.pool_type = cfg.vision.pool
        self.width = int(self.vit.embed_dim)
        self.feature_dim = 2 * self.width if self.pool_type == "cls+mean" else self.width
        self.num_prefix = int(self.vit.num_prefix_tokens)
        self.num_patches = int(self.vit.patch_embed.num_patches)
        if self.pool_type in ("cls", "cls+mean") and self.num_prefix == 0:
            raise ConfigError(f"vision.pool={self.pool_type!r} but {cfg.vision.name!r} has no class token", hint="set vision.pool: mean")
        self.mfm_loss_type = cfg.mask.loss
        self.normalize_target = cfg.mask.normalize_target
        if with_generator:
            heads = cfg.mask.generator_heads or int(getattr(self.vit.blocks[0].attn, "num_heads", 1))
            if self.width % heads:
                raise ConfigError(f"mask.generator_heads ({heads}) must divide the ViT width ({self.width})")
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.width))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.generator = MaskFeatureGenerator(self.width, heads, cfg.mask.generator_mlp_ratio)
        else:
            self.mask_token = None
            self.generator = None

    # ------------------------------------------------------------------ token plumbing
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + prefix tokens + positional embedding: (B, P + N, C)."""
        t = self.vit.patch_embed(x)
        return self.vit._pos_embed(t)

    def _run_blocks(self, t: torch.Tensor) -> torch.Tensor:
        t = self.vit.norm_pre(t)
        if getattr(self.vit, "grad_checkpointing", False) and self.training and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            t = checkpoint_seq(self.vit.blocks, t)
        else:
            t = self.vit.blocks(t)
        return self.vit.norm(t)

    def patch_pos_embed(self) -> torch.Tensor:
        """Positional embedding of the patch tokens only: (1, N, C) (zeros if the ViT has none)."""
        pe = self.vit.pos_embed
        if pe is None:
            return torch.zeros(1, self.num_patches, self.width, device=next(self.parameters()).device)
        if getattr(self.vit, "no_embed_class", False):
            return pe
        return pe[:, self.num_prefix :]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Full branch: all tokens after the final norm, (B, P + N, C)."""
        t = self._embed(x)
        t = self.vit.patch_drop(t)
        return self._run_blocks(t)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global image feature from full-branch tokens: (B, C)."""
        if self.pool_type == "cls":
            return tokens[:, 0]
        mean = tokens[:, self.num_prefix :].mean(dim=1)
        if self.pool_type == "cls+mean":
            return torch.cat([tokens[:, 0], mean], dim=-1)
        return mean

    def train(self, mode: bool = True):
        """A fixed (fully frozen) ViT stays in eval mode: no dropout/drop-path, so its features
        are the same in every epoch (what the frozen-feature cache relies on)."""
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_tokens(x))

    # ------------------------------------------------------------------ masking
    def random_mask(
        self, batch: int, mask_ratio: float, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random per-image split of the N patch positions into (ids_keep (B, Nv), ids_mask (B, Nm))."""
        n = self.num_patches
        n_keep = min(n - 1, max(1, int(round(n * (1.0 - mask_ratio)))))
        noise = torch.rand(batch, n, device=device, generator=generator)
        ids = noise.argsort(dim=1)
        return ids[:, :n_keep], ids[:, n_keep:]

    def forward_masked(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Masked branch: only the prefix and the visible patch tokens enter the blocks, (B, P + Nv, C)."""
        t = self._embed(x)
        prefix, patches = t[:, : self.num_prefix], t[:, self.num_prefix :]
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        visible = patches.gather(1, idx)
        return self._run_blocks(torch.cat([prefix, visible], dim=1))

    def predict_masked(self, visible_tokens: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
        """The generator's prediction of the hidden tokens' features, (B, Nm, C)."""
        if self.generator is None:
            raise RuntimeError("this model was built with w_mfm = 0: it has no mask feature generator")
        pe = self.patch_pos_embed().expand(ids_mask.shape[0], -1, -1)
        pos = pe.gather(1, ids_mask.unsqueeze(-1).expand(-1, -1, self.width))
        queries = self.mask_token.expand_as(pos) + pos
        return self.generator(queries, visible_tokens)

    def mfm_loss(
        self,
        x: torch.Tensor,
        full_tokens: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masked Feature Modelling loss against the stop-gradient full-branch token features."""
        ids_keep, ids_mask = self.random_mask(x.shape[0], mask_ratio, x.device, generator)
        visible = self.forward_masked(x, ids_keep)
        pred = self.predict_masked(visible, ids_mask)
        target = self.mfm_target(full_tokens, ids_mask)
        return mfm_distance(pred, target, self.mfm_loss_type)

    def mfm_target(self, full_tokens: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
        """Full-branch features at the hidden positions, detached (stop-gradient)."""
        patches = full_tokens.detach()[:, self.num_prefix :]
        target = patches.gather(1, ids_mask.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        if self.normalize_target:
            target = F.layer_norm(target, target.shape[-1:])
        return target


def mfm_distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ConfigError(f"mask.loss must be mse or cosine, got {kind!r}")


def dihedral_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0..7) of images ``x`` (B, C, H, W) under the 8 symmetries of the square, in the
    order of :data:`TEST_VIEWS`: identity, mirror, upside down, 180 degrees, then the quarter turns
    (90, 270) and the two diagonal mirrors."""
    if not 0 <= k < 8:
        raise ValueError(f"view index must be in 0..7, got {k}")
    flip, rot = ((False, 0), (True, 0), (True, 2), (False, 2), (False, 1), (False, 3), (True, 1), (True, 3))[k]
    y = torch.flip(x, dims=[3]) if flip else x
    return torch.rot90(y, rot, dims=(2, 3)) if rot else y


def mean_over_views(fn, x: torch.Tensor, views: int) -> torch.Tensor:
    """``fn(x)`` averaged over the first ``views`` dihedral views of ``x`` (one view at a time, so
    memory stays that of one batch)."""
    out = fn(x)
    if views <= 1:
        return out
    acc = out.float()
    for k in range(1, int(views)):
        acc = acc + fn(dihedral_view(x, k)).float()
    return (acc / int(views)).to(out.dtype)
