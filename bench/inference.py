"""Benchmark 1: encoder efficiency of the prediction pipeline.

Measures, in one run and interleaved (so that a busy machine slows both alike):

* ``pipeline``: spots/s of ``engine.inference.embed_sample`` on a real H&E sample (patch reading
  from the slide, preprocessing, encoder, write-back; cache off), i.e. everything ``comtip
  predict`` does per spot;
* ``bare``: spots/s of a bare ``model.encode_image(x)`` loop on pre-loaded, pre-processed
  tensors of the same size and batch size;
* ``pipeline, crop only``: the same ``embed_sample`` call on the same slide resampled once, before
  timing, to the model's input resolution, with the spot centres on whole pixels of it, so that
  every patch is a plain crop (``read_patch``'s exact path) and no per-patch resampling is done:
  the engine's own cost (batching, buffers, preprocessing, write-back) without the antialiased
  resize that dominates reading for a small encoder;
* ``bare, N streams``: the same bare loop run on N threads side by side with threads/N torch
  threads each, the way the engine encodes on a CPU (``engine.inference.default_cpu_streams``):
  the stricter reference, the best this machine does on this encoder;
* ``matmul``: the FLOP rate this machine reaches on a plain square matrix multiply;
* the encoder's FLOPs per spot (``torch.utils.flop_counter.FlopCounterMode``), hence its FLOP rate.

Target on a CPU: pipeline >= 80% of the bare forward.

    python bench/inference.py --quick
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import _common


def _model_resolution_sample(sample, model):
    """``sample``'s slide resampled once to the model's input resolution, spots on whole pixels.

    The patch side then equals the input size and every box is whole-pixel aligned, so
    ``read_patch`` cuts each patch as a plain crop (its exact path): the pipeline without the
    per-patch resample. Built before any timing.
    """
    import numpy as np
    from PIL import Image

    from napari_comtip.constants import Key
    from napari_comtip.io.image import MultiscaleImage
    from napari_comtip.io.patches import patch_geometry
    from napari_comtip.io.record import SpatialSample

    S = model.img_size
    f = patch_geometry(sample.mpp, model.config.patch_um, S) / S  # full-resolution pixels per input pixel
    d0 = sample.image.downsamples[0]  # level 0 may be coarser than full resolution (e.g. Visium hires)
    H0, W0 = sample.image.level_shapes[0][:2]
    f0 = f / d0  # level-0 pixels per input pixel
    h, w = int(H0 // f0), int(W0 // f0)
    level0 = sample.image.read_level_window(0, 0, 0, H0, W0)
    small = np.asarray(Image.fromarray(level0).resize((w, h), Image.Resampling.BILINEAR, box=(0, 0, w * f0, h * f0),
                                                     reducing_gap=None))
    spots = sample.spots.copy()
    # a centre at k + 0.5 puts the S-pixel box on whole pixels (S even; odd S: on k)
    off = 0.5 if S % 2 == 0 else 0.0
    spots[Key.ROW] = np.floor(spots[Key.ROW] / f) + off
    spots[Key.COL] = np.floor(spots[Key.COL] / f) + off
    spots[Key.DIAMETER] = spots[Key.DIAMETER] / f
    return SpatialSample(name=f"{sample.name}-model-res", image=MultiscaleImage([small], [1.0]),
                         mpp=sample.mpp * f, mpp_source="bench", spots=spots)


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sample", default="@demo", help="sample whose slide is read (default: the bundled demo section)")
    p.add_argument("--section", default=None, help="sample name inside --sample (e.g. C2 for her2st)")
    p.add_argument("--spots", type=int, default=None, help="spots per measurement (default 768 quick, 4096 full)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3 quick, 5 full)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the engine's per-device default")
    args = p.parse_args(argv)
    threads = _common.setup_threads(args)

    import numpy as np
    import pandas as pd
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from napari_comtip.constants import Key
    from napari_comtip.engine.device import resolve_device
    from napari_comtip.engine.inference import default_batch_size, default_cpu_streams, embed_sample, precision_for
    from napari_comtip.io import load_sample
    from napari_comtip.io.patches import patch_geometry, read_patch
    from napari_comtip.io.record import SpatialSample

    dev = resolve_device(args.device)
    n = args.spots or (768 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else 5)
    model, label = _common.build_model(args)
    model.to(dev)
    base = load_sample(args.sample, sample=args.section)
    rng = np.random.default_rng(0)
    H, W = base.height, base.width
    rc = rng.uniform([0, 0], [H, W], size=(n, 2))
    spots = pd.DataFrame({Key.ROW: rc[:, 0], Key.COL: rc[:, 1], Key.DIAMETER: base.spot_diameter_px()},
                         index=[f"s{i}" for i in range(n)])
    sample = SpatialSample(name=f"{base.name}-bench", image=base.image, mpp=base.mpp, mpp_source=base.mpp_source,
                           spots=spots)
    crop_sample = _model_resolution_sample(sample, model)
    bs = args.batch_size or default_batch_size(dev)
    S = model.img_size
    side = patch_geometry(sample.mpp, model.config.patch_um, S)
    prec = precision_for(dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)

    def autocast():
        return torch.autocast(dev.type, dtype=dtype) if dtype is not None else torch.autocast(dev.type, enabled=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ bare forward on pre-loaded tensors
    patches = np.stack([read_patch(sample.image, c, side, S) for c in rc[:bs]])
    with torch.inference_mode(), autocast():
        x = model.preprocess(torch.from_numpy(patches).to(dev))
        x = x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x
        model.encode_image(x)  # warm-up
    n_iter = max(1, n // bs)

    cpu_spent = {"bare": [], "pipeline": []}  # CPU seconds per spot (all threads): robust to a busy machine

    def bare() -> float:
        sync()
        c, t = time.process_time(), time.perf_counter()
        with torch.inference_mode(), autocast():
            for _ in range(n_iter):
                model.encode_image(x)
        sync()
        cpu_spent["bare"].append((time.process_time() - c) / (n_iter * bs))
        return n_iter * bs / (time.perf_counter() - t)

    n_streams = default_cpu_streams(dev)

    def bare_streams() -> float:
        threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, threads_before // n_streams))

        def loop(k: int) -> None:
            with torch.inference_mode(), autocast():
                for _ in range(k):
                    model.encode_image(x)

        try:
            t = time.perf_counter()
            shares = [n_iter // n_streams + (i < n_iter % n_streams) for i in range(n_streams)]
            with ThreadPoolExecutor(n_streams) as ex:
                list(ex.map(loop, shares))
            return n_iter * bs / (time.perf_counter() - t)
        finally:
            torch.set_num_threads(threads_before)

    def pipeline() -> tuple[float, dict]:
        c = time.process_time()
        emb = embed_sample(sample, model, device=dev, batch_size=bs, cache=False)
        cpu_spent["pipeline"].append((time.process_time() - c) / n)
        return n / emb.timings["total"], emb.timings

    def pipeline_crop() -> float:
        emb = embed_sample(crop_sample, model, device=dev, batch_size=bs, cache=False)
        return n / emb.timings["total"]

    # ------------------------------------------------------------------ FLOPs
    with torch.inference_mode(), autocast():
        fc = FlopCounterMode(display=False)
        with fc:
            model.encode_image(x[:1])
        flops_per_spot = float(fc.get_total_flops())

    m = 2048 if dev.type == "cpu" else 8192
    a = torch.randn(m, m, device=dev, dtype=dtype or torch.float32)
    b = torch.randn(m, m, device=dev, dtype=dtype or torch.float32)

    def matmul() -> float:
        torch.mm(a, b)
        sync()
        k, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0 or k < 3:
            torch.mm(a, b)
            k += 1
        sync()
        return 2 * m**3 * k / (time.perf_counter() - t) / 1e9

    pipeline()  # warm-up (threads, allocator, file handles)
    pipeline_crop()
    cpu_spent["pipeline"].clear()
    bare_r, streams_r, pipe_r, crop_r, mm_r, timings = [], [], [], [], [], []
    if n_streams > 1:
        bare_streams()  # warm-up
    for _ in range(repeats):
        bare_r.append(bare())
        if n_streams > 1:
            streams_r.append(bare_streams())
        r, tm = pipeline()
        pipe_r.append(r)
        timings.append(tm)
        crop_r.append(pipeline_crop())
        mm_r.append(matmul())
    bare_s, pipe_s, mm = statistics.median(bare_r), statistics.median(pipe_r), statistics.median(mm_r)
    crop_s = statistics.median(crop_r)
    streams_s = statistics.median(streams_r) if streams_r else None
    ratio = pipe_s / bare_s
    tm = timings[len(timings) // 2]
    enc_gflops = flops_per_spot * bare_s / 1e9

    print(f"model    {label}: {model.config.vision.name} at {S} px, {flops_per_spot / 1e9:.3f} GFLOP/spot")
    print(f"sample   {base.name} slide ({W} x {H} px, {base.image.kind}), {n} spots, patch {side:.0f} px full res")
    print(f"device   {dev} ({prec}), {threads} torch threads, batch {bs}, {repeats} interleaved repeats (median)")
    rows = [
        ["pipeline (embed_sample)", pipe_s, flops_per_spot * pipe_s / 1e9, ratio],
        ["pipeline, crop only (no per-patch resize)", crop_s, flops_per_spot * crop_s / 1e9, crop_s / bare_s],
        ["bare encode_image loop", bare_s, enc_gflops, 1.0],
        *([[f"bare loop, {n_streams} streams x {max(1, threads // n_streams)} thread(s)", streams_s,
            flops_per_spot * streams_s / 1e9, streams_s / bare_s]] if streams_s else []),
        [f"matmul {m}x{m}", "", mm, ""],
    ]
    print(_common.table(["what", "spots/s", "GFLOP/s", "x bare"], rows))
    if int(tm.get("streams", 1)) > 1:
        print(f"pipeline time: {int(tm['streams'])} streams reading and encoding side by side; summed over them, "
              f"reading {tm['read']:.2f} s ({tm['read'] / n * 1e3:.3f} ms/patch) and encoding {tm['compute']:.2f} s "
              f"in {tm['total']:.2f} s of wall time")
    else:
        share = {k: tm.get(k, 0.0) / max(tm["total"], 1e-9) for k in ("read", "wait", "compute")}
        print(f"pipeline time: compute {share['compute']:.0%}, waiting for patches {share['wait']:.0%}; "
              f"reading {tm['read']:.2f} s of {tm['total']:.2f} s ({tm['read'] / n * 1e3:.3f} ms/patch)")
    cpu_ratio = statistics.median(cpu_spent["bare"]) / statistics.median(cpu_spent["pipeline"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"pipeline / bare = {ratio:.2f} (target >= 0.80): {'met' if ratio >= 0.8 else 'MISSED'}; "
          f"encoder reaches {enc_gflops / mm:.0%} of the matmul rate"
          + (f"; pipeline / bare loop in {n_streams} streams = {pipe_s / streams_s:.2f}" if streams_s else ""))
    print(f"CPU time per spot: bare {statistics.median(cpu_spent['bare']) * 1e3:.2f} ms, pipeline "
          f"{statistics.median(cpu_spent['pipeline']) * 1e3:.2f} ms (ratio {cpu_ratio:.2f}); load average {load:.1f} "
          f"on {os.cpu_count()} cores")
    _common.emit({"benchmark": "inference", "pipeline_spots_per_s": pipe_s, "bare_spots_per_s": bare_s,
                  "ratio": ratio, "crop_only_spots_per_s": crop_s, "crop_only_ratio": crop_s / bare_s,
                  "cpu_streams": n_streams, "bare_streams_spots_per_s": streams_s,
                  "ratio_vs_bare_streams": (pipe_s / streams_s) if streams_s else None,
                  "read_ms_per_patch": tm["read"] / n * 1e3, "matmul_gflops": mm, "encoder_gflops_per_s": enc_gflops,
                  "pipeline_gflops_per_s": flops_per_spot * pipe_s / 1e9, "gflop_per_spot": flops_per_spot / 1e9,
                  "spots": n, "batch_size": bs, "device": str(dev), "precision": prec,
                  "runs": {"pipeline": pipe_r, "crop_only": crop_r, "bare": bare_r, "bare_streams": streams_r,
                           "matmul": mm_r}, "target_met": ratio >= 0.8,
                  "cpu_ms_per_spot": {k: statistics.median(v) * 1e3 for k, v in cpu_spent.items()},
                  "cpu_time_ratio": cpu_ratio, "load_average": load,
                  "model": label, "machine": _common.machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
