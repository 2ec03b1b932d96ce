#!/usr/bin/env python
"""Precompute the patch cache of a training run (spot patches and unlabelled tissue patches).

Pretraining does this itself on first use; run it ahead of time to prepare a cluster job, to
check that every sample loads, or to see the panel size the config's rule gives:

    python training/prepare_data.py --config training/configs/tiny.yaml \
        --data ../shared/data/her2st [--sample B4 --sample C2 ...]

Patches go to the per-user cache (``$NAPARI_COMTIP_CACHE/patches``), keyed by the slide's
identity, the spot centres, ``model.patch_um`` and ``model.vision.img_size``.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.data import load_training_samples, resolve_data_specs
    from napari_comtip.engine.run_config import load_run_config
    from napari_comtip.errors import ComtipError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--sample", action="append", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.set)
        t0 = time.time()
        samples = load_training_samples(resolve_data_specs(args.data, args.sample))
        ts = build_training_set(samples, cfg.data, patch_um=cfg.model.patch_um,
                                img_size=cfg.model.vision.img_size, seed=cfg.training.seed)
    except ComtipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(samples)} samples, {ts.n_spots} spots, {ts.info.get('n_unlabelled', 0)} unlabelled tissue patches, "
          f"panel {len(ts.panel)} genes, patches {ts.patches.shape[1]} px of {cfg.model.patch_um} um "
          f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
