"""Reading spot patches ahead of the encoder: reader threads, their defaults, heap trimming.

:class:`PatchReader` reads spot patches in batches on a thread pool (or in the caller's thread)
into a ring of reusable buffers, page-locked when the encoder is on CUDA. On a GPU, from
``Default.READ_PROCESS_MIN_SPOTS`` spots on, worker processes read instead
(``_process_reader.py``, which falls back to this reader when they cannot start), because
reader threads share one interpreter lock. :func:`default_read_workers` and
:func:`default_read_processes` choose how many (measured in docs/performance.md).
:class:`HeapTrimmer` gives the heap pages freed by tile decoding back to the OS once a second.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..constants import Default
from ..progress import Cancel

# =========================================================================== how many readers
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


# =========================================================================== heap
def _glibc():
    """The C library when it is glibc (None elsewhere: macOS, Windows, musl)."""
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


# =========================================================================== the thread reader
class PatchReader:
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


__all__ = ["PatchReader", "HeapTrimmer", "usable_cores", "default_read_workers", "default_read_processes"]
