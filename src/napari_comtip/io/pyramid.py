"""Pyramids of large single-level images, built once and cached as zarr.

A JPEG/PNG/TIFF whose longer side exceeds ``Default.PYRAMID_MIN_SIDE`` (e.g. the 92 MP her2st
JPEGs) is decoded once, a pyramid (factor 2) is built and written as zarr into
``cache_dir("pyramids")/<key>`` (key = hash of absolute path, size, mtime) and reopened from there
on later loads. Entries appear atomically (temporary folder, ``meta.json`` written last, rename);
a broken entry is rebuilt, never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..constants import Default
from ..progress import Progress
from .cache import cache_dir, file_identity, identity_key
from .decode import decode_image
from .image import MultiscaleImage, build_pyramid_levels

#: Bumped when the layout of cached pyramids changes (old caches are then rebuilt).
PYRAMID_CACHE_VERSION = 1

def _zarr_open_read(path: Path):
    import zarr

    return zarr.open_array(str(path), mode="r")


def _zarr_write(path: Path, arr: np.ndarray, chunks: tuple[int, int, int]) -> None:
    import zarr

    z = zarr.open_array(str(path), mode="w", shape=arr.shape, chunks=chunks, dtype="uint8")
    z[...] = arr


def pyramid_cache_path(path: str | os.PathLike) -> Path:
    """Where the pyramid of ``path`` is (or would be) cached."""
    return cache_dir("pyramids") / identity_key(file_identity(path))


def open_cached_pyramid(folder: Path, identity: str, source: str) -> MultiscaleImage | None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != PYRAMID_CACHE_VERSION or meta.get("identity") != identity:
            return None
        levels = [_zarr_open_read(folder / str(i)) for i in range(int(meta["n_levels"]))]
        if [list(lv.shape) for lv in levels] != [list(s) for s in meta["level_shapes"]]:
            return None
    except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt, never trusted
        return None
    return MultiscaleImage(levels, meta["downsamples"], identity=identity, source=source,
                           kind="cached pyramid", info={"cache": str(folder), "decoded": False})


def build_cached_pyramid(path: Path, identity: str, folder: Path, progress: Progress | None,
                          rgb: np.ndarray | None = None) -> MultiscaleImage:
    t0 = time.perf_counter()
    if progress:
        progress(0, 3, f"decoding {path.name}")
    if rgb is None:
        rgb = decode_image(path)
    t_decode = time.perf_counter() - t0
    if progress:
        progress(1, 3, "building pyramid")
    levels = build_pyramid_levels(rgb)
    downs = [float(Default.PYRAMID_FACTOR ** i) for i in range(len(levels))]
    if progress:
        progress(2, 3, "writing pyramid cache")
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tile = Default.PYRAMID_TILE
    try:
        tmp.mkdir(parents=True)
        for i, lv in enumerate(levels):
            _zarr_write(tmp / str(i), lv, (tile, tile, 3))
        meta = {
            "version": PYRAMID_CACHE_VERSION,
            "identity": identity,
            "source": str(path),
            "n_levels": len(levels),
            "level_shapes": [list(lv.shape) for lv in levels],
            "downsamples": downs,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        if folder.exists() and open_cached_pyramid(folder, identity, str(path)) is not None:
            # another process (e.g. another DDP rank) finished the same pyramid first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if folder.exists():  # a broken entry (killed before meta.json): replace it
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(tmp, folder)
            except OSError:
                # someone renamed theirs into place between our check and our rename: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    img = open_cached_pyramid(folder, identity, str(path))
    if img is None:  # pragma: no cover - cache folder not writable/readable: keep it in memory
        warnings.warn(f"could not use the pyramid cache at {folder}; keeping the pyramid in memory", stacklevel=2)
        img = MultiscaleImage(levels, downs, identity=identity, source=str(path), kind="in-memory pyramid")
    img.info.update({"decoded": True, "decode_s": round(t_decode, 3),
                     "build_s": round(time.perf_counter() - t0, 3)})
    if progress:
        progress(3, 3, "pyramid ready")
    return img


__all__ = ["pyramid_cache_path", "open_cached_pyramid", "build_cached_pyramid", "PYRAMID_CACHE_VERSION"]
