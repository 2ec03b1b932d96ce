"""Benchmark 4: training throughput of ``comtip pretrain`` vs a bare forward+backward loop.

Both use the same model (the ``training/configs/tiny.yaml`` recipe of the bundled checkpoint, or
``--config``), the same batch size and the same optimizer (AdamW), in one run:

* ``pretrain``: ``engine.training.pretrain`` (the function ``comtip pretrain`` runs) on the demo
  section's spots (or ``--data``/``--section``), timed from its own ``metrics.csv``
  (``elapsed_s``), after two warm-up steps; data loading and patch cutting happen before the
  timed steps, once. Run twice: like for like with the bare loop (no vision-only MFM batch),
  and with the recipe as configured (full only);
* ``bare``: ``loss = model(images, gene_idx, values, mask)["loss"]; loss.backward(); opt.step()``
  on pre-loaded tensors: exactly the batches pretrain draws at those steps (augmented images and
  gene sentences, whose length sets the text encoder's work), built before timing; no data
  work, no logging, no gradient clipping, no scheduler.

Reported: samples/s (spots per second) of each, and their ratio.

``--frozen``: the frozen-encoder feature cache (engine/feature_cache.py) instead. A fixed ViT-S/16
at 112 px (12 blocks, random weights: the arithmetic of a small foundation model, ``vision.freeze:
true``) is trained for ``--epochs`` epochs three times in one run: running the ViT on every step
(``training.feature_cache: false``), through the cache with a fresh store, and once more with the
store the second run left (a later run of the same signature). Reported: the seconds of epoch 1
and the mean of epochs 2+, from each run's own ``metrics.csv``.

    python bench/training.py --quick
    python bench/training.py --frozen [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=str(_common.REPO / "training" / "configs" / "tiny.yaml"))
    p.add_argument("--data", default="@demo", help="training data (default: the bundled demo section)")
    p.add_argument("--section", action="append", default=None, help="sample(s) inside --data")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8 quick, 30)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--frozen", action="store_true", help="measure the frozen-encoder feature cache instead")
    p.add_argument("--epochs", type=int, default=None, help="--frozen: epochs per run (default 3 quick, 4)")
    p.add_argument("--views", type=int, default=1, help="--frozen: training.feature_views (default 1)")
    args = p.parse_args(argv)
    threads = _common.setup_threads(args)
    if args.frozen:
        return frozen(args, threads)

    import numpy as np
    import torch

    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.device import resolve_device
    from napari_comtip.engine.run_config import load_run_config
    from napari_comtip.engine.run_folder import read_metrics
    from napari_comtip.engine.training import pretrain
    from napari_comtip.io import load_sample
    from napari_comtip.model import build_model

    dev = resolve_device(args.device)
    steps = args.steps or (8 if args.quick else 30)
    warm = 2
    sets = ["training.checkpoint_every=100000", f"training.threads={threads}"]
    if args.batch_size:
        sets.append(f"training.batch_size={args.batch_size}")
    if args.quick:
        sets += ["training.bank=false", "training.probe=false"]  # the timed steps do not need them
    cfg = load_run_config(args.config, sets)
    samples = [load_sample(args.data, sample=s) for s in (args.section or [None])]
    t = time.perf_counter()
    ts = build_training_set(samples, cfg.data, patch_um=cfg.model.patch_um, img_size=cfg.model.vision.img_size,
                            seed=cfg.training.seed)
    prep_s = time.perf_counter() - t
    B = min(cfg.training.batch_size, ts.n_spots)

    def run_pretrain(unlabelled: bool) -> tuple[float, float, list]:
        c = load_run_config(args.config, sets + [f"data.unlabelled={'true' if unlabelled else 'false'}"])
        with tempfile.TemporaryDirectory(prefix="comtip-bench-train-") as tmp:
            t0 = time.perf_counter()
            pretrain(c, samples, Path(tmp) / "run", max_steps=warm + steps, device=str(dev), training_set=ts)
            wall = time.perf_counter() - t0
            rows = read_metrics(Path(tmp) / "run" / "metrics.csv")
        el = [r["elapsed_s"] for r in rows]
        rate = B * steps / (el[warm + steps - 1] - el[warm - 1])
        return rate, wall, rows

    # ------------------------------------------------------------------ bare loop, same model
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, ts.panel).to(dev).train()
    opt = torch.optim.AdamW([p_ for p_ in model.parameters() if p_.requires_grad], lr=cfg.training.lr,
                            weight_decay=cfg.training.weight_decay)
    # The bare loop runs on exactly the batches pretrain draws at the timed steps (augmented images
    # and gene sentences, whose length sets the text encoder's work), made before timing; if the
    # trainer's batch builder is not importable, same-distribution sentences on fixed images.
    like = load_run_config(args.config, sets + ["data.unlabelled=false"])
    spe = max(1, ts.n_spots // B)
    batches = []
    try:
        from napari_comtip.engine.batches import Augment, BatchSet
        from napari_comtip.engine.distributed import Dist

        like.training.batch_size = B
        for k in range(warm + steps):
            imgs, gi, v, m, _, prof, _, _ = BatchSet(ts, like, k // spe, spe, Dist(), Augment(like.data))[k % spe]
            batches.append((model.preprocess(imgs.to(dev)), gi.to(dev), v.to(dev), m.to(dev),
                            prof.to(dev) if prof.shape[0] else None))  # the profile term's input, as pretrain
        source = "the trainer's own batches"
    except (ImportError, TypeError, AttributeError):
        x = model.preprocess(torch.from_numpy(np.asarray(ts.patches[:B])).to(dev))
        expr = torch.from_numpy(np.asarray(ts.expr[:B]))
        for k in range(warm + steps):
            g = torch.Generator().manual_seed(1000 + k)
            batches.append((x, *(t.to(dev) for t in model.sample_text(expr, generator=g)),
                            expr.to(dev) if cfg.model.w_profile > 0 else None))
        source = "fixed images, sampled sentences"
    use_bf16 = dev.type == "cuda"

    def bare() -> float:
        it = iter(batches)

        def one():
            x, gi, v, m, prof = next(it)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(x, gi, v, m, profile=prof)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warm):
            one()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return B * steps / (time.perf_counter() - t0)

    bare_r = [bare()]
    pre_rate, pre_wall, rows = run_pretrain(unlabelled=False)
    bare_r.append(bare())
    recipe = None
    if not args.quick and cfg.data.unlabelled:
        recipe = run_pretrain(unlabelled=True)
    bare_s = statistics.median(bare_r)
    ratio = pre_rate / bare_s
    print(f"model    {cfg.model.vision.name} at {cfg.model.vision.img_size} px (config {Path(args.config).name}), "
          f"{sum(p_.numel() for p_ in model.parameters() if p_.requires_grad) / 1e6:.2f} M trainable parameters")
    print(f"data     {', '.join(s.name for s in samples)}: {ts.n_spots} spots, panel {len(ts.panel)} genes "
          f"(patches cut once in {prep_s:.1f} s)")
    print(f"device   {dev}, {threads} torch threads, batch {B}, {steps} timed steps after {warm} warm-up steps; "
          f"bare loop on {source}")
    table_rows = [["pretrain (like for like: spots only)", pre_rate, ratio],
                  ["bare forward+backward+AdamW", bare_s, 1.0]]
    if recipe is not None:
        table_rows.insert(1, ["pretrain (recipe: + vision-only MFM batch)", recipe[0], recipe[0] / bare_s])
    print(_common.table(["what", "samples/s", "x bare"], table_rows))
    print(f"pretrain wall time for {warm + steps} steps incl. setup and final model: {pre_wall:.1f} s; "
          f"pretrain / bare = {ratio:.2f}")
    out = {"benchmark": "training", "pretrain_samples_per_s": pre_rate, "bare_samples_per_s": bare_s, "ratio": ratio,
           "batch_size": B, "steps": steps, "device": str(dev), "pretrain_wall_s": pre_wall,
           "bare_runs": bare_r, "machine": _common.machine()}
    if recipe is not None:
        out["pretrain_recipe_samples_per_s"] = recipe[0]
    _common.emit(out)
    return 0


def frozen(args, threads: int) -> int:
    """Epoch 2+ against epoch 1 with and without the feature cache (see the module docstring)."""
    import os

    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.device import resolve_device
    from napari_comtip.engine.run_config import run_config_from_dict
    from napari_comtip.engine.run_folder import read_metrics
    from napari_comtip.engine.training import pretrain
    from napari_comtip.io import load_sample

    dev = resolve_device(args.device)
    epochs = args.epochs or (3 if args.quick else 4)
    batch = args.batch_size or 32

    def cfg(cache: bool):
        return run_config_from_dict({
            "preset": "tiny",
            "model": {"w_mfm": 0.0, "vision": {"name": "vit_small_patch16_224", "img_size": 112, "pool": "cls",
                                               "overrides": {"depth": 12}, "freeze": True}},
            "data": {"unlabelled": False},
            "training": {"epochs": epochs, "batch_size": batch, "checkpoint_every": 100000, "threads": threads,
                         "bank": False, "probe": False, "feature_cache": cache, "feature_views": args.views}})

    c0 = cfg(False)
    samples = [load_sample(args.data, sample=s) for s in (args.section or [None])]
    ts = build_training_set(samples, c0.data, patch_um=c0.model.patch_um, img_size=c0.model.vision.img_size)
    spe = ts.n_spots // min(batch, ts.n_spots)
    rows, out = [], {}
    old_cache = os.environ.get("NAPARI_COMTIP_CACHE")
    with tempfile.TemporaryDirectory(prefix="comtip-bench-frozen-") as tmp:
        os.environ["NAPARI_COMTIP_CACHE"] = str(Path(tmp) / "cache")  # a fresh feature store for this bench
        try:
            for label, key, cache in (("ViT on every step (no cache)", "no_cache", False),
                                      ("feature cache, fresh store", "cache_fresh", True),
                                      ("feature cache, store of the previous run", "cache_warm", True)):
                t0 = time.perf_counter()
                run = Path(tmp) / key
                pretrain(cfg(cache), samples, run, device=str(dev), training_set=ts)
                wall = time.perf_counter() - t0
                el = [r["elapsed_s"] for r in read_metrics(run / "metrics.csv")]
                ends = [el[(e + 1) * spe - 1] for e in range(epochs)]
                per = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
                later = statistics.mean(per[1:])
                rows.append([label, per[0], later, later / per[0], wall])
                out[key] = {"epoch_s": per, "epoch1_s": per[0], "epochs2plus_mean_s": later, "wall_s": wall}
        finally:
            if old_cache is None:
                os.environ.pop("NAPARI_COMTIP_CACHE", None)
            else:
                os.environ["NAPARI_COMTIP_CACHE"] = old_cache
    print(f"model    vit_small_patch16_224 at 112 px, 12 blocks, frozen (random weights); feature_views {args.views}")
    print(f"data     {', '.join(s.name for s in samples)}: {ts.n_spots} spots, {spe} steps of {batch} per epoch, "
          f"{epochs} epochs; device {dev}, {threads} torch threads")
    print(_common.table(["run", "epoch 1 s", "epochs 2+ s (mean)", "2+ / 1", "wall s"], rows))
    speed = out["no_cache"]["epochs2plus_mean_s"] / out["cache_fresh"]["epochs2plus_mean_s"]
    print(f"epochs 2+ are {speed:.1f}x faster with the cache than running the ViT")
    _common.emit({"benchmark": "training-frozen", **out, "epochs2plus_speedup": speed, "epochs": epochs,
                  "views": args.views, "batch_size": batch, "n_spots": ts.n_spots, "device": str(dev),
                  "machine": _common.machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
