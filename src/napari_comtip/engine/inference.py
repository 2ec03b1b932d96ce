"""Batched image embedding of every spot of a sample, with an on-disk embedding cache.

:func:`embed_sample` runs the CoMTIP image encoder over the spot patches of a
:class:`~napari_comtip.io.record.SpatialSample` and returns an :class:`Embeddings` record.

The pipeline is built so that the encoder's arithmetic is the limit, not Python, slide decoding
or data movement (measured in ``docs/performance.md``, benchmarks in ``bench/``). This module is
the loop; its parts live beside it: the tile cache in ``io/tiles.py``, reader threads and their
defaults in ``readers.py``, reader processes in ``_process_reader.py``, the encoder and the CPU
streams in ``encoder.py``, the signature and cache entries in ``embedding_cache.py``.

* **read-ahead**: patch batches are read from the lazy pyramid (``io.patches.read_patch``, which
  picks the pyramid level that matches the encoder's input size, so no full-resolution pixels
  are decoded needlessly) by a thread pool, ``Default.PREFETCH_BATCHES`` batches ahead of the
  encoder, into a ring of reusable buffers (page-locked on CUDA, so host-to-device copies are
  ``non_blocking``); on a GPU from ``Default.READ_PROCESS_MIN_SPOTS`` spots on, by worker
  processes instead (``readers.default_read_processes``, ``_process_reader.py``), because reader
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
  ``signature.json`` (``embedding_cache.embedding_signature``: sample identity, hash of the spot
  coordinates, pixel size, digest of the model's weights, patch size in µm, input size, pad
  value, precision; plus the array widths). The signature is
  compared field by field before reuse; any difference (or an unreadable/short array) means the
  entry is recomputed and replaced, never silently reused. Entries appear atomically (written in
  a temporary folder, then renamed), so a cancelled or crashed run leaves nothing half-written.

Progress is reported as ``progress(done, total, message)`` after each batch; ``cancel()`` is
polled between batches and raises :class:`~napari_comtip.errors.Cancelled`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..constants import Default
from ..errors import Cancelled, InputError
from ..io.tiles import TileCachedImage, spatial_order
from ..progress import Cancel, Progress
from .device import resolve_device
from .embedding_cache import Sink, embedding_signature, entry_path, load_entry, publish_entry
from .encoder import CpuStreams, Encoder
from .readers import HeapTrimmer, PatchReader, default_read_processes, default_read_workers

if TYPE_CHECKING:  # pragma: no cover
    from ..io.record import SpatialSample

log = logging.getLogger(__name__)




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


def precision_for(device: torch.device) -> str:
    """Compute precision used on ``device``: bf16 on CUDA (fp16 without bf16 support), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def default_batch_size(device: torch.device) -> int:
    """Batch size per device type (``Default.BATCH_SIZE_CPU/CUDA/MPS``)."""
    return {"cuda": Default.BATCH_SIZE_CUDA, "mps": Default.BATCH_SIZE_MPS}.get(device.type, Default.BATCH_SIZE_CPU)


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

    # width of the outputs is only known after the first batch; estimate for the streaming decision
    est_dim = int(getattr(model.config, "embed_dim", 256)) + (1024 if features else 0)
    if stream is None:
        stream = n * est_dim * 4 > Default.EMBED_STREAM_BYTES

    entry: Path | None = None
    if cache or stream:
        entry = entry_path(sample.name, signature)
    if cache and entry is not None and entry.is_dir():
        arrays = load_entry(entry, signature, features=features, stream=stream)
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
    sink = Sink(n, tmp_dir if stream else None)
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
        enc = Encoder(model, dev, bs, precision, features, channels_last=(dev.type == "cuda"))
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
            reader = PatchReader(view, centres[order], side, img_size, bs, workers=workers,
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
            streams = CpuStreams(reader, enc, n_streams)
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
            publish_entry(tmp_dir, entry, signature, arrays_dims,
                          {"device": str(dev), "batch_size": int(enc.chunk),
                           "seconds": round(time.perf_counter() - t_start, 3)})
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


__all__ = ["Embeddings", "embed_sample", "default_batch_size", "default_cpu_streams", "precision_for"]
