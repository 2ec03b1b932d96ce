"""Derive a LOSO arm's fold checkpoints from another arm's when the difference changes no training step.

The reading keys (model/config.py ``READING_KEYS``) change only how a trained model reads a patch:
``model.vision.colour_features`` and ``morphology_px`` append statistics of the patch to the
features the probe reads, ``test_views`` averages inference over flips and quarter turns,
``probe_input`` chooses whether the probe reads the features, the image embedding or both
(docs/model.md): the weights a run learns are the same with and without them. Training the arm
again would cost the CPU time of the parent arm for the same weights, so this copies each fold's run folder of ``--from`` under ``--to`` with the child arm's model
overrides written into the checkpoint's config, and leaves the parent's ``result.json`` there;
``comtip benchmark-loso --reevaluate --arms CHILD`` then re-fits the probe (now with the new
features) and scores every predictor. Only model keys that change no training step are accepted.

    python scripts/derive_fold_arm.py --out runs/prof-s0 --from comtip-profile --to comtip-profile-colour
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from napari_comtip.engine.loso_arms import ARMS
from napari_comtip.model.config import READING_KEYS

#: model config keys that do not change a training step (model/config.py READING_KEYS)
NO_TRAINING_EFFECT = {"model." + k for k in READING_KEYS}


def derive(out: Path, parent: str, child: str) -> list[Path]:
    po, co = ARMS[parent], ARMS[child]
    diff = {k: v for k, v in co.items() if po.get(k) != v}
    if set(po) - set(co) or not set(diff) <= NO_TRAINING_EFFECT:
        raise SystemExit(f"error: {child} differs from {parent} in {sorted(set(diff) | (set(po) - set(co)))}; "
                         f"only {sorted(NO_TRAINING_EFFECT)} may differ (train the arm instead)")
    made = []
    for fold in sorted((out / parent).iterdir()):
        src = fold / "run" / "model.pt"
        if not (src.exists() and (fold / "result.json").exists()):
            continue
        dst = out / child / fold.name
        if (dst / "result.json").exists():
            continue
        shutil.copytree(fold / "run", dst / "run", ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
        shutil.copy2(fold / "result.json", dst / "result.json")
        ck = torch.load(dst / "run" / "model.pt", weights_only=True, map_location="cpu")
        for key, value in diff.items():
            node = ck["config"]
            *path, last = key.split(".")[1:]
            for p in path:
                node = node[p]
            node[last] = value
        ck.setdefault("provenance", {})["derived_from"] = f"{parent} fold {fold.name} (config {diff})"
        tmp = dst / "run" / "model.pt.tmp"
        torch.save(ck, tmp)
        tmp.replace(dst / "run" / "model.pt")
        made.append(dst)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="the benchmark-loso --out folder")
    ap.add_argument("--from", dest="parent", required=True, choices=sorted(ARMS))
    ap.add_argument("--to", dest="child", required=True, choices=sorted(ARMS))
    a = ap.parse_args(argv)
    made = derive(a.out, a.parent, a.child)
    print(f"derived {len(made)} fold(s): " + ", ".join(str(m) for m in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
