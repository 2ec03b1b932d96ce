"""Spot and tissue patches cut once from a slide and kept on disk (``cache_dir("patches")``).

:class:`PatchCache` stores each sample's patches as ``.npy`` keyed by the sample's image identity,
the exact patch centres, ``patch_um`` and the output size, and memory-maps them afterwards:
training epochs and the benchmark's folds never decode slides again. :func:`read_patches` cuts
them (a thread pool over :func:`napari_comtip.io.patches.read_patch`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..progress import Cancel, Progress


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
                 progress: Progress | None = None, cancel: Cancel | None = None, num_workers: int = 2) -> np.ndarray:
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
            progress: Progress | None = None, cancel: Cancel | None = None) -> np.ndarray:
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


__all__ = ["PatchCache", "read_patches"]
