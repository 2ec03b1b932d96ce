"""A lazy multiscale RGB image in full-resolution pixel coordinates.

:class:`MultiscaleImage` is the one image type the rest of the package sees, whatever the file
(``io/slide.py`` opens files as one: tiffslide levels, cached zarr pyramids, in-memory arrays).

Coordinates.  The image is addressed in *full-resolution* pixels.  ``downsamples[i]`` is the number
of full-resolution pixels per pixel of level ``i``; ``downsamples[0]`` is 1.0 for a real slide and
``1 / tissue_hires_scalef`` (e.g. 6.67) for a Visium hires PNG.  ``shape`` is the full-resolution
extent (H, W, 3) that the image covers, ``level_shapes`` the array shapes.  Continuous coordinates
put pixel ``i``'s centre at ``i + 0.5``; full-resolution continuous ``y`` lies at ``y / d`` in a
level of downsample ``d``.  A pixel index ``r`` of a spot centre (as in the spot tables) is the
continuous coordinate ``r + 0.5``.  For napari, show ``as_dask()`` with ``scale = (base_scale,
base_scale)`` (the layer's level-0 scale); napari derives the coarser levels from their shapes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..constants import Default
from ..errors import InputError


# --------------------------------------------------------------------------- pixel helpers
def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any integer/float type -> (H, W, 3) uint8.

    RGBA is composited over white; 16-bit is scaled to 8-bit; floats are taken as 0..1 when
    their maximum is <= 1, else as 0..255.
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image array (H, W[, C]), got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind == "f":
            mx = float(np.nanmax(a)) if a.size else 1.0
            a = np.nan_to_num(a * (255.0 if mx <= 1.0 else 1.0))
            a = np.clip(a, 0, 255).astype(np.uint8)
        elif a.dtype.kind in "ui":
            mx = np.iinfo(a.dtype).max
            a = (np.clip(a, 0, mx).astype(np.float64) * (255.0 / mx)).round().astype(np.uint8) if mx > 255 \
                else np.clip(a, 0, 255).astype(np.uint8)
        elif a.dtype == bool:
            a = a.astype(np.uint8) * 255
        else:
            raise ValueError(f"unsupported image dtype {a.dtype}")
    c = a.shape[2]
    if c == 3:
        return a
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        if np.all(alpha == 1.0):
            return np.ascontiguousarray(a[..., :3])
        rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if c > 4:
        return np.ascontiguousarray(a[..., :3])
    return np.repeat(a[..., :1], 3, axis=2)  # pragma: no cover - c == 2 (grey + alpha)


def is_blank(arr: np.ndarray, tol: float = 2.0) -> bool:
    """True when an image is (nearly) one flat colour, e.g. the all-black placeholder hires PNG."""
    a = np.asarray(arr)
    if a.size == 0:
        return True
    step = max(1, int(max(a.shape[:2]) // 512))
    a = to_rgb_uint8(a[::step, ::step])
    return float(a.astype(np.float32).std()) < tol


class _RGBLevel:
    """Array-like adapter: a lazily sliced level that is not (H, W, 3) uint8 yet."""

    def __init__(self, arr):
        self._arr = arr
        self.shape = (int(arr.shape[0]), int(arr.shape[1]), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.chunks = getattr(arr, "chunks", None)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key[:2]) + (slice(None),) * (2 - min(2, len(key)))
        out = to_rgb_uint8(np.asarray(self._arr[key[0], key[1]]))
        rest = key[2:] if len(key) > 2 else ()
        return out[(slice(None), slice(None)) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


def _as_rgb_level(arr):
    shape = tuple(arr.shape)
    if len(shape) == 3 and shape[2] == 3 and np.dtype(arr.dtype) == np.uint8:
        return arr
    if isinstance(arr, np.ndarray):
        return to_rgb_uint8(arr)
    return _RGBLevel(arr)


def _settle_zarr(timeout_s: float = 10.0) -> None:
    """Let zarr's I/O loop finish the chunk reads a failed slice left running.

    When one chunk's codec raises, zarr (3.x) returns the error at once and leaves the other
    chunk tasks of that slice pending on its background loop; at interpreter exit each is then
    reported as "Task was destroyed but it is pending!". Waiting for them here keeps the one-line
    error alone on stderr.
    """
    import asyncio

    try:
        from zarr.core import sync as zsync

        loop = zsync.loop[0]
    except (ImportError, AttributeError, IndexError):
        return
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def _drain() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout_s)

    try:
        asyncio.run_coroutine_threadsafe(_drain(), loop).result(timeout_s + 1)
    except Exception:  # noqa: BLE001 - best effort: at worst the warnings appear
        pass


class _ShownLevel:
    """A level as napari reads it: a tile that cannot be decoded shows as padding, with one warning.

    The viewer stays usable on a damaged slide: the warning (a napari notification) names the
    file, level and tile, once per level.
    """

    def __init__(self, image: "MultiscaleImage", level: int):
        self._image, self._level = image, int(level)
        self._lv = image.levels[level]
        self.shape = tuple(int(s) for s in self._lv.shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)
        self._warned = False

    def __getitem__(self, key):
        try:
            return np.asarray(self._lv[key])
        except Exception as exc:  # noqa: BLE001 - a codec failed on a tile of a damaged file
            _settle_zarr()
            key = key if isinstance(key, tuple) else (key,)
            spans = [range(*(k if isinstance(k, slice) else slice(k, k + 1)).indices(n))
                     for k, n in zip(tuple(key) + (slice(None),) * (self.ndim - len(key)), self.shape)]
            if not self._warned:
                self._warned = True
                r, c = spans[0], spans[1]
                err = _first_bad_tile(self._lv, self._image.source, self._level,
                                      (r.start, max(r.stop, r.start + 1), c.start, max(c.stop, c.start + 1)), exc)
                warnings.warn(f"{err} (shown blank)", stacklevel=2)
            return np.full(tuple(len(s) for s in spans), Default.PAD_VALUE, dtype=np.uint8)


def _first_bad_tile(lv, source, level: int, window: tuple[int, int, int, int], exc: BaseException,
                    max_tiles: int = 4096) -> InputError:
    """The error for a window that failed to decode, naming the first tile that fails on its own."""
    r0, r1, c0, c1 = window
    chunks = getattr(lv, "chunks", None)
    if not chunks or len(chunks) < 2:
        return tile_error(source, level, (0, 0), exc)
    th, tw = int(chunks[0]), int(chunks[1])
    tiles = [(ty, tx) for ty in range(r0 // th, (r1 - 1) // th + 1) for tx in range(c0 // tw, (c1 - 1) // tw + 1)]
    if len(tiles) <= max_tiles:
        H, W = lv.shape[:2]
        for ty, tx in tiles:
            try:
                np.asarray(lv[ty * th:min(H, (ty + 1) * th), tx * tw:min(W, (tx + 1) * tw)])
            except Exception as tile_exc:  # noqa: BLE001
                _settle_zarr()
                return tile_error(source, level, (ty, tx), tile_exc)
    return tile_error(source, level, tiles[0], exc, last=tiles[-1])


def tile_error(path, level: int, tile: tuple[int, int], exc: BaseException,
               last: tuple[int, int] | None = None) -> InputError:
    """The one-line error for a slide tile that cannot be decoded: file, level, tile (row, col)."""
    where = f"tile {tile}" if last is None or tuple(last) == tuple(tile) else f"tiles {tile}..{tuple(last)}"
    detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return InputError(f"cannot decode {where} (row, col) of level {level} ({cause})", path=path,
                      hint="the slide is damaged or truncated; re-export or re-download it")


# --------------------------------------------------------------------------- the image
class MultiscaleImage:
    """A pyramid of (H, W, 3) uint8 levels addressed in full-resolution pixels (see module docs)."""

    def __init__(
        self,
        levels: Sequence[Any],
        downsamples: Sequence[float] | None = None,
        *,
        identity: str = "",
        full_shape: tuple[int, int] | None = None,
        source: str | None = None,
        kind: str = "in-memory",
        info: dict[str, Any] | None = None,
        keepalive: Any = None,
    ):
        if not levels:
            raise ValueError("a MultiscaleImage needs at least one level")
        self.levels = [_as_rgb_level(lv) for lv in levels]
        if downsamples is None:
            h0, w0 = self.levels[0].shape[:2]
            downsamples = [1.0] + [
                float(np.mean([h0 / lv.shape[0], w0 / lv.shape[1]])) for lv in self.levels[1:]
            ]
        self.downsamples = [float(d) for d in downsamples]
        if len(self.downsamples) != len(self.levels):
            raise ValueError("one downsample per level")
        if any(not (d > 0 and math.isfinite(d)) for d in self.downsamples):
            raise ValueError(f"downsamples must be positive: {self.downsamples}")
        if any(b < a for a, b in zip(self.downsamples, self.downsamples[1:])):
            raise ValueError(f"levels must go from fine to coarse: {self.downsamples}")
        if full_shape is None:
            h, w = self.levels[0].shape[:2]
            d0 = self.downsamples[0]
            full_shape = (int(round(h * d0)), int(round(w * d0)))
        self._full_shape = (int(full_shape[0]), int(full_shape[1]), 3)
        self.identity = identity or f"in-memory:{id(self)}"
        self.source = source
        self.kind = kind
        self.info = dict(info or {})
        self._keepalive = keepalive  # e.g. the TiffSlide object whose zarr store we read

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_array(cls, arr: np.ndarray, *, pyramid: bool = False, downsample: float = 1.0,
                   full_shape: tuple[int, int] | None = None, identity: str = "", source: str | None = None,
                   **kw) -> "MultiscaleImage":
        """Wrap an in-memory array; with ``pyramid=True`` also build coarser levels in memory."""
        rgb = to_rgb_uint8(arr)
        if pyramid:
            levels = build_pyramid_levels(rgb)
            downs = [downsample * Default.PYRAMID_FACTOR ** i for i in range(len(levels))]
        else:
            levels, downs = [rgb], [downsample]
        return cls(levels, downs, identity=identity, full_shape=full_shape, source=source, **kw)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Full-resolution extent (H, W, 3) covered by the image."""
        return self._full_shape

    @property
    def level_shapes(self) -> list[tuple[int, int, int]]:
        return [tuple(int(s) for s in lv.shape[:2]) + (3,) for lv in self.levels]

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def base_scale(self) -> float:
        """Full-resolution pixels per level-0 pixel (the napari layer's ``scale``)."""
        return self.downsamples[0]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (level 0 when none is)."""
        best = 0
        for i, d in enumerate(self.downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    # ------------------------------------------------------------------ reopening elsewhere
    def reopen_spec(self) -> tuple | None:
        """A small picklable recipe to open this same image in another process, or None.

        Only file-backed images have one (a slide read through tiffslide, a cached zarr pyramid):
        another process reopens the file instead of receiving the pixels. In-memory images
        (small by construction) and napari layers have none. See :func:`napari_comtip.io.slide.reopen_image`.
        """
        if self.kind == "tiffslide" and self.source:
            return ("tiffslide", str(self.source), self.identity)
        if self.kind == "cached pyramid" and self.info.get("cache"):
            return ("cached pyramid", str(self.info["cache"]), self.identity, str(self.source or ""))
        return None

    # ------------------------------------------------------------------ reading
    def read_level_window(self, level: int, row0: int, col0: int, height: int, width: int,
                          pad_value: int = Default.PAD_VALUE) -> np.ndarray:
        """A (height, width, 3) window of level ``level`` in that level's own integer pixels, padded."""
        lv = self.levels[level]
        H, W = lv.shape[:2]
        height, width = int(height), int(width)
        out = np.full((height, width, 3), pad_value, dtype=np.uint8)
        r0, c0 = max(int(row0), 0), max(int(col0), 0)
        r1, c1 = min(int(row0) + height, H), min(int(col0) + width, W)
        if r1 > r0 and c1 > c0:
            try:
                block = np.asarray(lv[r0:r1, c0:c1])
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - a codec failed on a tile of a damaged file
                _settle_zarr()
                raise _first_bad_tile(lv, self.source, level, (r0, r1, c0, c1), exc) from None
            if block.ndim == 3 and block.shape[2] != 3:
                block = to_rgb_uint8(block)
            out[r0 - int(row0):r1 - int(row0), c0 - int(col0):c1 - int(col0)] = block
        return out

    def read_region(self, level: int, row0: float, col0: float, height: int, width: int,
                    pad_value: int = Default.PAD_VALUE) -> np.ndarray:
        """A (height, width, 3) uint8 region of level ``level``.

        ``row0``/``col0`` are the region's top-left corner in *full-resolution* pixels (as in
        OpenSlide's ``read_region``); ``height``/``width`` are in pixels of ``level``. Parts of the
        region outside the image are filled with ``pad_value``.
        """
        d = self.downsamples[level]
        return self.read_level_window(level, int(math.floor(row0 / d + 1e-9)), int(math.floor(col0 / d + 1e-9)),
                                      height, width, pad_value)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole image, resized so that its longer side is ``max_side`` (aspect of the full extent)."""
        from PIL import Image

        H, W = self.shape[:2]
        scale = max_side / max(H, W)
        th, tw = max(1, int(round(H * scale))), max(1, int(round(W * scale)))
        # finest level that is still no smaller than the thumbnail: read it whole
        idx = 0
        for i, (h, w, _) in enumerate(self.level_shapes):
            if h >= th and w >= tw:
                idx = i
        h, w = self.level_shapes[idx][:2]
        arr = self.read_level_window(idx, 0, 0, h, w)  # a decode error names the file, level and tile
        return np.asarray(Image.fromarray(arr).resize((tw, th), Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR))

    def as_dask(self) -> list:
        """The levels as dask arrays (napari multiscale layer data), chunked like the store."""
        import dask.array as da

        out = []
        for lv in self.levels:
            chunks = getattr(lv, "chunks", None)
            if not chunks or len(chunks) != 3 or not all(isinstance(c, int) for c in chunks):
                chunks = (Default.PYRAMID_TILE, Default.PYRAMID_TILE, 3)
            out.append(da.from_array(_ShownLevel(self, len(out)), chunks=chunks, asarray=True, fancy=False))
        return out

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        shapes = ", ".join(f"{s[1]}x{s[0]}" for s in self.level_shapes)
        return (f"MultiscaleImage({self.kind}, full {self.shape[1]}x{self.shape[0]}, levels [{shapes}], "
                f"downsamples {[round(d, 3) for d in self.downsamples]})")


# --------------------------------------------------------------------------- pyramid building
def build_pyramid_levels(rgb: np.ndarray, smallest: int | None = None,
                         factor: int | None = None) -> list[np.ndarray]:
    """Level 0 plus box-averaged levels (``factor`` per step; odd edges: ceil) down to ``smallest``.

    Level ``i`` pixel ``j`` covers level-0 pixels ``[j*f**i, (j+1)*f**i)``, so its downsample is
    exactly ``f**i``.
    """
    from PIL import Image

    smallest = Default.PYRAMID_SMALLEST if smallest is None else int(smallest)
    factor = Default.PYRAMID_FACTOR if factor is None else int(factor)
    levels = [rgb]
    cur = Image.fromarray(rgb)
    while max(cur.size) // factor >= smallest:
        cur = cur.reduce(factor)
        levels.append(np.asarray(cur))
    return levels


__all__ = ["MultiscaleImage", "build_pyramid_levels", "to_rgb_uint8", "is_blank", "tile_error"]
