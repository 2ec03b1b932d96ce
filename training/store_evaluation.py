"""Store the held-out evaluation of a checkpoint's recipe inside the checkpoint.

A bundled checkpoint has seen all its sections, so it is evaluated through its *recipe*: the same
config trained leave-one-section-out (``comtip benchmark-loso``). This script reads the fold
results of one arm (every seed found under the given folders) and writes their means per
predictor and per section into ``extras["evaluation"]`` of the checkpoint (atomically, weights
untouched, the change logged in ``provenance.updates``). ``comtip checkpoints`` lists it and
``comtip predict`` / the widget warn when a predictor was not positively correlated with the
measured expression on held-out sections.

    python training/store_evaluation.py --checkpoint src/napari_comtip/checkpoints/comtip-tiny-her2st.pt \\
        --loso runs/loso-her2st --arm comtip-lib --data "her2st B4/C2/C3/C4"
"""

from __future__ import annotations

import argparse
import sys


def evaluation_from_results(results: list[dict], arm: str, data: str) -> dict:
    """The ``extras["evaluation"]`` entry: per predictor, means over sections (each the mean over seeds)."""
    from napari_comtip.engine.loso_table import summarise

    rows = [r for r in summarise([x for x in results if x["arm"] == arm])]
    if not rows:
        raise SystemExit(f"no results of arm {arm!r} found")
    seeds = sorted({int(x.get("seed", 0)) for x in results if x["arm"] == arm})
    preds = {}
    for r in rows:
        preds[r["mode"]] = {k: round(float(r[k]), 4) for k in ("pcc_all", "pcc_heg50", "pcc_hvg50", "mse", "mae")}
        if r.get("unc_spearman") == r.get("unc_spearman"):  # not NaN
            preds[r["mode"]]["unc_spearman"] = round(float(r["unc_spearman"]), 4)
        preds[r["mode"]]["per_section"] = {s: {k: round(float(m[k]), 4) for k in ("pcc_all", "pcc_heg50", "pcc_hvg50")}
                                           for s, m in r["sections"].items()}
    return {"protocol": f"leave-one-section-out on {data}, same recipe trained without the held-out section "
                        "(docs/results.md)", "arm": arm, "seeds": seeds, "seed": seeds[0], "predictors": preds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--loso", action="append", required=True, help="benchmark-loso output folder(s) (any depth)")
    p.add_argument("--arm", required=True, help="the arm whose recipe the checkpoint was trained with")
    p.add_argument("--data", required=True, help="words naming the data set and sections, for the record")
    args = p.parse_args(argv)

    from napari_comtip.engine.loso import _git_commit
    from napari_comtip.engine.loso_table import collect_results
    from napari_comtip.model.checkpoint import update_checkpoint

    results = [r for d in args.loso for r in collect_results(d)]
    ev = evaluation_from_results(results, args.arm, args.data)
    update_checkpoint(args.checkpoint, extras={"evaluation": ev},
                      note={"what": "stored held-out evaluation", "arm": args.arm, "commit": _git_commit()})
    for mode, m in ev["predictors"].items():
        print(f"{mode:>12}: PCC all {m['pcc_all']:.3f}  HEG-50 {m['pcc_heg50']:.3f}  HVG-50 {m['pcc_hvg50']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
