"""Benchmark 6: cohort prediction, samples per second with 1 and with 2 processes.

Runs ``comtip predict --manifest M --out FOLDER`` (what a user runs) on real her2st sections,
once as one process and once as ``torchrun --standalone --nproc_per_node 2`` (gloo on the CPU,
one GPU per rank with ``--device cuda``), alternating so that a busy machine slows both alike.
Every run starts with an empty output folder and its own empty embedding cache, so each sample
is read, encoded and predicted. The 1-process run gets all ``--threads``, each of the 2
processes half of them. Reported: wall seconds of the whole command (process start, model load,
all samples, summary), samples/s, and the ratio 2-process / 1-process.

    python bench/cohort.py --quick
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

SECTIONS = ("B4", "C2", "C3", "C4")


def _run(nproc: int, manifest: Path, work: Path, tag: str, threads: int, device: str, mode: str) -> float:
    out, cache = work / f"out-{tag}", work / f"cache-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, NAPARI_COMTIP_CACHE=str(cache), OMP_NUM_THREADS=str(max(1, threads // nproc)),
               PYTHONPATH=os.pathsep.join([str(_common.REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    args = ["-m", "napari_comtip", "predict", "--manifest", str(manifest), "--out", str(out), "--device", device,
            "--mode", mode]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dt


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=str(_common.REPO.parent / "shared" / "data" / "her2st"),
                   help="her2st-style data set (default: ../shared/data/her2st)")
    p.add_argument("--samples", default=None, help=f"comma-separated sections (default {','.join(SECTIONS)}; quick: 3)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each (default 2; quick 1)")
    from napari_comtip.constants import PREDICT_MODES

    p.add_argument("--mode", default="probe", choices=PREDICT_MODES, help="predictor (default probe)")
    args = p.parse_args(argv)
    samples = args.samples.split(",") if args.samples else list(SECTIONS[1:] if args.quick else SECTIONS)
    repeats = args.repeats or (1 if args.quick else 2)
    threads = args.threads or (os.cpu_count() or 1)
    if args.quick:
        threads = min(threads, 2)
    work = Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    try:
        manifest = work / "manifest.csv"
        manifest.write_text("path,sample\n" + "".join(f"{args.data},{s}\n" for s in samples))
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(repeats):
            for n in (1, 2):
                times[n].append(_run(n, manifest, work, f"{n}-{r}", threads, args.device, args.mode))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {n: min(v) for n, v in times.items()}
    rate = {n: len(samples) / best[n] for n in best}
    ratio = rate[2] / rate[1]
    print(f"data     {args.data} sections {','.join(samples)}; mode {args.mode}; device {args.device}; "
          f"{threads} threads in all; best of {repeats}")
    print(f"machine  {_common.machine()}")
    print(_common.table(["processes", "seconds", "samples/s"], [[n, best[n], rate[n]] for n in (1, 2)]))
    print(f"2 processes / 1 process: {ratio:.2f}x")
    _common.emit({"benchmark": "cohort", "samples": samples, "threads": threads, "device": args.device,
                  "seconds_1": times[1], "seconds_2": times[2], "samples_per_s_1": rate[1],
                  "samples_per_s_2": rate[2], "ratio": ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
