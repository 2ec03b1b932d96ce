"""How a CoMTIP model reads a patch: the side it is read at, its preprocessing, and the reading
statistics the probe gets beside the pooled ViT features (``model.config.READING_KEYS``).

* :func:`input_px` -- the side patches are read at: ``vision.img_size``, or
  ``vision.morphology_px`` when the probe reads full-resolution morphology;
* :func:`preprocess` -- uint8 patches -> normalised tensors at that side;
* :func:`vit_input` -- a read patch at the ViT's own side (resized as the readers resize);
* :func:`reading_stats` -- the colour-texture statistics of the ViT's input
  (``vision.colour_features``, model/colour.py) and the morphology statistics of the full read
  (``vision.morphology_px``, model/morphology.py), appended to the pooled features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .colour import colour_texture
from .morphology import morphology_stats
from .vision import mean_over_views


def input_px(config) -> int:
    """The side patches are read at for a model of ``config`` (a CoMTIP's ``config``)."""
    v = config.vision
    return max(int(v.morphology_px), int(v.img_size)) if v.morphology_px else int(v.img_size)


def preprocess(model, patches) -> torch.Tensor:
    """uint8 patches (B, H, W, 3) (tensor or numpy, 0..255) -> normalised (B, 3, S, S) on the model's device.

    Resized to ``input_px`` (bilinear, antialiased) unless already at ``img_size`` or ``input_px``
    (training batches stay at ``img_size``); normalised with the config's RGB mean/std;
    returned channels-last in the model's floating dtype.
    """
    if isinstance(patches, np.ndarray):
        patches = torch.from_numpy(np.ascontiguousarray(patches))
    if patches.ndim == 3:
        patches = patches.unsqueeze(0)
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be (B, H, W, 3) uint8, got shape {tuple(patches.shape)}")
    x = patches.to(model.device, non_blocking=True).permute(0, 3, 1, 2).float()
    s, m = int(model.config.vision.img_size), input_px(model.config)
    if x.shape[-2] != x.shape[-1] or x.shape[-1] not in (s, m):
        x = _resize(x, m)
    x = (x - model.pixel_mean) / model.pixel_std
    x = x.to(model.image_proj.weight.dtype)  # a model converted with .half()/.bfloat16()
    return x.contiguous(memory_format=torch.channels_last)


def vit_input(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """``x`` at the ViT's side: a full-resolution read (``vision.morphology_px``) resized the way
    patches are resized when they are read (bilinear, antialiased); ``x`` itself when already there."""
    s = int(img_size)
    if x.shape[-1] == s and x.shape[-2] == s:
        return x
    return _resize(x, s)


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side), bilinear and antialiased (as the patch readers resize)."""
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def _rgb(model, x: torch.Tensor) -> torch.Tensor:
    """Preprocessed patches back to RGB in [0, 1] (the normalisation undone)."""
    return ((x.float() * model.pixel_std + model.pixel_mean) / 255.0).clamp(0.0, 1.0)


def reading_stats(model, x: torch.Tensor, xv: torch.Tensor, feats: torch.Tensor, views: int) -> torch.Tensor:
    """``feats`` followed by the reading's statistics of the preprocessed patches ``x`` (``xv``:
    the same patches at the ViT's side, :func:`vit_input`, which the colour statistics read)."""
    v = model.config.vision
    if not (v.colour_features or v.morphology_px):
        return feats
    parts = [feats.float()]
    if v.colour_features:
        rgb = _rgb(model, xv)
        parts.append(mean_over_views(lambda t: colour_texture(t.permute(0, 2, 3, 1)), rgb, views))
    if v.morphology_px:  # statistics of the whole patch: no view averaging (they do not depend on orientation)
        full = _rgb(model, x)
        parts.append(morphology_stats(full.permute(0, 2, 3, 1), float(model.config.patch_um) / full.shape[-1]))
    return torch.cat(parts, 1)


__all__ = ["input_px", "preprocess", "vit_input", "reading_stats"]
