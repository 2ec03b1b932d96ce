"""Spot patches read by worker processes (a ``torch.utils.data.DataLoader``), for the GPU path.

Reader *threads* share one interpreter lock: on a spot grid, where most tiles come from the
cache, cutting a patch is mostly Python and the measured rate does not grow with threads
(docs/performance.md, section 2). On a GPU, which encodes a small model's spots far faster than
one core can cut them, reading must use the machine's other cores: each worker process reopens
the slide itself (:meth:`~napari_comtip.io.image.MultiscaleImage.reopen_spec`, so no pixels are
pickled), keeps its own tile cache and cuts whole batches with the same
:func:`~napari_comtip.io.patches.read_patch` as everywhere else, so the pixels are identical.
Batches arrive in order, page-locked when the encoder is on CUDA.

Workers start through ``forkserver`` (``spawn`` where that does not exist): never ``fork``,
which is unsafe in a process that runs Qt, CUDA or other threads. Such workers normally import
the caller's main script again (``__mp_main__``), which would re-run a user's unguarded script;
the workers need nothing from it, so it is hidden from them while they start
(:func:`_main_script_hidden`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import errors
from ..constants import Default
from ..io.slide import reopen_image
from ..io.patches import read_patch
from ..io.tiles import TileCachedImage
from .readers import PatchReader

log = logging.getLogger(__name__)


class _Batches(Dataset):
    """Batch ``k`` = the patches of spots ``[k * batch, (k + 1) * batch)`` (already spatially ordered)."""

    def __init__(self, spec: tuple, centres_rc: np.ndarray, side_px: float, out_px: int, batch: int,
                 cache_bytes: int):
        self.spec = spec
        self.centres = np.ascontiguousarray(centres_rc, dtype=np.float64)
        self.side = float(side_px)
        self.out_px = int(out_px)
        self.batch = int(batch)
        self.cache_bytes = int(cache_bytes)
        self._view = None

    def __len__(self) -> int:
        return math.ceil(len(self.centres) / self.batch)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_view"] = None  # each worker opens its own
        return state

    def __getitem__(self, k: int) -> dict:
        t0 = time.perf_counter()
        start, stop = k * self.batch, min(len(self.centres), (k + 1) * self.batch)
        try:
            if self._view is None:
                self._view = TileCachedImage(reopen_image(self.spec), max_bytes=self.cache_bytes)
            out = np.empty((stop - start, self.out_px, self.out_px, 3), dtype=np.uint8)
            for j, i in enumerate(range(start, stop)):
                out[j] = read_patch(self._view, self.centres[i], self.side, self.out_px)
        except errors.ComtipError as exc:  # re-raised as itself in the main process, without a worker traceback
            return {"error": type(exc).__name__, "message": str(exc)}
        return {"start": start, "patches": torch.from_numpy(out), "read_s": time.perf_counter() - t0}


@contextlib.contextmanager
def _main_script_hidden():
    """While workers start, the main module has no ``__file__``/``__spec__`` to re-import.

    ``multiprocessing`` sends the main script's path (or module name) to each spawned worker,
    which imports it before anything else; a script without an ``if __name__ == "__main__"``
    guard would run again in every worker. Our workers only need this package.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    try:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # modules the fork server imports once, before it forks workers (no effect once it runs)
        ctx.set_forkserver_preload(["torch", __name__])
        return ctx
    return mp.get_context("spawn")


class ProcessPatchReader:
    """Iterates ``(start, stop, patches)`` like the engine's thread reader, read by ``workers`` processes."""

    def __init__(self, spec: tuple, centres_rc: np.ndarray, side_px: float, out_px: int, batch_size: int, *,
                 workers: int, pin: bool, prefetch: int = 2, fallback_threads: int = 2, worker_init_fn=None):
        self.workers = max(1, int(workers))
        cache = max(Default.TILE_CACHE_MIN_BYTES, Default.TILE_CACHE_BYTES // self.workers)
        self.dataset = _Batches(spec, centres_rc, side_px, out_px, batch_size, cache)
        self.spec = spec
        self.centers = self.dataset.centres
        self.batch = int(batch_size)
        self.pin = bool(pin)
        self.prefetch = max(1, int(prefetch))
        self.fallback_threads = int(fallback_threads)
        self.loader = DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=self.workers,
                                 pin_memory=self.pin, prefetch_factor=self.prefetch,
                                 multiprocessing_context=_context(), persistent_workers=False,
                                 worker_init_fn=worker_init_fn)
        self.read_s = 0.0
        self.fell_back: str | None = None  # why the workers could not be used, if they could not

    def _threads(self):
        """The engine's thread reader over the same spots (when the workers cannot start)."""
        reader = PatchReader(TileCachedImage(reopen_image(self.spec)), self.centers, self.dataset.side,
                              self.dataset.out_px, self.batch, workers=self.fallback_threads,
                              prefetch=self.prefetch, pin=self.pin)
        self._thread_reader = reader
        for start, stop, buf in reader:
            yield start, stop, buf
            self.read_s = reader.read_s

    def __iter__(self):
        it = None
        try:
            with _main_script_hidden():
                it = iter(self.loader)  # starts the workers
            first = next(it, None)
        except Exception as exc:  # noqa: BLE001 - workers that cannot start: read with threads instead
            self.fell_back = f"{type(exc).__name__}: {exc}".strip()
            log.warning("reader processes could not start (%s); reading with threads", self.fell_back.splitlines()[0])
            _shutdown(it)
            yield from self._threads()
            return
        try:
            for item in _chain(first, it):
                if "error" in item:
                    cls = getattr(errors, str(item["error"]), errors.InputError)
                    if not (isinstance(cls, type) and issubclass(cls, errors.ComtipError)):
                        cls = errors.InputError
                    raise cls(str(item["message"]))
                self.read_s += float(item["read_s"])
                patches = item["patches"]
                start = int(item["start"])
                yield start, start + int(patches.shape[0]), patches
        finally:
            _shutdown(it)

    def release(self, buf) -> None:
        reader = getattr(self, "_thread_reader", None)
        if reader is not None:  # the fallback's ring buffers go back to it
            reader.release(buf)


def _shutdown(it) -> None:
    """Stop a DataLoader iterator's workers now, not when the iterator is collected."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def _chain(first, it):
    if first is None:
        return
    yield first
    yield from it


__all__ = ["ProcessPatchReader"]
