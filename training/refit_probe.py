"""Re-fit the ridge probe stored in checkpoints with the current rule, without retraining.

The probe (ridge regression on the frozen pooled ViT features) is stored inside ``model.pt``.
When its fitting rule changes (as when the penalty choice moved from leave-one-section-out to
exact leave-one-out on the training spots, docs/results.md), the encoders need not be trained
again: this script re-fits the probe in place (atomically; weights, bank and config untouched,
the refit recorded in the checkpoint's provenance).

    # one checkpoint, on the sections it was trained on
    python training/refit_probe.py --checkpoint src/napari_comtip/checkpoints/comtip-tiny-her2st.pt \\
        --data ../shared/data/her2st

    # every fold of a LOSO benchmark folder: re-fit on the fold's training sections, re-score the
    # probe row of result.json through the user path (predict_sample + evaluate), rebuild the table
    python training/refit_probe.py --loso runs/loso --data ../shared/data/her2st --results-md docs/results.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (e.g. ../shared/data/her2st)")
    p.add_argument("--sample", action="append", default=None, help="sections to fit on (default: all)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="one model.pt to re-fit in place")
    g.add_argument("--loso", help="a `comtip benchmark-loso` output folder: re-fit and re-score every fold")
    p.add_argument("--arms", default=None, help="with --loso: comma-separated arms (default: all learned arms present)")
    p.add_argument("--results-md", default=None, help="with --loso: rebuild this markdown table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from napari_comtip.engine.evaluation import evaluate_predictions
    from napari_comtip.engine.loso import _git_commit, _write_json, collect_results, write_results_md
    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.engine.training import refit_probe
    from napari_comtip.io import list_samples, load_sample

    names = args.sample or list_samples(args.data)
    samples = {n: load_sample(args.data, sample=n) for n in names}
    note = {"commit": _git_commit(), "rule": "exact leave-one-out on the training spots"}
    if args.checkpoint:
        r = refit_probe(args.checkpoint, list(samples.values()), note=note)
        print(f"{args.checkpoint}: alpha {r['alpha']:g} on {r['n_spots']} spots; LOO MSE per alpha {r['alpha_scores']}")
        return 0

    root = Path(args.loso)
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    for res_path in sorted(root.glob("*/*/result.json")):
        res = json.loads(res_path.read_text())
        if res["arm"] == "ridge" or "probe" not in res["modes"] or (arms and res["arm"] not in arms):
            continue
        ckpt = res_path.parent / "run" / "model.pt"
        train = [samples[n] for n in res["train_sections"]]
        t0 = time.time()
        r = refit_probe(ckpt, train, note=note)
        pred = predict_sample(samples[res["held_out"]], checkpoint=str(ckpt), mode="probe")
        m = evaluate_predictions(pred, samples[res["held_out"]].expression)
        m.update(mode="probe", seconds=time.time() - t0, alpha=r["alpha"])
        old = res["modes"]["probe"]
        res["modes"]["probe"] = m
        res.setdefault("probe_refits", []).append({"commit": note["commit"], "rule": note["rule"], "alpha": r["alpha"],
                                                   "before": {k: old.get(k) for k in ("pcc_all", "pcc_heg50", "pcc_hvg50")}})
        _write_json(res_path, res)
        print(f"{res['arm']:>22} {res['held_out']}: alpha {r['alpha']:g}; PCC all/HEG-50/HVG-50 "
              f"{old['pcc_all']:.3f}/{old['pcc_heg50']:.3f}/{old['pcc_hvg50']:.3f} -> "
              f"{m['pcc_all']:.3f}/{m['pcc_heg50']:.3f}/{m['pcc_hvg50']:.3f}", flush=True)
    if args.results_md:
        write_results_md(collect_results(root), args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
