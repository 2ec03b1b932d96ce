"""Spot patches: a square of fixed physical size centred on each spot, resized to ``out_px``.

One function, :func:`read_patch`, cuts every patch the package ever uses (training, inference,
the widgets), so training and inference see identical pixels:

1. the patch side in full-resolution pixels is ``patch_um / mpp`` (:func:`patch_geometry`);
2. the pyramid level is ``image.best_level(side / out_px)`` (the coarsest level that still has
   at least ``out_px`` pixels across the patch);
3. the exact (sub-pixel) square ``[c - side/2, c + side/2)`` around the centre's continuous
   coordinate ``c = index + 0.5`` is resampled to ``out_px`` x ``out_px`` with PIL's antialiased
   bilinear filter (its support widens with the reduction factor, i.e. area-like averaging);
4. whatever lies outside the slide is padded with ``Default.PAD_VALUE`` (white glass).

Batches are read ahead of the encoder by the engine (``engine/readers.py``, over the tile cache
of ``io/tiles.py``), always through this function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..constants import Default
from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .image import MultiscaleImage


def patch_geometry(mpp: float, patch_um: float, out_px: int | None = None) -> float:
    """Side of a ``patch_um`` patch in full-resolution pixels (``out_px`` is accepted for symmetry)."""
    if not (mpp and mpp > 0 and math.isfinite(mpp)):
        raise InputError(f"microns per pixel must be a positive number, got {mpp!r}",
                         hint="pass --mpp with the slide's resolution")
    if not (patch_um and patch_um > 0):
        raise InputError(f"the patch size must be positive, got {patch_um!r} um")
    return float(patch_um) / float(mpp)


def read_patch(image: "MultiscaleImage", center_rc: Sequence[float], side_px_full: float, out_px: int,
               pad_value: int = Default.PAD_VALUE) -> np.ndarray:
    """An (out_px, out_px, 3) uint8 patch of side ``side_px_full`` centred on ``center_rc``.

    ``center_rc`` = (row, col) pixel index of the centre in full-resolution pixels (floats allowed).
    Row 0 of the result is the top of the slide, column 0 its left side (no transposition).
    """
    from PIL import Image

    out_px = int(out_px)
    side = float(side_px_full)
    level = image.best_level(side / out_px)
    d = image.downsamples[level]
    # continuous level coordinates of the patch square
    cy = (float(center_rc[0]) + 0.5) / d
    cx = (float(center_rc[1]) + 0.5) / d
    s = side / d
    top, left = cy - s / 2.0, cx - s / 2.0
    # integer window covering the square plus the filter support
    margin = int(math.ceil(max(1.0, s / out_px))) + 1
    r0 = int(math.floor(top)) - margin
    c0 = int(math.floor(left)) - margin
    r1 = int(math.ceil(top + s)) + margin
    c1 = int(math.ceil(left + s)) + margin
    win = image.read_level_window(level, r0, c0, r1 - r0, c1 - c0, pad_value=pad_value)
    box = (left - c0, top - r0, left - c0 + s, top - r0 + s)  # PIL: (x0, y0, x1, y1)
    pil = Image.fromarray(win)
    if abs(s - out_px) < 1e-9 and all(abs(b - round(b)) < 1e-9 for b in box):
        x0, y0 = int(round(box[0])), int(round(box[1]))
        return np.ascontiguousarray(win[y0:y0 + out_px, x0:x0 + out_px])
    res = pil.resize((out_px, out_px), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.asarray(res)


__all__ = ["patch_geometry", "read_patch"]
