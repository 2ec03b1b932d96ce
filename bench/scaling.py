"""Benchmark 3: time and peak memory of embedding 1k, 10k and 100k spots.

Each size runs ``engine.inference.embed_sample`` (cache on, so large grids stream their
embeddings to the on-disk cache) in a fresh process on the same generated 51,200 x 51,200 px
pyramidal slide (see ``slide_reading.py``), over a regular spot grid of the same pitch. Reported:
wall time, spots/s, the process's peak RSS, and the exponent of the fit time ~ n^b.

Targets: b = 1.0 +- 0.1; peak RSS flat (independent of the number of spots beyond the bounded
tile cache).

    python bench/scaling.py --quick        # 300, 1k, 3k spots
    python bench/scaling.py                # 1k, 10k, 100k spots
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import _common


def child(args) -> int:
    """One size in a fresh process: prints one JSON line."""
    _common.setup_threads(args)
    import numpy as np
    import pandas as pd

    from napari_comtip.constants import Key
    from napari_comtip.engine.inference import embed_sample
    from napari_comtip.io.slide import open_image
    from napari_comtip.io.record import SpatialSample

    image, mpp = open_image(args.slide)
    mpp = mpp or 0.5
    model, _ = _common.build_model(args)
    H, W = image.shape[:2]
    pitch = args.pitch_um / mpp

    def grid(n: int, seed: int) -> SpatialSample:
        side = int(np.ceil(np.sqrt(n)))
        r0 = c0 = 2 * pitch + seed * pitch / 3
        rr, cc = np.divmod(np.arange(n), side)
        rc = np.stack([r0 + rr * pitch, c0 + cc * pitch], axis=1)
        if rc.max() >= min(H, W):
            raise SystemExit(f"{n} spots at {args.pitch_um} um do not fit on the slide")
        spots = pd.DataFrame({Key.ROW: rc[:, 0], Key.COL: rc[:, 1], Key.DIAMETER: 55 / mpp},
                             index=[f"s{i}" for i in range(n)])
        return SpatialSample(name=f"grid{n}-{seed}", image=image, mpp=mpp, mpp_source="slide", spots=spots)

    embed_sample(grid(64, 1), model, device=args.device, cache=False)  # warm-up: threads, allocator, files
    rss0 = _common.peak_rss_mb()
    s = grid(args.child, 0)
    c, t = time.process_time(), time.perf_counter()
    emb = embed_sample(s, model, device=args.device, cache=True)
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    _common.emit({"n": args.child, "seconds": dt, "cpu_seconds": cpu, "spots_per_s": args.child / dt, "peak_rss_mb": _common.peak_rss_mb(),
                  "rss_before_mb": rss0, "streamed": bool(isinstance(emb.image, np.memmap)),
                  "tile_hits": emb.timings.get("tile_hits"), "tile_misses": emb.timings.get("tile_misses")})
    return 0


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated spot counts (default 1000,10000,100000; quick 300,1000,3000)")
    p.add_argument("--pitch-um", type=float, default=70.0, help="grid pitch in micrometres (default 70)")
    p.add_argument("--side", type=int, default=51200, help="side of the generated slide in pixels")
    p.add_argument("--slide", default=None, help=argparse_suppress())
    p.add_argument("--child", type=int, default=None, help=argparse_suppress())
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    import numpy as np

    sizes = [int(s) for s in (args.sizes or ("300,1000,3000" if args.quick else "1000,10000,100000")).split(",")]
    slide = _common.make_big_slide(side=args.side)
    results = []
    with tempfile.TemporaryDirectory(prefix="comtip-scaling-") as tmp:
        env = dict(os.environ, NAPARI_COMTIP_CACHE=tmp)
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", str(n), "--slide", str(slide), "--device", args.device,
                   "--model", args.model, "--pitch-um", str(args.pitch_um)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ns = np.array([r["n"] for r in results], float)
    ts = np.array([r["seconds"] for r in results], float)
    cs = np.array([r["cpu_seconds"] for r in results], float)
    b = float(np.polyfit(np.log(ns), np.log(ts), 1)[0]) if len(ns) > 1 else float("nan")
    b_cpu = float(np.polyfit(np.log(ns), np.log(cs), 1)[0]) if len(ns) > 1 else float("nan")
    rss = [r["peak_rss_mb"] for r in results]
    growth = max(rss) - min(rss)
    print(f"slide    {slide.name}; grid pitch {args.pitch_um:g} um; each size in a fresh process; cache on")
    print(f"machine  {_common.machine()}")
    rows = [[f"{r['n']:,}", r["seconds"], r["cpu_seconds"], r["spots_per_s"], r["peak_rss_mb"],
             r["peak_rss_mb"] - r["rss_before_mb"], "yes" if r["streamed"] else "no"] for r in results]
    print(_common.table(["spots", "seconds", "CPU seconds", "spots/s", "peak RSS MiB", "RSS growth in run MiB",
                         "streamed"], rows))
    ok_b = abs(b - 1.0) <= 0.1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"time ~ n^{b:.3f} (target 1.0 +- 0.1): {'met' if ok_b else 'MISSED'}; CPU time ~ n^{b_cpu:.3f}; "
          f"peak RSS spread across sizes {growth:.0f} MiB; load average {load:.1f}")
    _common.emit({"benchmark": "scaling", "sizes": [r["n"] for r in results], "seconds": ts.tolist(),
                  "spots_per_s": [r["spots_per_s"] for r in results], "peak_rss_mb": rss,
                  "rss_growth_in_run_mb": [r["peak_rss_mb"] - r["rss_before_mb"] for r in results],
                  "exponent": b, "exponent_target_met": ok_b, "cpu_seconds": cs.tolist(), "exponent_cpu": b_cpu,
                  "load_average": load, "rss_spread_mb": growth,
                  "streamed": [r["streamed"] for r in results], "machine": _common.machine()})
    return 0


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
