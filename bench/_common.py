"""Shared helpers of the benchmarks in ``bench/`` (run by hand, see bench/README.md).

Every benchmark prints a small table and, as its last line, one JSON object with its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes within about a minute on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: all cores, at most 2 when --quick shares a small machine)")
    p.add_argument("--model", default="auto", choices=["auto", "recipe", "tiny", "base"],
                   help="auto: the bundled checkpoint if installed, else 'recipe' (the architecture of "
                        "training/configs/tiny.yaml, which the bundled checkpoint uses); tiny/base: the presets "
                        "(untrained weights: the arithmetic is the same)")
    p.add_argument("--checkpoint", default=None, help="measure this checkpoint's model")
    return p


def setup_threads(args) -> int:
    import torch

    n = args.threads or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_config(name: str):
    """ComtipConfig of ``recipe`` (training/configs/tiny.yaml) or of a preset."""
    from napari_comtip.model import get_preset

    if name == "recipe":
        from napari_comtip.engine.run_config import load_run_config

        cfg = load_run_config(REPO / "training" / "configs" / "tiny.yaml").model
    else:
        cfg = get_preset(name)
    cfg.text.use_name_embedding = False  # the image path does not need the text model
    return cfg


def build_model(args, device: str = "cpu"):
    """The model to measure: a checkpoint's, or an untrained one of the same architecture."""
    import torch

    ck = args.checkpoint
    if ck is None and args.model == "auto":
        from napari_comtip.model import default_checkpoint_path

        bundled = default_checkpoint_path()
        ck = str(bundled) if bundled.is_file() else None
    if ck:
        from napari_comtip.model import load_checkpoint

        return load_checkpoint(ck).model.eval(), f"checkpoint {Path(ck).name}"
    name = "recipe" if args.model == "auto" else args.model
    from napari_comtip.model import build_model as build

    torch.manual_seed(0)
    model = build(model_config(name), [f"G{i}" for i in range(64)])
    what = "training/configs/tiny.yaml architecture" if name == "recipe" else f"{name} preset"
    return model.eval(), f"{what}, untrained"


def bench_checkpoint(args) -> Path:
    """A checkpoint file for end-to-end paths: --checkpoint, the bundled one, or an untrained
    recipe model whose retrieval bank and probe come from the demo section (made once, cached)."""
    if args.checkpoint:
        return Path(args.checkpoint)
    from napari_comtip.model import default_checkpoint_path

    bundled = default_checkpoint_path()
    if args.model == "auto" and bundled.is_file():
        return bundled
    name = "recipe" if args.model == "auto" else args.model
    out = bench_cache_dir("checkpoints") / f"untrained-{name}-demo-bank.pt"
    if out.is_file():
        from napari_comtip.errors import CheckpointError
        from napari_comtip.model import load_checkpoint

        try:
            load_checkpoint(out)
            return out
        except CheckpointError:  # written by an older model definition: make it again
            out.unlink()
    import numpy as np
    import torch

    from napari_comtip.engine import predictors
    from napari_comtip.engine.data import lognorm_matrix, panel_matrix
    from napari_comtip.engine.inference import embed_sample
    from napari_comtip.io import load_sample
    from napari_comtip.model import build_model as build, save_checkpoint

    demo = load_sample("@demo")
    ln = lognorm_matrix(demo.expression)
    panel = [str(demo.expression.var_names[i]) for i in np.argsort(-ln.mean(axis=0), kind="stable")[:250]]
    torch.manual_seed(0)
    model = build(model_config(name), panel).eval()
    emb = embed_sample(demo, model, device="cpu", features=True, cache=False)
    expr = panel_matrix(demo.expression, panel)
    probe = predictors.fit_probe(emb.features, expr, alpha=1.0, genes=panel)
    save_checkpoint(out, model, extras={"bank": {"emb": torch.from_numpy(np.asarray(emb.image)),
                                                 "expr": torch.from_numpy(expr), "ids": demo.spot_ids},
                                        "probe": probe.to_dict(),
                                        "provenance": {"note": "untrained weights, bank/probe from @demo; benchmarks only"}})
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def timed(fn: Callable[[], object], repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
            for r in cells]
    return "\n".join([line, sep, *body])


def emit(result: dict) -> None:
    """The benchmark's last output line: one JSON object."""
    print(json.dumps(result, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)), flush=True)


