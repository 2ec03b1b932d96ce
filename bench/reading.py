"""Benchmark 8: the cost of the probe's full-resolution morphology reading (``vision.morphology_px``).

In one run and interleaved (a busy machine slows both alike), on a real her2st section:

* ``morphology``: spots/s of ``engine.inference.embed_sample`` with the probe's features (what
  ``comtip predict --mode probe`` computes per spot on first use; cache off) for the checkpoint
  as it reads (patches at ``morphology_px``, the ViT at ``img_size``, 92 statistics per patch);
* ``reference``: the same call, same weights, with ``morphology_px`` 0 (patches read at
  ``img_size``: the reading before 2026-12-07);
* ``statistics alone``: patches/s of ``model.morphology.morphology_stats`` on pre-read patches.

    python bench/reading.py --quick
"""

from __future__ import annotations

import copy
import statistics
import time

import _common


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=str(_common.REPO.parent / "shared" / "data" / "her2st"))
    p.add_argument("--sample", default="B4")
    p.add_argument("--repeat", type=int, default=None)
    args = p.parse_args(argv)
    threads = _common.setup_threads(args)
    import numpy as np
    import torch

    from napari_comtip.engine.inference import embed_sample
    from napari_comtip.io import load_sample
    from napari_comtip.model.morphology import morphology_stats

    model, what = _common.build_model(args, args.device)
    if not model.config.vision.morphology_px:
        model.config.vision.morphology_px = 224
        what += " (read at 224 px for this benchmark)"
    plain = copy.deepcopy(model)
    plain.config.vision.morphology_px = 0
    sample = load_sample(args.data, sample=args.sample)
    repeat = args.repeat or (2 if args.quick else 3)
    rates = {"morphology": [], "reference": []}
    for _ in range(repeat):
        for name, m in (("reference", plain), ("morphology", model)):
            t0 = time.perf_counter()
            embed_sample(sample, m, device=args.device, cache=False, features=True)
            rates[name].append(sample.n_spots / (time.perf_counter() - t0))
    from napari_comtip.engine.patch_cache import PatchCache

    side = model.input_px
    patches = torch.from_numpy(np.asarray(PatchCache().spots(sample, model.config.patch_um, side))[:256].copy())
    x = patches.float() / 255.0
    t0 = time.perf_counter()
    morphology_stats(x, model.config.patch_um / side)
    stats_rate = len(x) / (time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{what}; {sample.name}: {sample.n_spots} spots; {threads} torch threads; {args.device}")
    print(_common.table(["reading", "spots/s (runs)", "median"],
                        [[k, " / ".join(f"{r:,.0f}" for r in v), med[k]] for k, v in rates.items()]))
    print(f"morphology statistics alone: {stats_rate:,.0f} patches/s at {side} px; "
          f"morphology / reference: {med['morphology'] / med['reference']:.3f}")
    _common.emit({"benchmark": "reading", "machine": _common.machine(), "model": what, "sample": sample.name,
                  "n_spots": int(sample.n_spots), "rates": rates, "median": med,
                  "ratio": med["morphology"] / med["reference"], "stats_patches_per_s": stats_rate})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
