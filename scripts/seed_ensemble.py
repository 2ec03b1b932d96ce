"""Score a seed ensemble of one LOSO arm: the mean of its fold models' predictions over seeds.

Each held-out section of a ``comtip benchmark-loso`` arm has one fold checkpoint per seed (one
``--out`` folder per seed). This predicts the section with every seed's fold checkpoint through
the user path (``engine.predict.predict_sample``, the same call the benchmark scores; embeddings
come from the cache the benchmark filled), averages the predictions over seeds and scores the
mean with ``engine.evaluation.evaluate_predictions``, beside each seed alone. It trains nothing
and writes one JSON file; the numbers say whether shipping several encoders would pay.

    python scripts/seed_ensemble.py --data ../shared/data/her2st --arm comtip-rank-colour \\
        --runs runs/h64-s0 runs/h64-s1 runs/h64-s2 --out runs/ensemble-her2st.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MODES = ("probe", "zero-shot")


def score_section(sample, checkpoints: list, modes=MODES) -> dict:
    """Each checkpoint's prediction of ``sample`` (a loaded SpatialSample with expression) and
    their mean, scored; per mode ``{"ensemble": metrics, "seeds": [metrics, ...]}``."""
    from napari_comtip.engine.evaluation import evaluate_predictions
    from napari_comtip.engine.predict import predict_sample

    section = sample.name
    out: dict = {}
    for mode in modes:
        preds = [predict_sample(sample, checkpoint=str(c), mode=mode, device="cpu") for c in checkpoints]
        names = [list(map(str, p.var_names)) for p in preds]
        if any(n != names[0] for n in names):
            raise SystemExit(f"{section}: the seeds' fold models predict different gene panels; cannot average")
        single = [evaluate_predictions(p, sample.expression) for p in preds]
        mean = preds[0].copy()
        mean.X = np.mean([np.asarray(p.X, np.float64) for p in preds], axis=0).astype(np.float32)
        ens = evaluate_predictions(mean, sample.expression)
        keys = ("pcc_all", "pcc_heg50", "pcc_hvg50", "mse")
        out[mode] = {"ensemble": {k: float(ens[k]) for k in keys},
                     "seeds": [{k: float(m[k]) for k in keys} for m in single]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--arm", required=True)
    ap.add_argument("--runs", nargs="+", required=True, type=Path, help="one benchmark-loso --out folder per seed")
    ap.add_argument("--out", required=True, type=Path, help="JSON file to write (atomically)")
    a = ap.parse_args(argv)
    import torch

    from napari_comtip.io import load_sample

    torch.set_num_threads(1)
    sections = sorted({p.name for r in a.runs for p in (r / a.arm).iterdir() if (p / "run" / "model.pt").exists()})
    result = {"data": a.data, "arm": a.arm, "runs": [str(r) for r in a.runs], "sections": {}}
    for sec in sections:
        ckpts = [r / a.arm / sec / "run" / "model.pt" for r in a.runs]
        missing = [str(c) for c in ckpts if not c.exists()]
        if missing:
            raise SystemExit(f"error: no fold checkpoint {missing[0]} (every seed needs every section)")
        result["sections"][sec] = score_section(load_sample(a.data, sample=sec), ckpts)
        for mode, r in result["sections"][sec].items():
            seeds = " ".join(f"{s['pcc_heg50']:.3f}" for s in r["seeds"])
            print(f"{sec} {mode}: seeds {seeds} -> ensemble {r['ensemble']['pcc_heg50']:.3f} HEG-50", flush=True)
    tmp = a.out.with_suffix(a.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