def bench_cache_dir(kind: str) -> Path:
    """A folder in the package cache for benchmark artefacts kept between runs (e.g. the big TIFF)."""
    from napari_comtip.io.cache import cache_dir

    d = cache_dir("bench") / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- a large pyramidal slide
def _pool_tiles(tile: int, n: int, seed: int = 0):
    """``n`` real H&E tiles (tile x tile RGB) cut from the bundled demo section, mostly tissue."""
    import numpy as np

    from napari_comtip.io.decode import decode_image

    src = REPO / "src" / "napari_comtip" / "sample_data" / "her2st_C2" / "ST-imgs" / "C" / "C2"
    jpgs = sorted(src.glob("*.jpg"))
    if not jpgs:  # fall back to the shared data set
        jpgs = sorted((REPO.parent / "shared" / "data" / "her2st" / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    img = decode_image(jpgs[0])
    H, W = img.shape[:2]
    cands = []
    for r in range(0, H - tile + 1, tile // 2):
        for c in range(0, W - tile + 1, tile // 2):
            t = img[r:r + tile, c:c + tile]
            frac = float((t.mean(axis=2) < 215).mean())  # tissue is darker than glass
            cands.append((frac, r, c))
    cands.sort(reverse=True)
    rng = np.random.default_rng(seed)
    top = cands[: max(n * 3, n)]
    pick = rng.choice(len(top), size=min(n, len(top)), replace=False)
    return [np.ascontiguousarray(img[top[i][1]:top[i][1] + tile, top[i][2]:top[i][2] + tile]) for i in pick]


def make_big_slide(side: int = 51200, tile: int = 256, mpp: float = 0.5, quality: int = 85,
                   n_pool: int = 64, log=print) -> Path:
    """A pyramidal, tiled, JPEG-compressed OME-TIFF of ``side`` x ``side`` RGB pixels, made once.

    The tiles are real H&E tiles from the bundled demo section (a pool of ``n_pool``, each JPEG
    encoded once and written as is from a generator, so memory stays small and writing takes
    seconds), placed pseudo-randomly. Levels halve down to <= 1024 px; each level is a separate
    tiled SubIFD, as in OME-TIFF pyramids. The levels are not downsampled copies of each other:
    the file is for measuring reading speed, not for viewing. Cached under
    ``cache_dir("bench")/slides`` and reused while its name (size, tile, mpp) matches.
    """
    import numpy as np
    import tifffile

    out = bench_cache_dir("slides") / f"synthetic-he-{side}px-t{tile}-mpp{mpp:g}-q{quality}.ome.tif"
    if out.is_file() and out.stat().st_size > 0:
        return out
    t0 = time.perf_counter()
    pool = _pool_tiles(tile, n_pool)
    opts = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                resolutionunit="CENTIMETER")
    # encode the pool once, with exactly the options of the big file, and take the tiles' bytes back
    pool_file = out.with_suffix(".pool.tif")
    strip = np.concatenate(pool, axis=1)
    tifffile.imwrite(pool_file, strip, **opts)
    with tifffile.TiffFile(pool_file) as tf:
        page = tf.pages[0]
        jpegtables = page.jpegtables
        fh = tf.filehandle
        pool_bytes = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts):
            fh.seek(off)
            pool_bytes.append(fh.read(cnt))
    pool_file.unlink()
    levels = []
    s = side
    while True:
        levels.append(s)
        if s <= 1024:
            break
        s = (s + 1) // 2

    def tiles(level: int, size: int):
        nt = -(-size // tile)
        rng = np.random.default_rng(1000 + level)
        idx = rng.integers(0, len(pool_bytes), size=nt * nt)
        for k in idx:
            yield pool_bytes[k]

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    res = (1e4 / mpp, 1e4 / mpp)
    extra = {"jpegtables": jpegtables} if jpegtables else {}
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            tif.write(tiles(0, side), shape=(side, side, 3), dtype=np.uint8, subifds=len(levels) - 1,
                      resolution=res, metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                                                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"},
                      **opts, **extra)
            for i, size in enumerate(levels[1:], start=1):
                f = 2 ** i
                tif.write(tiles(i, size), shape=(size, size, 3), dtype=np.uint8, subfiletype=1,
                          resolution=(res[0] / f, res[1] / f), **opts, **extra)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"generated {out.name} ({out.stat().st_size / 2**30:.2f} GiB, {len(levels)} levels) "
        f"in {time.perf_counter() - t0:.1f} s")
    return out
