"""The ``comtip`` command line (also ``python -m napari_comtip``, which torchrun launches).

Every user-facing action of the plugin has a subcommand here, and both call the same core
functions. Errors a user can fix (:class:`~napari_comtip.errors.ComtipError`) are printed as one
line ``error: ...`` and exit with status 2, without a traceback; anything unexpected prints one
``internal error: ...`` line and logs its traceback (see :mod:`napari_comtip._cli_support`).

Each subcommand has one ``_add_<name>`` function (its arguments) and one ``_run_<name>``
function (its handler). Heavy imports happen inside the handlers so ``comtip --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from ._cli_support import (
    add_sample_args, float_above, gene_list, int_at_least, load_sample_from_args, one_line_warnings, run_guarded,
)
from .constants import PREDICT_MODES, Cohort, Default
from .progress import tqdm_progress

#: the help of every --checkpoint option (names: `comtip checkpoints`)
CHECKPOINT_HELP = ("a bundled checkpoint's name (see `comtip checkpoints`, e.g. comtip-tiny-mouse-brain) or the path "
                   "of a CoMTIP .pt file; default: the bundled comtip-tiny-her2st")


# --------------------------------------------------------------------------- inspect
def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="load a sample and print what was found (a multi-sample dataset: list its samples)")
    add_sample_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _run_inspect(args: argparse.Namespace) -> int:
    from .io import DEMO_ALIAS, detect_format, list_samples

    if args.sample is None and args.slide is None and str(args.path) != DEMO_ALIAS:
        fmt = detect_format(args.path)
        names = list_samples(args.path) if fmt != "bare" else []
        if len(names) > 1:  # a multi-sample data set: list its samples (inspect one with --sample)
            if args.json:
                print(json.dumps({"path": str(args.path), "format": fmt, "samples": names}))
            else:
                print(f"dataset      {args.path}  ({fmt})\n"
                      f"samples      {len(names)}: {', '.join(names)}\n"
                      f"inspect one  comtip inspect {args.path} --sample {names[0]}")
            return 0
    sample = load_sample_from_args(args, progress=tqdm_progress("loading"))
    info = sample.summary()
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    levels = ", ".join(f"{w}x{h}" for h, w in info["levels"])
    lines = [
        f"sample       {info['name']}  ({info['format']})",
        f"image        {info['width']} x {info['height']} px  ({info['image']})",
        f"pyramid      {len(info['levels'])} levels: {levels}",
        f"resolution   {info['mpp']:.4f} um/px  (from {info['mpp_source']})",
        f"spots        {info['n_spots']}  (diameter {info['spot_diameter_px']:.1f} px)",
        f"genes        {info['n_genes']}",
    ]
    if info.get("dropped_spots"):
        lines.append(f"dropped      {info['dropped_spots']} selected spots without counts")
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict gene expression for every spot of a slide, or of a cohort")
    add_sample_args(p, many=True)
    p.add_argument("--manifest", default=None,
                   help="cohort CSV with columns path and optional sample, slide, mpp, pitch_um, out (one row per sample)")
    p.add_argument("--checkpoint", default=None, metavar="NAME|PATH", help=CHECKPOINT_HELP)
    p.add_argument("--mode", choices=PREDICT_MODES, default=Default.PREDICT_MODE,
                   help=f"predictor (default {Default.PREDICT_MODE}, the best on held-out sections; see docs/results.md)")
    p.add_argument("--genes", default=None, help="comma-separated gene symbols or feature ids, e.g. Gfap or ENSMUSG00000020932 (default: the whole panel)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int_at_least(1), default=None)
    p.add_argument("--reference", default=None, help="reference dataset for retrieval/probe (default: the checkpoint's bank)")
    p.add_argument("--reference-sample", action="append", default=None, help="sample name(s) inside --reference")
    p.add_argument("--out", required=True, help="output .h5ad; for a cohort, the output folder")
    p.add_argument("--csv", default=None, help="also write a CSV table (spots x genes)")
    p.add_argument("--csv-each", action="store_true", help="cohort: also write <sample>.csv beside each .h5ad")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (cohort: redo every sample instead of resuming)")


def _is_cohort(args: argparse.Namespace) -> bool:
    return bool(args.manifest) or len(args.path) != 1 or not str(args.out).lower().endswith(".h5ad")


def _run_predict(args: argparse.Namespace) -> int:
    from .engine.predict_file import check_outputs, predict_to_file

    if _is_cohort(args):
        return _run_cohort(args)
    args.path = args.path[0]

    check_outputs(args.out, args.csv, args.overwrite)  # fail before the slow part
    sample = load_sample_from_args(args, progress=tqdm_progress("loading"))
    result = predict_to_file(
        sample,
        out=args.out,
        checkpoint=args.checkpoint,
        mode=args.mode,
        genes=gene_list(args.genes),
        device=args.device,
        batch_size=args.batch_size,
        reference=args.reference,
        reference_samples=args.reference_sample,
        csv=args.csv,
        overwrite=args.overwrite,
        progress=tqdm_progress("encoding"),
    )
    print(f"wrote {result.n_obs} spots x {result.n_vars} genes to {args.out} "
          f"(mode {args.mode}, device {result.uns['comtip']['device']})")
    return 0


def _run_cohort(args: argparse.Namespace) -> int:
    """``comtip predict`` over many samples (also under torchrun): see ``engine/cohort.py``."""
    from .errors import InputError
    from .io.manifest import check_items, expand_paths, read_manifest

    if args.csv:
        raise InputError("--csv names one file; a cohort writes one table per sample",
                         hint="use --csv-each to write <sample>.csv beside each .h5ad")
    if args.manifest and args.path:
        raise InputError("give either paths or --manifest, not both", hint="list every sample in the manifest")
    if args.sample or args.slide:
        raise InputError("--sample/--slide name one sample; a cohort takes them per row",
                         hint="use a --manifest with 'sample' and 'slide' columns")
    if not args.manifest and not args.path:
        raise InputError("no samples to predict", hint="give paths or a --manifest")
    if str(args.out).lower().endswith(".h5ad"):
        raise InputError("a cohort writes one .h5ad per sample into a folder, --out names a file", path=args.out,
                         hint="give an output folder, e.g. --out predictions/")
    if args.manifest:
        items = read_manifest(args.manifest, args.out, mpp=args.mpp, pitch_um=args.pitch_um)
    else:
        items = expand_paths(args.path, args.out, mpp=args.mpp, pitch_um=args.pitch_um)
    check_items(items, args.out)  # everything checkable up front, before the model loads
    from .engine.cohort import predict_cohort

    rank = int(os.environ.get("RANK", "0"))
    bar = tqdm_progress(f"samples (rank {rank})" if os.environ.get("WORLD_SIZE", "1") != "1" else "samples",
                        unit="sample", leave=True, position=0, close_when_done=False)
    result = predict_cohort(items, args.out, checkpoint=args.checkpoint, mode=args.mode, genes=gene_list(args.genes),
                            device=args.device, batch_size=args.batch_size, reference=args.reference,
                            reference_samples=args.reference_sample, csv_tables=args.csv_each,
                            overwrite=args.overwrite, progress=bar,
                            sample_progress=lambda name: tqdm_progress(f"  {name}"))
    bar.close()
    if result.rank != 0:
        return 1 if result.n_failed else 0
    c = result.counts
    print(f"{len(result.rows)} samples: {c.get(Cohort.OK, 0)} predicted, {c.get(Cohort.SKIPPED, 0)} already done, "
          f"{c.get(Cohort.FAILED, 0)} failed; summary in {result.summary}")
    if result.n_failed:
        for r in result.rows:
            if r["status"] == Cohort.FAILED:
                print(f"failed: {r['sample']}: {r['error']}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- pretrain
def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain CoMTIP on slides with spatial transcriptomics")
    recipe = p.add_mutually_exclusive_group(required=True)
    recipe.add_argument("--preset", default=None, metavar="NAME",
                        help="a packaged recipe: tiny (CPU), base (one GPU), ...; `comtip presets` lists them")
    recipe.add_argument("--config", default=None,
                        help="YAML config file; it may start from a preset with a 'preset: NAME' line")
    p.add_argument("--data", action="append", required=True, help="dataset path; repeat for several")
    p.add_argument("--sample", action="append", default=None,
                   help="sample name(s); repeat; with one --data they all come from it, else one per --data")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, config)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--max-steps", type=int_at_least(1), default=None, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=int_at_least(1), default=None, help="override the config's epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.mask_ratio=0.6")


def _run_pretrain(args: argparse.Namespace) -> int:
    from .engine.callbacks import TqdmCallback
    from .engine.training import pretrain_run

    main_rank = int(os.environ.get("RANK", "0")) == 0
    bar = TqdmCallback() if main_rank else None
    try:
        final = pretrain_run(args.config, args.data, args.out, samples=args.sample, overrides=args.set,
                             epochs=args.epochs, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                             max_steps=args.max_steps, device=args.device, callbacks=[bar] if bar else [],
                             preset=args.preset)
    finally:
        if bar is not None:
            bar.close()
    if main_rank:
        print(f"wrote {final}")
    return 0


# --------------------------------------------------------------------------- presets
def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the packaged training recipes (comtip pretrain --preset NAME)")
    p.add_argument("name", nargs="?", default=None, help="print this preset's whole config as YAML (a start for --config)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects (name, purpose, main settings)")


def _run_presets(args: argparse.Namespace) -> int:
    from .model.presets import describe_presets

    if args.name is not None:
        import yaml

        from .engine.run_config import load_run_config

        d = load_run_config(None, preset=args.name).to_dict()
        print(json.dumps(d) if args.json else f"# comtip presets {args.name}: the whole resolved recipe\n"
              + yaml.safe_dump(d, sort_keys=False), end="" if not args.json else "\n")
        return 0
    info = describe_presets()
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(p["name"]) for p in info)
    for p in info:
        print(f"{p['name']:<{width}}  {p['purpose']}")
    print(f"\nrun one:   comtip pretrain --preset {info[0]['name']} --data DATA --out RUN\n"
          f"see one:   comtip presets {info[0]['name']}   (a YAML file may start from it: 'preset: {info[0]['name']}')")
    return 0


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="per-gene Pearson correlation of predictions on a held-out sample")
    p.add_argument("--checkpoint", default=None, metavar="NAME|PATH", help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True)
    p.add_argument("--sample", default=None)
    p.add_argument("--mode", choices=PREDICT_MODES, default=Default.PREDICT_MODE,
                   help=f"predictor (default {Default.PREDICT_MODE}, the best on held-out sections; see docs/results.md)")
    p.add_argument("--genes", default=None, help="comma-separated gene symbols or feature ids to score (default: the whole panel)")
    p.add_argument("--reference", default=None)
    p.add_argument("--reference-sample", action="append", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int_at_least(1), default=None)
    p.add_argument("--json", action="store_true")


def _run_evaluate(args: argparse.Namespace) -> int:
    from .engine.evaluation import evaluate_sample
    from .io import load_sample

    metrics = evaluate_sample(load_sample(args.data, sample=args.sample), checkpoint=args.checkpoint, mode=args.mode,
                              device=args.device, batch_size=args.batch_size, reference=args.reference,
                              reference_samples=args.reference_sample, progress=tqdm_progress("encoding"),
                              genes=[g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None)
    if args.json:
        print(json.dumps(metrics, default=float))
    else:
        for k in ("mode", "n_spots", "n_genes", "pcc_all", "pcc_heg50", "pcc_hvg50", "mse", "mae"):
            v = metrics.get(k)
            print(f"{k:10s} {v:.4f}" if isinstance(v, float) else f"{k:10s} {v}")
    return 0


# --------------------------------------------------------------------------- benchmark-loso
def _add_loso(sub) -> None:
    p = sub.add_parser("benchmark-loso", help="leave-one-section-out benchmark with ablations")
    p.add_argument("--data", required=True, help="her2st-style dataset folder")
    p.add_argument("--sample", action="append", default=None, help="sections (default: all in --data)")
    p.add_argument("--config", default=None, help="training config (default: the loso preset)")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: all)")
    p.add_argument("--out", required=True, help="folder for runs and the results table")
    p.add_argument("--results-md", default=None, help="also write the markdown table here (e.g. docs/results.md)")
    p.add_argument("--max-steps", type=int_at_least(1), default=None)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--reevaluate", action="store_true",
                   help="score the stored fold checkpoints again with the current predictors (no retraining)")
    p.add_argument("--results-root", default=None,
                   help="build the table from every result under this folder (e.g. the parent of one --out per seed)")
    p.add_argument("--table-key", default=None, help="name of the data set's table block in --results-md (e.g. her2st)")


def _run_loso(args: argparse.Namespace) -> int:
    from .engine.loso import run_loso
    from .engine.loso_table import results_markdown

    arms = None
    if args.arms and args.arms.strip().lower() != "all":
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    res = run_loso(args.data, args.out, samples=args.sample, config=args.config, arms=arms, max_steps=args.max_steps,
                   seed=args.seed, device=args.device, results_md=args.results_md, results_root=args.results_root,
                   table_key=args.table_key, reevaluate=args.reevaluate)
    print(results_markdown(res["results"], res["meta"]))
    return 0


# --------------------------------------------------------------------------- view
def _add_view(sub) -> None:
    p = sub.add_parser("view", help="open napari with the slide and the Predict widget docked")
    add_sample_args(p, path_required=False)
    p.add_argument("--gene", default=None, help="gene to show (symbol or feature id)")
    p.add_argument("--checkpoint", default=None, metavar="NAME|PATH", help=CHECKPOINT_HELP)
    p.add_argument("--mode", choices=PREDICT_MODES, default=Default.PREDICT_MODE,
                   help=f"predictor (default {Default.PREDICT_MODE}, the best on held-out sections; see docs/results.md)")
    p.add_argument("--device", default="auto")
    p.add_argument("--screenshot", default=None, help="predict, render, save this PNG and exit")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="encoder batch size (default: per device)")
    p.add_argument("--canvas-only", action="store_true", help="screenshot only the canvas, not the whole window")
    p.add_argument("--size", default="1400x900", help="window size WIDTHxHEIGHT in pixels (default 1400x900)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --screenshot file")


def _run_view(args: argparse.Namespace) -> int:
    from ._widgets._view import view

    return view(args.path, sample=args.sample, slide=args.slide, pitch_um=args.pitch_um, mpp=args.mpp, gene=args.gene,
                checkpoint=args.checkpoint, mode=args.mode, device=args.device, screenshot=args.screenshot,
                batch_size=args.batch_size, canvas_only=args.canvas_only, size=args.size, overwrite=args.overwrite)


# --------------------------------------------------------------------------- checkpoints
def _add_checkpoints(sub) -> None:
    p = sub.add_parser("checkpoints", help="list the bundled checkpoints (names for --checkpoint) and their "
                       "held-out evaluation")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects (name, path, data, n_genes, "
                   "recipe, species, default, evaluation, ...)")


def _run_checkpoints(args: argparse.Namespace) -> int:
    from .model.catalogue import format_table, list_bundled

    records = list_bundled()
    print(json.dumps(records, default=str) if args.json else format_table(records))
    return 0


# --------------------------------------------------------------------------- main
_COMMANDS = {
    "inspect": (_add_inspect, _run_inspect),
    "predict": (_add_predict, _run_predict),
    "pretrain": (_add_pretrain, _run_pretrain),
    "presets": (_add_presets, _run_presets),
    "evaluate": (_add_evaluate, _run_evaluate),
    "benchmark-loso": (_add_loso, _run_loso),
    "view": (_add_view, _run_view),
    "checkpoints": (_add_checkpoints, _run_checkpoints),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comtip",
        description="CoMTIP: predict spatial gene expression from H&E slides.",
    )
    parser.add_argument("--version", action="version", version=f"napari-comtip {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not args.debug:
        one_line_warnings()
    return run_guarded(_COMMANDS[args.command][1], args, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["main", "build_parser"]
