"""Batched image embedding of every spot of a sample, with an on-disk embedding cache.

:func:`embed_sample` runs the CoMTIP image encoder over the spot patches of a
:class:`~napari_comtip.io.record.SpatialSample` and returns an :class:`Embeddings` record.

The pipeline is built so that the encoder's arithmetic is the limit, not Python, slide decoding
or data movement (measured in ``docs/performance.md``, benchmarks in ``bench/``):

* **read-ahead**: patch batches are read from the lazy pyramid (``io.patches.read_patch``, which
  picks the pyramid level that matches the encoder's input size, so no full-resolution pixels
  are decoded needlessly) by a thread pool, ``Default.PREFETCH_BATCHES`` batches ahead of the
  encoder, into a ring of reusable buffers (page-locked on CUDA, so host-to-device copies are
  ``non_blocking``); on a GPU from ``Default.READ_PROCESS_MIN_SPOTS`` spots on, by worker
  processes instead (:func:`default_read_processes`, ``_process_reader.py``), because reader
  threads share one interpreter lock;
* **CPU streams**: on the CPU, batches are read and encoded side by side on several threads
  (:func:`default_cpu_streams`), each with ``threads // streams`` torch threads: reading
  overlaps encoding without a reader thread fighting torch's threads for the cores, and no core
  waits for the others at the end of every operator (measured +25-30 % on 2 cores);
* **compute**: ``torch.inference_mode``, bf16 autocast on CUDA (fp16 where bf16 is missing),
  channels-last input on CUDA (measured: no gain on the CPU for a ViT, so not used there);
  uint8 patches travel to the device and are normalised there (4x less traffic than float);
* **results** go into preallocated arrays; device-to-host copies of batch *i* complete while
  batch *i+1* computes;
* **out of memory**: a ``torch.cuda.OutOfMemoryError`` halves the compute batch and retries
  the same spots; the run continues at the smaller size;
* **bounded memory**: work and memory are linear in the number of spots, and when the
  embeddings of a sample exceed ``Default.EMBED_STREAM_BYTES`` (Visium HD-scale grids) they are
  streamed batch by batch into ``.npy`` files under ``cache_dir("embeddings")`` with positional
  writes (not a writable memory map, whose dirty pages would count as resident memory) and come
  back as read-only memory maps;
* **cache**: a finished run is stored under ``cache_dir("embeddings")/<name>-<key>/`` with a
  ``signature.json`` (sample identity, hash of the spot coordinates, pixel size, digest of the
  model's weights, patch size in µm, input size, precision, dimensions). The signature is
  compared field by field before reuse; any difference (or an unreadable/short array) means the
  entry is recomputed and replaced, never silently reused. Entries appear atomically (written in
  a temporary folder, then renamed), so a cancelled or crashed run leaves nothing half-written.

Progress is reported as ``progress(done, total, message)`` after each batch; ``cancel()`` is
polled between batches and raises :class:`~napari_comtip.errors.Cancelled`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..constants import Default
from ..errors import Cancelled, InputError
from ..progress import Cancel, Progress
from .device import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    from ..io.record import SpatialSample

log = logging.getLogger(__name__)

#: Version of the cache layout and of what is hashed into a signature; bump to invalidate.
CACHE_FORMAT = 1



# =========================================================================== result record
@dataclass
class Embeddings:
    """Image embeddings of every spot of one sample, in the sample's spot order.

    ``image`` is (N, D) float32 (a read-only memory map when the run was streamed to disk),
    ``features`` (N, F) float32 pooled pre-projection features or ``None``. ``timings`` holds
    seconds: ``read`` (patch reading, summed over reader threads), ``wait`` (time the encoder
    waited for patches), ``compute`` (encoder incl. transfers), ``total``; plus ``spots_per_s``.
    """

    image: np.ndarray
    features: np.ndarray | None = None
    device: str = "cpu"
    batch_size: int = 0
    precision: str = "fp32"
    cached: bool = False
    cache_path: Path | None = None
    signature: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return int(self.image.shape[0])


# =========================================================================== model helpers
def model_img_size(model: torch.nn.Module) -> int:
    """The encoder's square input side in pixels (``config.vision.img_size``)."""
    return int(model.config.vision.img_size)


