"""The encoder on a device, and the CPU's side-by-side streams of reading and encoding.

:class:`Encoder` runs preprocess + the image encoder (autocast on CUDA, channels-last input
there), halving its batch on CUDA out-of-memory; :class:`CpuStreams` reads and encodes batches on
several threads at once on the CPU (``engine.inference.default_cpu_streams``), yielding them in
order.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .readers import PatchReader

log = logging.getLogger(__name__)


class Encoder:
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
            return self.model.encode_image(x), getattr(self.model, "probe_features", self.model.image_features)(x)

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


class CpuStreams:
    """Reads and encodes batches on ``streams`` threads side by side (CPU), yielding in order.

    Each task takes a buffer from the reader's ring, reads its batch into it in its own thread
    (``PatchReader._read_into``: the same reading code), encodes it under
    ``torch.inference_mode`` (thread-local, so entered in the task) and returns host arrays. At
    most ``streams + 1`` tasks are in flight, one buffer each. torch's intra-op thread count is
    ``threads // streams`` for the duration and restored afterwards (it is process-wide).
    """

    def __init__(self, reader: "PatchReader", enc: "Encoder", streams: int):
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


__all__ = ["Encoder", "CpuStreams"]
