"""A bare slide (no spatial transcriptomics): tissue detection plus a regular spot grid.

The slide is opened like any other image (pyramidal TIFF/OME-TIFF/SVS lazily through tiffslide,
a large JPEG/PNG through the cached pyramid). Its microns per pixel come from the slide metadata
(``tiffslide.mpp-x``) or ``--mpp``. Tissue is found on a thumbnail (longer side
``Default.TISSUE_THUMB_SIDE``): Otsu's threshold on the HSV saturation, minus near-black pixels,
cleaned by morphology. A hexagonal grid with Visium geometry (pitch ``Default.VISIUM_PITCH_UM``,
spot diameter ``Default.VISIUM_SPOT_UM``, both scaled by ``pitch_um / 100``) is laid over the whole
slide, and a grid spot is kept when at least ``Default.TISSUE_MIN_FRACTION`` of its disc is tissue.
Spot ids are ``<array_row>x<array_col>`` (Visium array convention: odd rows use odd columns).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import Default, Key
from ..errors import InputError
from .image import MultiscaleImage
from .slide import open_image
from .tissue import tissue_mask
from .record import SpatialSample, mpp_with_override

FORMAT = "bare"


def hex_grid(height: float, width: float, pitch_px: float) -> pd.DataFrame:
    """Centres of a Visium-style hexagonal grid covering a ``height`` x ``width`` px image."""
    dy = pitch_px * math.sqrt(3) / 2
    n_rows = int(math.floor((height - pitch_px / 2) / dy)) + 1
    rows, cols, ar, ac = [], [], [], []
    for i in range(max(n_rows, 0)):
        y = pitch_px / 2 + i * dy
        x0 = pitch_px / 2 + (pitch_px / 2 if i % 2 else 0.0)
        n_cols = int(math.floor((width - x0) / pitch_px)) + 1 if width > x0 else 0
        for j in range(n_cols):
            rows.append(y - 0.5)  # continuous -> pixel index coordinates
            cols.append(x0 + j * pitch_px - 0.5)
            ar.append(i)
            ac.append(2 * j + (i % 2))
    return pd.DataFrame({Key.ROW: rows, Key.COL: cols, Key.ARRAY_ROW: ar, Key.ARRAY_COL: ac})


def grid_over_tissue(image: MultiscaleImage, mpp: float, pitch_um: float) -> tuple[pd.DataFrame, dict]:
    """The grid spots whose disc is mostly tissue, and what was measured on the way."""
    from scipy import ndimage as ndi

    H, W = image.shape[:2]
    pitch_px = pitch_um / mpp
    spot_um = Default.VISIUM_SPOT_UM * pitch_um / Default.VISIUM_PITCH_UM
    diameter_px = spot_um / mpp
    thumb = image.thumbnail(Default.TISSUE_THUMB_SIDE)
    th, tw = thumb.shape[:2]
    sy, sx = th / H, tw / W  # thumbnail px per full-resolution px
    spot_thumb = max(1.0, diameter_px * min(sy, sx))
    mask = tissue_mask(thumb, min_object_px=max(16, int(spot_thumb ** 2)))
    frac = ndi.uniform_filter(mask.astype(np.float32), size=max(1, int(round(spot_thumb))), mode="constant")
    grid = hex_grid(H, W, pitch_px)
    if len(grid):
        ty = np.clip(((grid[Key.ROW].to_numpy() + 0.5) * sy).astype(int), 0, th - 1)
        tx = np.clip(((grid[Key.COL].to_numpy() + 0.5) * sx).astype(int), 0, tw - 1)
        keep = frac[ty, tx] >= Default.TISSUE_MIN_FRACTION
        grid = grid.loc[keep].reset_index(drop=True)
    grid[Key.DIAMETER] = diameter_px
    grid[Key.IN_TISSUE] = 1
    grid.index = pd.Index([f"{r}x{c}" for r, c in zip(grid[Key.ARRAY_ROW], grid[Key.ARRAY_COL])], name="spot")
    info = {"pitch_um": pitch_um, "pitch_px": pitch_px, "spot_um": spot_um, "tissue_fraction": float(mask.mean()),
            "thumbnail_shape": [int(th), int(tw)]}
    return grid[[Key.ROW, Key.COL, Key.DIAMETER, Key.ARRAY_ROW, Key.ARRAY_COL, Key.IN_TISSUE]], info


def read_bare(path: str | os.PathLike, pitch_um: float | None = None, mpp: float | None = None,
              progress=None) -> SpatialSample:
    path = Path(path)
    image, slide_mpp = open_image(path, progress=progress)
    mpp_val, mpp_source = mpp_with_override(slide_mpp, "slide metadata (tiffslide mpp-x)", mpp, path=path)
    pitch = float(pitch_um) if pitch_um else Default.VISIUM_PITCH_UM
    if pitch / mpp_val < 4:
        raise InputError(f"a {pitch:g} um pitch is only {pitch / mpp_val:.1f} px at {mpp_val:g} um/px", path=path,
                         hint="check --mpp and --pitch-um")
    spots, info = grid_over_tissue(image, mpp_val, pitch)
    if len(spots) == 0:
        raise InputError(f"no tissue detected (tissue covers {info['tissue_fraction']:.1%} of the thumbnail)", path=path,
                         hint="check that this is an H&E slide; a smaller --pitch-um fits smaller tissue")
    provenance = {
        "reader": "bare",
        "image": str(path),
        "image_identity": image.identity,
        "image_kind": image.kind,
        "grid": info,
        "dropped_spots": 0,
        "inputs": [str(path)],
    }
    name = path.name.split(".")[0]
    return SpatialSample(name=name, image=image, mpp=mpp_val, mpp_source=mpp_source, spots=spots, expression=None,
                         format=FORMAT, provenance=provenance)


__all__ = ["read_bare", "hex_grid", "grid_over_tissue", "FORMAT"]