def model_patch_um(model: torch.nn.Module) -> float:
    """The physical side of a spot patch the model was trained with (``config.patch_um``)."""
    return float(model.config.patch_um)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (names, shapes, dtypes, bytes), 16 hex digits.

    This is the "checkpoint digest" of the embedding cache: it identifies the weights actually
    in memory, so a model that was fine-tuned after loading never reuses its old embeddings.
    The digest is memoised on the module and recomputed when any tensor's in-place version
    counter moves (an optimizer step, ``load_state_dict``) or a tensor is replaced.
    """
    state = model.state_dict()
    stamp = tuple((k, id(v), v._version) for k, v in state.items())
    memo = model.__dict__.get("_comtip_weights_digest")
    if memo is not None and memo[0] == stamp:
        return memo[1]
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()[:16]
    model.__dict__["_comtip_weights_digest"] = (stamp, digest)
    return digest


def coords_digest(sample: "SpatialSample") -> str:
    """SHA-256 of the spot centres (row, col, float64, in spot order), 16 hex digits."""
    rc = np.ascontiguousarray(sample.centers_rc(), dtype=np.float64)
    h = hashlib.sha256(str(rc.shape).encode())
    h.update(rc.tobytes())
    return h.hexdigest()[:16]


def precision_for(device: torch.device) -> str:
    """Compute precision used on ``device``: bf16 on CUDA (fp16 without bf16 support), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def default_batch_size(device: torch.device) -> int:
    """Batch size per device type (``Default.BATCH_SIZE_CPU/CUDA/MPS``)."""
    return {"cuda": Default.BATCH_SIZE_CUDA, "mps": Default.BATCH_SIZE_MPS}.get(device.type, Default.BATCH_SIZE_CPU)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or a batch job's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_read_workers(device: torch.device) -> int:
    """Reader threads ahead of the encoder; 0 = read each batch in the encoder's thread.

    Used on a GPU, and on a CPU with a single encoder stream (with several,
    :func:`default_cpu_streams`, each stream reads its own batches). On the CPU the readers share
    the cores with torch's threads. With two cores or fewer a reader thread running beside them
    costs more than it hides (measured in docs/performance.md: reading in line was about 10%
    faster), so batches are read in line; with more cores, one reader per four cores. On a GPU
    the CPU is free to read: up to 8.
    """
    n = usable_cores()
    if device.type == "cpu":
        return 0 if n <= 2 else max(1, min(4, n // 4))
    return max(2, min(8, n - 1))


def default_read_processes(device: torch.device, n_spots: int) -> int:
    """Reader processes for the GPU path; 0 = reader threads (:func:`default_read_workers`).

    Cutting patches from a spot grid is mostly Python, so reader threads do not add up (one
    interpreter lock); processes do (docs/performance.md, section 2). They cost a start-up of a
    second or two, so they are used on a GPU from ``Default.READ_PROCESS_MIN_SPOTS`` spots on,
    one per core but two (left to the encoder's thread and the main loop), at most
    ``Default.READ_PROCESSES_MAX``. Never on the CPU, whose cores the encoder streams use.
    """
    n = usable_cores()
    if device.type == "cpu" or n_spots < Default.READ_PROCESS_MIN_SPOTS or n < 4:
        return 0
    return max(2, min(int(Default.READ_PROCESSES_MAX), n - 2))


def default_cpu_streams(device: torch.device) -> int:
    """Encoder streams on the CPU: batches read and encoded side by side (1 = one stream).

    Each stream reads its own batch and runs the encoder with ``threads // streams`` torch
    threads, so a core that finished its share of a batch goes on with the next one instead of
    waiting at the end of every operator for the other cores, and reading overlaps encoding
    without a reader thread competing with torch's threads. Measured on 2 cores
    (docs/performance.md, section 1): the bundled model's pipeline ran at 1,512-1,776 spots/s in
    two streams of one thread vs 1,168-1,373 in one stream of two threads.
    ``torch.get_num_threads()`` (``OMP_NUM_THREADS``, ``torch.set_num_threads``) bounds the
    total; at most ``Default.CPU_STREAMS_MAX`` streams.
    """
    if device.type != "cpu":
        return 1
    return max(1, min(int(Default.CPU_STREAMS_MAX), int(torch.get_num_threads())))


def embedding_signature(sample: "SpatialSample", model: torch.nn.Module, *, precision: str) -> dict[str, Any]:
    """The fields an embedding cache entry must match before it is reused."""
    return {
        "format": CACHE_FORMAT,
        "sample_identity": str(sample.identity),
        "coords_sha256": coords_digest(sample),
        "n_spots": int(sample.n_spots),
        "mpp": float(sample.mpp),
        "weights_digest": weights_digest(model),
        "patch_um": model_patch_um(model),
        "img_size": model_img_size(model),
        "pad_value": int(Default.PAD_VALUE),
        "precision": precision,
    }


def _cache_key(signature: dict[str, Any]) -> str:
    blob = json.dumps(signature, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    return keep[:40] or "sample"


def embeddings_cache_root() -> Path:
    from ..io.cache import cache_dir

    root = Path(cache_dir("embeddings"))
    root.mkdir(parents=True, exist_ok=True)
    return root


# =========================================================================== cache entries
_ARRAYS = ("image", "features")


def _load_entry(path: Path, signature: dict[str, Any], *, features: bool, stream: bool) -> dict[str, np.ndarray] | None:
    """Arrays of a cache entry if its stored signature and shapes match, else ``None`` (with a log line)."""
    sig_file = path / "signature.json"
    if not sig_file.is_file():
        return None
    try:
        stored = json.loads(sig_file.read_text())
    except (OSError, ValueError):
        log.warning("embedding cache %s: unreadable signature, recomputing", path)
        return None
    if not isinstance(stored, dict):
        return None
    meta = stored.pop("arrays", {})
    computed = stored.pop("computed", {})
    if stored != signature:
        diff = sorted(k for k in set(stored) | set(signature) if stored.get(k) != signature.get(k))
        log.warning("embedding cache %s: signature differs in %s, recomputing", path, ", ".join(diff))
        return None
    wanted = ["image"] + (["features"] if features else [])
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        f = path / f"{name}.npy"
        if name not in meta or not f.is_file():
            return None  # e.g. features requested but only image embeddings were cached
        try:
            arr = np.load(f, mmap_mode="r")
        except (OSError, ValueError):
            log.warning("embedding cache %s: %s.npy unreadable, recomputing", path, name)
            return None
        if arr.shape != (signature["n_spots"], meta[name]) or arr.dtype != np.float32:
            log.warning("embedding cache %s: %s.npy has shape %s, recomputing", path, name, arr.shape)
            return None
        out[name] = arr if stream else np.array(arr)
    out["_computed"] = computed if isinstance(computed, dict) else {}
    return out


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    if hasattr(os, "pwrite"):
        while data:
            k = os.pwrite(fd, data, pos)
            data, pos = data[k:], pos + k
    else:  # pragma: no cover - Windows
        os.lseek(fd, pos, os.SEEK_SET)
        os.write(fd, data)


class _Sink:
    """Preallocated outputs: numpy arrays in memory, or ``.npy`` files written with ``pwrite``."""

    def __init__(self, n: int, directory: Path | None):
        self.n = n
        self.dir = directory
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, tuple[int, int, int]] = {}  # name -> (fd, data offset, row bytes)

    def allocate(self, name: str, dim: int) -> None:
        if self.dir is None:
            self.arrays[name] = np.empty((self.n, dim), dtype=np.float32)
            return
        path = self.dir / f"{name}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                    "shape": (self.n, dim)})
            offset = f.tell()
            f.truncate(offset + self.n * dim * 4)
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        self.files[name] = (fd, offset, dim * 4)

    def has(self, name: str) -> bool:
        return name in self.arrays or name in self.files

    def write(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (len(rows), dim) at the output rows ``rows`` (any order)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        if self.dir is None:
            self.arrays[name][rows] = values
            return
        fd, offset, row = self.files[name]
        # runs of consecutive rows become one positional write each
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            _pwrite_all(fd, values[a:b].tobytes(), offset + int(rows[a]) * row)

    def close(self) -> None:
        for fd, _, _ in self.files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files = {k: (-1, o, r) for k, (_, o, r) in self.files.items()}

    def save(self, directory: Path) -> dict[str, int]:
        """Make sure every array exists as ``directory/<name>.npy``; return their widths."""
        dims = {}
        for name, arr in self.arrays.items():
            np.save(directory / f"{name}.npy", arr)
            dims[name] = int(arr.shape[1])
        for name, (_, _, row) in self.files.items():
            dims[name] = row // 4
        return dims

    def result(self, directory: Path | None) -> dict[str, np.ndarray]:
        if self.dir is None:
            return dict(self.arrays)
        assert directory is not None
        return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in self.files}


# =========================================================================== tile-cached reading
def _glibc():
    """The C library when it is glibc (None elsewhere: macOS, Windows, musl)."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """Give freed heap memory back to the OS at most every ``every_s`` seconds (glibc only).

    Decoding tens of thousands of slide tiles in reader threads fragments glibc's heap: freed
    memory stayed resident and the process grew with the number of spots (+180 MiB of anonymous
    memory for 20k spots and +509 MiB peak RSS for 100k in ``bench/scaling.py``, although the
    tile cache is bounded). With the tile cache in one slab (:class:`TileCachedImage`) and
    ``malloc_trim(0)`` once a second, the growth stays near the size of the results (measured
    in docs/performance.md); a fixed mmap threshold did as well but cost 50 % more time, since
    every activation tensor was then mapped and faulted in.
    """

    def __init__(self, every_s: float = Default.HEAP_TRIM_S):
        self.every_s = float(every_s)
        libc = _glibc() if self.every_s > 0 else None
        self._trim = libc.malloc_trim if libc is not None else None
        self._last = time.monotonic()
        self.calls = 0

    def maybe(self) -> None:
        if self._trim is None:
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._trim(0)
            self._last = now
            self.calls += 1


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

    def __init__(self, page, path: str):
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
        from ..io.image import to_rgb_uint8

        out = {}
        for ty, tx in tiles:
            i = ty * self.ntx + tx
            h, w = min(self.th, self.H - ty * self.th), min(self.tw, self.W - tx * self.tw)
            cnt = int(self.counts[i])
            if cnt == 0:  # a sparse (never written) tile reads as zeros, as in tifffile
                out[(ty, tx)] = np.zeros((h, w, 3), np.uint8)
                continue
            seg, _, _ = self.decode(_pread(self.fd, cnt, int(self.offsets[i])), i, jpegtables=self.jpegtables)
            seg = np.asarray(seg).reshape(self.th, self.tw, -1)[:h, :w]
            out[(ty, tx)] = seg if seg.shape[2] == 3 and seg.dtype == np.uint8 else to_rgb_uint8(seg)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _ArrayChunks:
    """Chunks of a chunked array (zarr): all missing chunks of a window in one slicing call."""

    def __init__(self, arr, chunk: tuple[int, int]):
        self.arr = arr
        self.th, self.tw = int(chunk[0]), int(chunk[1])
        self.H, self.W = int(arr.shape[0]), int(arr.shape[1])
        self.chunk = (self.th, self.tw)

    def fetch(self, tiles: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        tys = [t[0] for t in tiles]
        txs = [t[1] for t in tiles]
        ty0, ty1, tx0, tx1 = min(tys), max(tys), min(txs), max(txs)
        r0, c0 = ty0 * self.th, tx0 * self.tw
        block = np.asarray(self.arr[r0:min(self.H, (ty1 + 1) * self.th), c0:min(self.W, (tx1 + 1) * self.tw)])
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
            src = _TiffTiles(tiff[i], str(self.image.source))
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
        return _ArrayChunks(lv, (th, tw))

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


# =========================================================================== patch reading
class _PatchReader:
    """Reads spot patches in batches on a thread pool, ``prefetch`` batches ahead of the consumer.

    Buffers come from a fixed ring (``prefetch + 1`` of them, page-locked when ``pin``); the
    consumer hands each one back with :meth:`release` once the encoder no longer needs it.
    """

    def __init__(self, image, centers_rc: np.ndarray, side_px: float, out_px: int, batch_size: int,
                 *, workers: int, prefetch: int, pin: bool, cancel: Cancel | None = None):
        from ..io.patches import read_patch

        self._read_patch = read_patch
        self.image = image
        self.centers = centers_rc
        self.side = float(side_px)
        self.out_px = int(out_px)
        self.batch = int(batch_size)
        self.prefetch = max(1, int(prefetch))
        self.cancel = cancel
        n_buf = self.prefetch + 1
        self.free: deque[torch.Tensor] = deque(
            torch.empty((self.batch, self.out_px, self.out_px, 3), dtype=torch.uint8, pin_memory=pin)
            for _ in range(n_buf))
        self.workers = max(0, int(workers))
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="comtip-read") \
            if self.workers else None
        self.read_s = 0.0
        self._stop = False

    def _read_into(self, buf: torch.Tensor, start: int, stop: int) -> float:
        t0 = time.perf_counter()
        arr = buf.numpy()
        for j, i in enumerate(range(start, stop)):
            if self._stop:
                break
            arr[j] = self._read_patch(self.image, self.centers[i], self.side, self.out_px)
        return time.perf_counter() - t0

    def __iter__(self):
        n = len(self.centers)
        inflight: deque = deque()
        nxt = 0
        try:
            while True:
                if self.pool is None:
                    # no reader threads: read each batch in the caller's thread when it is needed,
                    # so that reading never competes with the encoder's threads for the same cores
                    if nxt >= n:
                        return
                    stop = min(n, nxt + self.batch)
                    buf = self.free.popleft()
                    self.read_s += self._read_into(buf, nxt, stop)
                    start, nxt = nxt, stop
                    yield start, stop, buf
                    continue
                while self.free and nxt < n and len(inflight) < self.prefetch:
                    stop = min(n, nxt + self.batch)
                    buf = self.free.popleft()
                    inflight.append((nxt, stop, buf, self.pool.submit(self._read_into, buf, nxt, stop)))
                    nxt = stop
                if not inflight:
                    return
                start, stop, buf, fut = inflight.popleft()
                self.read_s += fut.result()
                yield start, stop, buf
        finally:
            self._stop = True
            for *_, fut in inflight:
                fut.cancel()
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    def release(self, buf: torch.Tensor) -> None:
        self.free.append(buf)


class _CpuStreams:
    """Reads and encodes batches on ``streams`` threads side by side (CPU), yielding in order.

    Each task takes a buffer from the reader's ring, reads its batch into it in its own thread
    (``_PatchReader._read_into``: the same reading code), encodes it under
    ``torch.inference_mode`` (thread-local, so entered in the task) and returns host arrays. At
    most ``streams + 1`` tasks are in flight, one buffer each. torch's intra-op thread count is
    ``threads // streams`` for the duration and restored afterwards (it is process-wide).
    """

    def __init__(self, reader: "_PatchReader", enc: "_Encoder", streams: int):
        self.reader = reader
        self.enc = enc
        self.streams = max(1, int(streams))
        self.read_s = 0.0
        self.compute_s = 0.0

    def _task(self, start: int, stop: int):
        buf = self.reader.free.popleft()  # never empty: one buffer per task in flight
        try:
            read_s = self.reader._read_into(buf, start, stop)
            if self.reader._stop:  # the run ended (cancel, error) while this batch was read
                return start, stop, [], read_s, 0.0
            t0 = time.perf_counter()
            with torch.inference_mode():
                parts, _ = self.enc.run(buf[: stop - start])
                out = [(off, emb.float().numpy(), None if feats is None else feats.float().numpy())
                       for off, emb, feats in parts]
            return start, stop, out, read_s, time.perf_counter() - t0
        finally:
            self.reader.release(buf)

    def __iter__(self):
        n, batch = len(self.reader.centers), self.reader.batch
        spans = iter([(a, min(n, a + batch)) for a in range(0, n, batch)])
        threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, threads_before // self.streams))
        pool = ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="comtip-encode")
        inflight: deque = deque()
        try:
            for span in spans:
                inflight.append(pool.submit(self._task, *span))
                if len(inflight) > self.streams:
                    break
            while inflight:
                start, stop, out, read_s, compute_s = inflight.popleft().result()
                self.read_s += read_s
                self.compute_s += compute_s
                span = next(spans, None)
                if span is not None:
                    inflight.append(pool.submit(self._task, *span))
                yield start, stop, out
        finally:
            self.reader._stop = True  # tasks still running stop reading at the next patch
            for fut in inflight:
                fut.cancel()
            pool.shutdown(wait=True)
            torch.set_num_threads(threads_before)


# =========================================================================== compute
class _Encoder:
    """Runs preprocess + encoder on one device, halving the batch on CUDA out-of-memory."""

    def __init__(self, model: torch.nn.Module, device: torch.device, batch_size: int, precision: str,
                 features: bool, channels_last: bool):
        self.model = model
        self.device = device
        self.chunk = int(batch_size)
        self.features = features
        self.channels_last = channels_last
        self.cuda = device.type == "cuda"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype is not None \
            else contextlib.nullcontext
        self.halvings = 0

    def _forward(self, x_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.autocast():
            x = self.model.preprocess(x_uint8)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if not self.features:
                return self.model.encode_image(x), None
            both = getattr(self.model, "encode_image_and_features", None)
            if callable(both):  # one encoder pass for both outputs
                return both(x)
            return self.model.encode_image(x), self.model.image_features(x)

    def run(self, batch: torch.Tensor):
        """Encode ``batch`` (B, H, W, 3) uint8 on the host.

        Returns ``([(offset, emb, feats)], copied)``: outputs on the device, and on CUDA an event
        that completes when the host buffer has been copied (the buffer may be reused after it).
        """
        x = batch.to(self.device, non_blocking=True)
        copied = None
        if self.cuda:
            copied = torch.cuda.Event()
            copied.record()
        out = []
        i, n = 0, int(x.shape[0])
        while i < n:
            j = min(n, i + self.chunk)
            try:
                emb, feats = self._forward(x[i:j])
            except torch.cuda.OutOfMemoryError:
                if self.chunk <= 1:
                    raise InputError("the encoder runs out of GPU memory even one patch at a time",
                                     hint="use --device cpu or free GPU memory") from None
                self.chunk = max(1, self.chunk // 2)
                self.halvings += 1
                if self.cuda:
                    torch.cuda.empty_cache()
                log.warning("out of GPU memory: encoder batch halved to %d", self.chunk)
                continue
            out.append((i, emb, feats))
            i = j
        return out, copied


# =========================================================================== entry point
def embed_sample(
    sample: "SpatialSample",
    model: torch.nn.Module,
    *,
    device: "str | torch.device" = "auto",
    batch_size: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    cache: bool = True,
    features: bool = False,
    read_workers: int | None = None,
    prefetch: int | None = None,
    stream: bool | None = None,
    cpu_streams: int | None = None,
    read_processes: int | None = None,
) -> Embeddings:
    """Image embeddings (and optionally pooled features) of every spot of ``sample``.

    ``device``: "auto", "cpu", "cuda", "cuda:N", "mps" or a torch.device (the model is moved
    there). ``batch_size``: None = per-device default. ``cache``: reuse/store the on-disk cache
    entry whose signature matches. ``features``: also return the pre-projection features (the
    probe predictor's input). ``read_workers``/``prefetch``: reader threads and read-ahead depth
    (None = per-device defaults). ``stream``: force (True) or forbid (False) streaming the
    results to disk; None = stream when they exceed ``Default.EMBED_STREAM_BYTES``.
    ``cpu_streams``: on the CPU, batches read and encoded side by side (None =
    :func:`default_cpu_streams`; 1 = one stream with reader threads as on a GPU).
    ``read_processes``: with one stream, read the patches in this many worker processes instead
    of threads (None = :func:`default_read_processes`; only file-backed slides can be reopened
    by a worker, others are read by threads).
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    n = int(sample.n_spots)
    if n == 0:
        raise InputError(f"sample '{sample.name}' has no spots to embed", hint="check the spot table or --pitch-um")
    bs = int(batch_size) if batch_size else default_batch_size(dev)
    if bs < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if cpu_streams is not None and int(cpu_streams) < 1:
        raise InputError(f"cpu_streams must be at least 1, got {cpu_streams}")
    if read_processes is not None and int(read_processes) < 0:
        raise InputError(f"read_processes must be 0 or more, got {read_processes}")
    precision = precision_for(dev)
    signature = embedding_signature(sample, model, precision=precision)
    key = _cache_key(signature)

    # width of the outputs is only known after the first batch; estimate for the streaming decision
    est_dim = int(getattr(model.config, "embed_dim", 256)) + (1024 if features else 0)
    if stream is None:
        stream = n * est_dim * 4 > Default.EMBED_STREAM_BYTES

    entry: Path | None = None
    if cache or stream:
        root = embeddings_cache_root()
        entry = root / f"{_safe_name(sample.name)}-{key}"
    if cache and entry is not None and entry.is_dir():
        arrays = _load_entry(entry, signature, features=features, stream=stream)
        if arrays is not None:
            if progress is not None:
                progress(n, n, "embeddings from cache")
            total = time.perf_counter() - t_start
            computed = arrays.get("_computed", {})
            return Embeddings(image=arrays["image"], features=arrays.get("features"),
                              device=str(computed.get("device", dev)), batch_size=int(computed.get("batch_size", 0)),
                              precision=precision, cached=True, cache_path=entry,
                              signature=signature, timings={"total": total, "read": 0.0, "wait": 0.0,
                                                            "compute": 0.0, "spots_per_s": n / max(total, 1e-9)})

    tmp_dir: Path | None = None
    if cache or stream:
        tmp_dir = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
        tmp_dir.mkdir(parents=True)
    sink = _Sink(n, tmp_dir if stream else None)
    reader = None
    view = None
    batches = None
    was_training = model.training
    ok = False
    try:
        from ..io.patches import patch_geometry

        img_size = signature["img_size"]
        side = patch_geometry(float(sample.mpp), signature["patch_um"], img_size)
        model.to(dev)
        model.eval()
        enc = _Encoder(model, dev, bs, precision, features, channels_last=(dev.type == "cuda"))
        n_streams = 1 if dev.type != "cpu" else int(cpu_streams if cpu_streams is not None
                                                     else default_cpu_streams(dev))
        workers = read_workers if read_workers is not None else default_read_workers(dev)
        if n_streams > 1:
            workers = 0  # each stream reads its own batches
        centres = sample.centers_rc()
        order = spatial_order(centres, side)
        n_proc = 0 if n_streams > 1 else int(read_processes if read_processes is not None
                                              else default_read_processes(dev, n))
        spec = sample.image.reopen_spec() if n_proc > 0 and hasattr(sample.image, "reopen_spec") else None
        if spec is None:
            n_proc = 0
        if n_proc > 0:
            from ._process_reader import ProcessPatchReader

            reader = ProcessPatchReader(spec, centres[order], side, img_size, bs, workers=n_proc,
                                        pin=dev.type == "cuda", fallback_threads=workers,
                                        prefetch=prefetch if prefetch is not None else Default.PREFETCH_BATCHES)
        else:
            view = TileCachedImage(sample.image)
            reader = _PatchReader(view, centres[order], side, img_size, bs, workers=workers,
                                  prefetch=n_streams if n_streams > 1 else
                                  (prefetch if prefetch is not None else Default.PREFETCH_BATCHES),
                                  pin=dev.type == "cuda", cancel=cancel)
        wait_s = compute_s = 0.0
        pending: list = []  # device->host copies of the previous batch: (start, host tensors, event)
        cuda = dev.type == "cuda"

        def write(start: int, emb_h: np.ndarray, feat_h: np.ndarray | None) -> None:
            """Rows ``start...`` of the spatial order go back to their own spots."""
            rows = order[start:start + len(emb_h)]
            for name, arr in (("image", emb_h), ("features", feat_h)):
                if arr is None:
                    continue
                if not sink.has(name):
                    sink.allocate(name, int(arr.shape[1]))
                sink.write(name, rows, arr)

        def drain() -> None:
            for start, emb_h, feat_h, event in pending:
                if event is not None:
                    event.synchronize()
                write(start, emb_h.numpy(), None if feat_h is None else feat_h.numpy())
            pending.clear()

        done = 0
        trimmer = HeapTrimmer()
        t_wait = time.perf_counter()
        if n_streams > 1:
            streams = _CpuStreams(reader, enc, n_streams)
            batches = iter(streams)
            for start, stop, parts in batches:
                wait_s += time.perf_counter() - t_wait
                if cancel is not None and cancel():
                    raise Cancelled(f"embedding of '{sample.name}' cancelled after {done} of {n} spots")
                for off, emb_h, feat_h in parts:
                    write(start + off, emb_h, feat_h)
                trimmer.maybe()
                done = stop
                if progress is not None:
                    progress(done, n, f"encoding spots ({dev.type}, {n_streams} streams)")
                t_wait = time.perf_counter()
            compute_s, reader.read_s = streams.compute_s, streams.read_s
        else:
            batches = iter(reader)
            with torch.inference_mode():
                for start, stop, buf in batches:
                    t_c = time.perf_counter()
                    wait_s += t_c - t_wait
                    if cancel is not None and cancel():
                        raise Cancelled(f"embedding of '{sample.name}' cancelled after {done} of {n} spots")
                    parts, copied = enc.run(buf[: stop - start])
                    drain()  # previous batch's results are ready by now (or we wait for them here)
                    for off, emb, feats in parts:
                        emb_h = emb.float().to("cpu", non_blocking=cuda)
                        feat_h = feats.float().to("cpu", non_blocking=cuda) if feats is not None else None
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record()
                        pending.append((start + off, emb_h, feat_h, event))
                    if copied is not None:
                        copied.synchronize()  # the host buffer may be refilled once it reached the device
                    reader.release(buf)
                    trimmer.maybe()
                    done = stop
                    compute_s += time.perf_counter() - t_c
                    if progress is not None:
                        progress(done, n, f"encoding spots ({dev.type})")
                    t_wait = time.perf_counter()
                drain()
        sink.close()
        arrays_dims = sink.save(tmp_dir) if tmp_dir is not None and cache else None
        if cache and tmp_dir is not None:
            meta = dict(signature)
            meta["arrays"] = arrays_dims
            meta["computed"] = {"device": str(dev), "batch_size": int(enc.chunk),
                                "seconds": round(time.perf_counter() - t_start, 3)}
            (tmp_dir / "signature.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp_dir, entry)
            result_dir: Path | None = entry
        else:
            result_dir = tmp_dir
        arrays = sink.result(result_dir)
        if stream and not cache and tmp_dir is not None:
            # the maps stay valid after unlinking on POSIX; the space is freed when they are dropped
            shutil.rmtree(tmp_dir, ignore_errors=True)
        ok = True
        total = time.perf_counter() - t_start
        return Embeddings(
            image=arrays["image"], features=arrays.get("features"), device=str(dev), batch_size=enc.chunk,
            precision=precision, cached=False, cache_path=entry if cache else None, signature=signature,
            timings={"total": total, "read": reader.read_s, "wait": wait_s, "compute": compute_s,
                     "spots_per_s": n / max(total, 1e-9), "halvings": float(enc.halvings),
                     "streams": float(n_streams), "read_processes": float(n_proc),
                     "tile_hits": float(view.hits) if view is not None else float("nan"),
                     "tile_misses": float(view.misses) if view is not None else float("nan")},
        )
    finally:
        if batches is not None:
            with contextlib.suppress(Exception):
                batches.close()  # stops the reader threads now, not at garbage collection
        sink.close()
        if view is not None:
            view.close()
        model.train(was_training)
        if not ok and tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


__all__ = ["Embeddings", "embed_sample", "embedding_signature", "weights_digest", "coords_digest",
           "default_batch_size", "default_cpu_streams", "default_read_processes", "usable_cores", "precision_for",
           "embeddings_cache_root", "CACHE_FORMAT"]
