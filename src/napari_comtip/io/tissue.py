"""The one tissue detector: which pixels of a slide thumbnail are tissue.

Used for the spot grid of a bare slide (``io/bare.py``) and for the unlabelled tissue patches of
pretraining (``engine/data.py``). Otsu's threshold on HSV saturation, over pixels that are not
near-black, then closing, opening, hole filling and removal of small specks. It was kept over a
background-relative rule (saturation and grey level against a 3 % frame of the thumbnail) after
both were measured against the spots of every her2st section and both mouse-brain Visium runs:
at least as many spot centres inside the mask on every section (B4 0.82 vs 0.76, C3 0.98 vs
0.91, C4 0.98 vs 0.89), and as much or more of the mask within a spot pitch of a spot.
"""

from __future__ import annotations

import numpy as np


def tissue_mask(thumb: np.ndarray, min_object_px: int = 64) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail (Otsu on saturation; near-black and tiny specks removed).

    ``min_object_px``: connected pieces smaller than this (thumbnail pixels) are dropped.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    rgb = thumb[..., :3]
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    val = mx / 255.0  # HSV value and saturation, computed directly (skimage's rgb2hsv is 6x slower)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    valid = val > 0.15  # scanner borders, pen marks, black padding
    if valid.sum() < 16 or float(np.ptp(sat[valid])) < 0.05:
        return np.zeros(thumb.shape[:2], dtype=bool)
    thr = threshold_otsu(sat[valid])
    thr = max(thr, 0.05)  # a flat, washed-out slide has no tissue, not "half tissue"
    mask = (sat > thr) & valid
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndi.binary_opening(mask, structure=np.ones((3, 3)), iterations=1)
    mask = ndi.binary_fill_holes(mask)
    mask = remove_small_objects(mask, max_size=int(min_object_px)) if _skimage_has_max_size() else \
        remove_small_objects(mask, min_size=int(min_object_px))
    return mask


def _skimage_has_max_size() -> bool:
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


__all__ = ["tissue_mask"]
