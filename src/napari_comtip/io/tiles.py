"""Decoded slide tiles for patch reading: a bounded tile cache and direct TIFF tile decoding.

:class:`TileCachedImage` is a read-only view of a :class:`~napari_comtip.io.image.MultiscaleImage`
that answers ``read_level_window`` (what :func:`~napari_comtip.io.patches.read_patch` calls) from
an LRU cache of decoded tiles, so that overlapping and neighbouring spot patches decode each slide
tile once. Tiles of plain tiled TIFF levels are read with ``pread`` and decoded by tifffile
(:class:`_TiffTiles`, no zarr call per read); other chunked levels fetch all the chunks a window
misses in one slicing call (:class:`_ArrayChunks`). :func:`spatial_order` is the read order
(band by band) that lets the cache work on spot tables in barcode order.

A tile that cannot be decoded (a damaged or truncated slide) raises
:class:`~napari_comtip.errors.InputError` naming the file, the level and the tile.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict

import numpy as np

from ..constants import Default
from .image import tile_error


def spatial_order(centres_rc: np.ndarray, side_px: float) -> np.ndarray:
    """A read order that visits spots band by band (bands one patch high), left to right.

    Spot tables are often in barcode order, which is spatially random; reading neighbours one
    after the other lets :class:`TileCachedImage` decode each slide tile once. Results are
    written back to the spots' own rows, so the order never shows outside the engine.
    """
    n = len(centres_rc)
    if n == 0:
        return np.arange(0, dtype=np.int64)
    band = np.floor(centres_rc[:, 0] / max(float(side_px), 1.0))
    return np.lexsort((centres_rc[:, 1], band)).astype(np.int64)


def _pread(fd: int, count: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, count, offset)
    with _PREAD_LOCK:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, count)


_PREAD_LOCK = threading.Lock()


class _TiffTiles:
    """Tiles of one level of a tiled TIFF, read with ``pread`` and decoded by tifffile, no zarr.

    Slicing tiffslide's zarr view costs several milliseconds per call in zarr's async machinery
    (measured in docs/performance.md), several times the JPEG decoding itself.
    """

    def __init__(self, page, path: str, level: int = 0):
        self.path, self.level = path, int(level)
        self.th, self.tw = int(page.tilelength), int(page.tilewidth)
        self.H, self.W = int(page.imagelength), int(page.imagewidth)
        self.ntx = -(-self.W // self.tw)
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.jpegtables = page.jpegtables
        self.decode = page.decode
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.chunk = (self.th, self.tw)

    def fetch(self, tiles: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        from .image import to_rgb_uint8

        out = {}
        for ty, tx in tiles:
            i = ty * self.ntx + tx
            h, w = min(self.th, self.H - ty * self.th), min(self.tw, self.W - tx * self.tw)
            cnt = int(self.counts[i])
            if cnt == 0:  # a sparse (never written) tile reads as zeros, as in tifffile
                out[(ty, tx)] = np.zeros((h, w, 3), np.uint8)
                continue
            try:
                seg, _, _ = self.decode(_pread(self.fd, cnt, int(self.offsets[i])), i, jpegtables=self.jpegtables)
                seg = np.asarray(seg).reshape(self.th, self.tw, -1)[:h, :w]
            except Exception as exc:  # noqa: BLE001 - codecs raise their own types (imagecodecs.Jpeg8Error, ...)
                raise tile_error(self.path, self.level, (ty, tx), exc) from None
            out[(ty, tx)] = seg if seg.shape[2] == 3 and seg.dtype == np.uint8 else to_rgb_uint8(seg)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _ArrayChunks:
    """Chunks of a chunked array (zarr): all missing chunks of a window in one slicing call."""

    def __init__(self, arr, chunk: tuple[int, int], level: int = 0, path: str | None = None):
        self.arr = arr
        self.path, self.level = path, int(level)
        self.th, self.tw = int(chunk[0]), int(chunk[1])
        self.H, self.W = int(arr.shape[0]), int(arr.shape[1])
        self.chunk = (self.th, self.tw)

    def fetch(self, tiles: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        tys = [t[0] for t in tiles]
        txs = [t[1] for t in tiles]
        ty0, ty1, tx0, tx1 = min(tys), max(tys), min(txs), max(txs)
        r0, c0 = ty0 * self.th, tx0 * self.tw
        try:
            block = np.asarray(self.arr[r0:min(self.H, (ty1 + 1) * self.th), c0:min(self.W, (tx1 + 1) * self.tw)])
        except Exception as exc:  # noqa: BLE001 - the store's codec failed on one of these chunks
            raise tile_error(self.path, self.level, (ty0, tx0), exc, last=(ty1, tx1)) from None
        out = {}
        for ty, tx in tiles:
            a, b = (ty - ty0) * self.th, (tx - tx0) * self.tw
            out[(ty, tx)] = np.ascontiguousarray(block[a:a + self.th, b:b + self.tw, :3])
        return out

    def close(self) -> None:
        pass


class TileCachedImage:
    """A read-only view of a :class:`~napari_comtip.io.image.MultiscaleImage` for ``read_patch``.

    It answers ``read_level_window`` from an LRU cache of decoded tiles (``Default.TILE_CACHE_BYTES``
    in all), so that overlapping and neighbouring spot patches decode each slide tile once.
    Levels of tiled TIFFs opened through tiffslide are decoded directly with tifffile (no zarr
    call per read); other chunked levels (the cached zarr pyramids of JPEG slides) fetch all the
    chunks a window misses in one slicing call; in-memory levels are sliced directly. The pixels
    are exactly those of the image's own ``read_level_window`` (tested).

    Cached tiles live in one preallocated slab of equal slots (the decoded tile is copied in and
    freed at once): tiles held for different times by several reader threads had fragmented the
    heap, and the process grew with the number of spots (docs/performance.md). Because a slot is
    reused after eviction, pixels of cached tiles are copied out while the lock is held.
    """

    def __init__(self, image, max_bytes: int | None = None):
        self.image = image
        self.downsamples = image.downsamples
        self.levels = image.levels
        self.shape = image.shape
        self.identity = image.identity
        self.max_bytes = int(Default.TILE_CACHE_BYTES if max_bytes is None else max_bytes)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._slot_of: dict[tuple[int, int, int], int] = {}  # cache key -> slab slot
        self._slab: np.ndarray | None = None  # (slots, th, tw, 3) uint8, made on the first insert
        self._free: list[int] = []
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._tiff: list | None | bool = False  # tifffile pages per level, looked up on first use
        self._sources: list = [False] * len(image.levels)  # False = not set up yet; None = slice directly

    # ------------------------------------------------------------------ sources
    def _tiff_pages(self) -> list | None:
        """tifffile pages of each level when the image is a plain tiled TIFF pyramid read by tiffslide."""
        slide = getattr(self.image, "_keepalive", None)
        if getattr(self.image, "kind", "") != "tiffslide" or slide is None or not self.image.source:
            return None
        try:
            props = slide.properties
            if props.get("tiffslide.series-composition"):
                return None
            series = slide.ts_tifffile.series[int(props.get("tiffslide.series-index", 0) or 0)]
            pages = []
            for i, lvl in enumerate(series.levels):
                pg = lvl.keyframe
                ok = (len(lvl.pages) == 1 and pg.is_tiled and int(pg.planarconfig) == 1 and pg.dtype == np.uint8
                      and pg.samplesperpixel in (3, 4) and int(pg.imagedepth) == 1
                      and (int(pg.imagelength), int(pg.imagewidth)) == tuple(self.image.level_shapes[i][:2]))
                pages.append(pg if ok else None)
            return pages if len(pages) == len(self.image.levels) else None
        except Exception:  # noqa: BLE001 - anything unexpected: use the generic path
            return None

    def source(self, i: int):
        """The tile source of level ``i`` (set up on first use: only the levels read cost anything)."""
        src = self._sources[i]
        if src is False:
            with self._lock:
                if self._sources[i] is False:
                    if self._tiff is False:
                        self._tiff = self._tiff_pages()
                    self._sources[i] = self._source(i, self._tiff)
                src = self._sources[i]
        return src

    def _source(self, i: int, tiff: list | None):
        if tiff is not None and tiff[i] is not None:
            src = _TiffTiles(tiff[i], str(self.image.source), i)
            if self._agrees(i, src):
                return src
            src.close()
        lv = self.image.levels[i]
        chunks = getattr(lv, "chunks", None)
        if isinstance(lv, np.ndarray) or not chunks or len(chunks) < 2:
            return None
        try:
            th, tw = int(chunks[0]), int(chunks[1])
        except (TypeError, ValueError):
            return None
        if th * tw * 3 > 32 * 2**20 or th * tw <= 0:
            return None  # huge chunks: caching whole chunks would cost more than it saves
        return _ArrayChunks(lv, (th, tw), i, self.image.source)

    def _agrees(self, i: int, src: _TiffTiles) -> bool:
        """Decode one tile directly and compare with the level's own reader (guards exotic TIFFs)."""
        try:
            h, w = min(src.th, src.H), min(src.tw, src.W)
            ref = self.image.read_level_window(i, 0, 0, h, w)
            return bool(np.array_equal(src.fetch([(0, 0)])[(0, 0)][:h, :w], ref))
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        for src in self._sources:
            if src:
                src.close()
        self._sources = [False] * len(self._sources)
        self._cache.clear()

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ the read_patch interface
    def best_level(self, downsample: float) -> int:
        return self.image.best_level(downsample)

    def read_level_window(self, level: int, row0: int, col0: int, height: int, width: int,
                          pad_value: int = Default.PAD_VALUE) -> np.ndarray:
        src = self.source(level)
        if src is None:
            return self.image.read_level_window(level, row0, col0, height, width, pad_value=pad_value)
        row0, col0, height, width = int(row0), int(col0), int(height), int(width)
        out = np.full((height, width, 3), pad_value, dtype=np.uint8)
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + height, src.H), min(col0 + width, src.W)
        if r1 <= r0 or c1 <= c0:
            return out
        th, tw = src.chunk
        wanted = [(ty, tx) for ty in range(r0 // th, (r1 - 1) // th + 1) for tx in range(c0 // tw, (c1 - 1) // tw + 1)]
        missing = []

        def paste(t: tuple[int, int], arr: np.ndarray) -> None:
            tr0, tc0 = t[0] * th, t[1] * tw
            a0, a1 = max(r0, tr0), min(r1, tr0 + arr.shape[0])
            b0, b1 = max(c0, tc0), min(c1, tc0 + arr.shape[1])
            if a1 > a0 and b1 > b0:
                out[a0 - row0:a1 - row0, b0 - col0:b1 - col0] = arr[a0 - tr0:a1 - tr0, b0 - tc0:b1 - tc0]

        with self._lock:
            for t in wanted:
                hit = self._cache.get((level, *t))
                if hit is None:
                    missing.append(t)
                else:
                    self._cache.move_to_end((level, *t))
                    paste(t, hit)  # under the lock: the slot may be reused once it is released
            self.hits += len(wanted) - len(missing)
            self.misses += len(missing)
        if missing:
            fetched = src.fetch(missing)  # decoding happens outside the lock
            for t, arr in fetched.items():
                paste(t, arr)
            with self._lock:
                for t, arr in fetched.items():
                    self._insert((level, *t), arr, (th, tw))
        return out

    def _insert(self, key: tuple[int, int, int], arr: np.ndarray, chunk: tuple[int, int]) -> None:
        """Cache a decoded tile (caller holds the lock), evicting least recently used ones.

        Slots have the source's full tile shape ``chunk`` (edge tiles are smaller and use part of
        a slot), so the first tile read deciding the slot size cannot be an edge tile."""
        if key in self._cache:
            return
        if self._slab is None and arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
            slot_shape = (max(int(chunk[0]), arr.shape[0]), max(int(chunk[1]), arr.shape[1]), 3)
            n = self.max_bytes // max(1, int(np.prod(slot_shape)))
            if n >= 1:
                self._slab = np.empty((n, *slot_shape), dtype=np.uint8)
                self._free = list(range(n - 1, -1, -1))
        slab = self._slab
        fits = (slab is not None and arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[2] == 3
                and arr.shape[0] <= slab.shape[1] and arr.shape[1] <= slab.shape[2])
        need = slab[0].nbytes if fits else arr.nbytes
        while self._cache and (self._bytes + need > self.max_bytes or (fits and not self._free)):
            old_key, old = self._cache.popitem(last=False)
            slot = self._slot_of.pop(old_key, None)
            if slot is None:
                self._bytes -= old.nbytes
            else:
                self._free.append(slot)
                self._bytes -= slab[0].nbytes
        if fits and self._free:
            slot = self._free.pop()
            view = slab[slot, :arr.shape[0], :arr.shape[1]]
            view[...] = arr
            self._cache[key] = view
            self._slot_of[key] = slot
        elif not fits and need <= self.max_bytes:
            self._cache[key] = arr
        else:
            return
        self._bytes += need


__all__ = ["TileCachedImage", "spatial_order"]
