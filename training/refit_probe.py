"""Re-fit the ridge probe stored in checkpoints with the current rule, without retraining.

The probe (ridge regression on the frozen pooled ViT features) is stored inside ``model.pt``.
When its fitting rule changes (as when the penalty choice moved from leave-one-section-out to
exact leave-one-out on the training spots, docs/results.md), the encoders need not be trained
again: this script re-fits the probe in place (atomically; weights and config untouched, the
refit recorded in the checkpoint's provenance), with zero-shot's residual spread and, when it
holds the same spots, the retrieval bank. ``--set vision.test_views=8`` first switches how the
model reads a patch (only ``READING_KEYS``, which change no training step).

    # one checkpoint, on the sections it was trained on
    python training/refit_probe.py --checkpoint src/napari_comtip/checkpoints/comtip-tiny-her2st.pt \\
        --data ../shared/data/her2st

    # every fold of a LOSO benchmark folder: `comtip benchmark-loso ... --reevaluate` re-fits each
    # fold's probe on its training sections and re-scores every predictor (no retraining)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (e.g. ../shared/data/her2st)")
    p.add_argument("--sample", action="append", default=None, help="sections to fit on (default: all)")
    p.add_argument("--checkpoint", required=True, help="the model.pt to re-fit in place")
    p.add_argument("--context", default=None, help="probe context (engine/context.py; default: Default.PROBE_CONTEXT)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--set", dest="reading", action="append", default=[], metavar="KEY=VALUE",
                   help="first switch how the model reads a patch (model/config.py READING_KEYS, e.g. "
                        "vision.test_views=8); the probe, bank and zero-shot spread are then fitted on that reading")
    args = p.parse_args(argv)

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from napari_comtip.constants import Default
    from napari_comtip.engine.loso import _git_commit
    from napari_comtip.engine.bank_probe import refit_probe
    from napari_comtip.io import list_samples, load_sample

    bad = [item for item in args.reading if "=" not in item]
    if bad:
        p.error(f"--set {bad[0]!r} is not KEY=VALUE (e.g. --set vision.test_views=8)")
    reading = {k.strip().removeprefix("model."): yaml.safe_load(v) for k, v in (i.split("=", 1) for i in args.reading)}
    names = args.sample or list_samples(args.data)
    samples = [load_sample(args.data, sample=n) for n in names]
    ctx = args.context or Default.PROBE_CONTEXT
    note = {"commit": _git_commit(), "rule": "exact leave-one-out on the training spots", "context": ctx}
    r = refit_probe(args.checkpoint, samples, note=note, context=ctx, reading=reading or None)
    print(f"{args.checkpoint}: alpha {r['alpha']:g} on {r['n_spots']} spots ({ctx}); LOO MSE per alpha {r['alpha_scores']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
