"""Leave-one-section-out (LOSO) benchmark with the ablation arms of the paper's claim.

For each section S of the dataset: the gene panel is chosen from the other sections (the panel
rule of :mod:`engine.data`), each arm is pretrained on them with the same seed and step budget,
and the held-out S is predicted through :func:`engine.predict.predict_sample` (the path users
run) with each predictor (retrieval over the fold's own training spots, the ridge probe fitted
on them, zero-shot) and scored with :mod:`engine.evaluation` (protocol A of peers.md).

Arms (``--arms``, comma-separated; ``all`` = every one):

========================  ==================================================================
``ridge``                 colour-texture features + ridge (non-learned floor, engine/baselines)
``comtip``                names + values, MFM, PAAT, unlabelled tissue patches for MFM
``comtip-nomfm``          without MFM;  ``comtip-nopaat`` without PAAT; ``comtip-nomfm-nopaat``
``comtip-nounlab``        MFM on the spot patches only (no vision-only tissue batches)
``names`` / ``names-nomfm``            OmiCLIP-style: top expressed gene names, no values (no PAAT)
``values`` / ``values-nomfm`` / ``values-nopaat`` / ``values-nomfm-nopaat``  BLEEP-style
========================  ==================================================================

Every (arm, section) result is written to ``<out>/<arm>/<section>/result.json`` as soon as it
is done; a rerun skips finished ones, so the benchmark can be resumed, extended with more arms
or run arm by arm in parallel jobs. The markdown table is rebuilt from all results present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, InputError

ARMS: dict[str, dict[str, Any]] = {
    "ridge": {},
    "comtip": {},
    "comtip-nomfm": {"model.w_mfm": 0.0},
    "comtip-nopaat": {"model.w_paat": 0.0},
    "comtip-nomfm-nopaat": {"model.w_mfm": 0.0, "model.w_paat": 0.0},
    "comtip-nounlab": {"data.unlabelled": False},
    "names": {"model.text.mode": "names"},
    "names-nomfm": {"model.text.mode": "names", "model.w_mfm": 0.0},
    "values": {"model.text.mode": "values"},
    "values-nomfm": {"model.text.mode": "values", "model.w_mfm": 0.0},
    "values-nopaat": {"model.text.mode": "values", "model.w_paat": 0.0},
    "values-nomfm-nopaat": {"model.text.mode": "values", "model.w_mfm": 0.0, "model.w_paat": 0.0},
}
ARM_TEXT = {
    "ridge": "colour-texture features + ridge (floor)",
    "comtip": "CoMTIP: names+values, MFM, PAAT",
    "comtip-nomfm": "names+values, PAAT, no MFM",
    "comtip-nopaat": "names+values, MFM, no PAAT",
    "comtip-nomfm-nopaat": "names+values, no MFM, no PAAT",
    "comtip-nounlab": "CoMTIP, MFM without unlabelled tissue patches",
    "names": "names only (OmiCLIP-style), MFM",
    "names-nomfm": "names only, no MFM",
    "values": "values only (BLEEP-style), MFM, PAAT",
    "values-nomfm": "values only, PAAT, no MFM",
    "values-nopaat": "values only, MFM, no PAAT",
    "values-nomfm-nopaat": "values only, no MFM, no PAAT",
}
MODES = ("retrieval", "probe", "zero-shot")
RIDGE_PATCH_PX = 224  # the floor's features are computed on 224 px patches, as in peers.md
RESULT_FILE = "result.json"


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # pragma: no cover - not a git checkout
        return "unknown"


def _write_json(path: Path, obj) -> None:
    from .training import _atomic_write_text

    _atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def arm_overrides(arm: str) -> dict[str, Any]:
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}", hint=f"choose from {', '.join(ARMS)}")
    return dict(ARMS[arm])


def _apply_overrides(cfg, over: dict[str, Any]):
    """A copy of a RunConfig with dotted overrides (``model.w_mfm``, ``data.unlabelled``)."""
    from .training import run_config_from_dict

    d = cfg.to_dict()
    for key, value in over.items():
        cur = d
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return run_config_from_dict(d, path=cfg.source)


# --------------------------------------------------------------------------- one fold
def run_ridge_fold(train_samples, test_sample, panel: Sequence[str], cfg) -> dict[str, Any]:
    """The colour-texture ridge floor on one fold (same panel as the learned arms)."""
    from .baselines import RidgeFloor, colour_texture_features
    from .data import PatchCache, panel_matrix
    from .evaluation import metrics_from_arrays

    t0 = time.time()
    cache = PatchCache()
    X, Y = [], []
    for s in train_samples:
        X.append(colour_texture_features(cache.spots(s, cfg.model.patch_um, RIDGE_PATCH_PX)))
        Y.append(panel_matrix(s.expression[[str(i) for i in s.spots.index]], panel, s.name))
    model = RidgeFloor().fit(np.concatenate(X), np.concatenate(Y))
    Xt = colour_texture_features(cache.spots(test_sample, cfg.model.patch_um, RIDGE_PATCH_PX))
    pred = model.predict(Xt)
    true = _true_panel(test_sample, panel)
    m = metrics_from_arrays(pred[:, true["cols"]], true["X"], true["genes"])
    m.update(mode="ridge", alpha=model.alpha_, seconds=time.time() - t0)
    return {"modes": {"ridge": m}, "train_seconds": time.time() - t0}


def _true_panel(sample, panel):
    from .data import lognorm_matrix

    ad = sample.expression[[str(i) for i in sample.spots.index]]
    col = {g: i for i, g in enumerate(map(str, ad.var_names))}
    genes = [g for g in panel if g in col]
    ln = lognorm_matrix(ad.copy())
    return {"X": ln[:, [col[g] for g in genes]], "genes": genes, "cols": [i for i, g in enumerate(panel) if g in col]}


def run_model_fold(arm: str, cfg, fold_dir: Path, train_ts, test_sample, *, max_steps=None, device="auto",
                   modes: Sequence[str] = MODES) -> dict[str, Any]:
    """Pretrain one arm on a fold's training set and evaluate the held-out section."""
    from .evaluation import evaluate_predictions
    from .predict import predict_sample
    from .training import pretrain

    t0 = time.time()
    ckpt = fold_dir / "run" / "model.pt"
    if ckpt.exists():
        train_s = None
    else:
        ckpt = pretrain(cfg, [], fold_dir / "run", overwrite=True, max_steps=max_steps, device=device,
                        training_set=train_ts)
        train_s = time.time() - t0
    out: dict[str, Any] = {"modes": {}, "train_seconds": train_s, "checkpoint": str(ckpt)}
    if train_s is None and (fold_dir / "run" / "metrics.csv").exists():
        from .training import read_metrics

        rows = read_metrics(fold_dir / "run" / "metrics.csv")
        out["train_seconds"] = rows[-1]["elapsed_s"] if rows else None
    if cfg.model.text.mode == "names":  # no values in the text branch: zero-shot is undefined
        modes = [m for m in modes if m != "zero-shot"]
    for mode in modes:
        t1 = time.time()
        pred = predict_sample(test_sample, checkpoint=str(ckpt), mode=mode, device=device)
        m = evaluate_predictions(pred, test_sample.expression)
        m.update(mode=mode, seconds=time.time() - t1)
        out["modes"][mode] = m
    return out


# --------------------------------------------------------------------------- benchmark
def run_loso(data: str, out: str | os.PathLike, *, samples: Sequence[str] | None = None, config=None,
             arms: Sequence[str] | None = None, max_steps: int | None = None, seed: int = 0, device: str = "auto",
             results_md: str | os.PathLike | None = None, progress=None) -> dict[str, Any]:
    from ..io import list_samples, load_sample
    from .data import build_training_set
    from .training import load_run_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None and not isinstance(config, (str, os.PathLike)) else load_run_config(
        config or _default_config_path())
    cfg = _apply_overrides(cfg, {"training.seed": seed})
    names = list(samples) if samples else list_samples(data)
    if len(names) < 2:
        raise InputError(f"leave-one-section-out needs at least 2 sections, found {len(names)}", path=data)
    arms = list(arms) if arms else list(ARMS)
    for a in arms:
        arm_overrides(a)
    loaded = {n: load_sample(data, sample=n) for n in names}
    meta = {"data": str(data), "sections": names, "arms": arms, "max_steps": max_steps, "seed": seed,
            "config": cfg.to_dict(), "commit": _git_commit(), "host": platform.node(),
            "cpu_threads": os.cpu_count()}
    _write_json(out / "benchmark.json", meta)
    results = collect_results(out)
    for held in names:
        train = [loaded[n] for n in names if n != held]
        ts_cache: dict[tuple, Any] = {}
        for arm in arms:
            fold_dir = out / arm / held
            if (fold_dir / RESULT_FILE).exists():
                continue
            t0 = time.time()
            arm_cfg = _apply_overrides(cfg, arm_overrides(arm))
            key = (arm_cfg.model.patch_um, arm_cfg.model.vision.img_size, json.dumps(arm_cfg.data.to_dict(), sort_keys=True))
            if key not in ts_cache:
                ts_cache[key] = build_training_set(train, arm_cfg.data, patch_um=arm_cfg.model.patch_um,
                                                   img_size=arm_cfg.model.vision.img_size, seed=seed)
            ts = ts_cache[key]
            if arm == "ridge":
                res = run_ridge_fold(train, loaded[held], ts.panel, arm_cfg)
            else:
                res = run_model_fold(arm, arm_cfg, fold_dir, ts, loaded[held], max_steps=max_steps, device=device)
            res.update(arm=arm, held_out=held, train_sections=[s.name for s in train], n_panel=len(ts.panel),
                       n_train_spots=ts.n_spots, total_seconds=time.time() - t0, commit=meta["commit"],
                       overrides=arm_overrides(arm), max_steps=max_steps, seed=seed)
            _write_json(fold_dir / RESULT_FILE, res)
            results = collect_results(out)
            if results_md:
                write_results_md(results, results_md, meta)
            if progress is not None:
                progress(len(results), len(arms) * len(names), f"{arm} {held}")
    results = collect_results(out)
    if results_md:
        write_results_md(results, results_md, meta)
    return {"results": results, "meta": meta}


def _default_config_path() -> Path:
    root = Path(__file__).resolve().parents[3]
    p = root / "training" / "configs" / "loso.yaml"
    if not p.is_file():
        raise ConfigError("no --config given and training/configs/loso.yaml not found",
                          hint="pass --config training/configs/loso.yaml from a source checkout")
    return p


def collect_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    res = []
    for p in sorted(Path(out).glob(f"*/*/{RESULT_FILE}")):
        try:
            res.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return res


# --------------------------------------------------------------------------- the table
def _fmt(x, nd=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (arm, mode) with per-section metrics and their means."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        for mode, m in r["modes"].items():
            row = rows.setdefault((r["arm"], mode), {"arm": r["arm"], "mode": mode, "sections": {}, "train_s": {}})
            row["sections"][r["held_out"]] = m
            row["train_s"][r["held_out"]] = r.get("train_seconds")
    out = []
    for (arm, mode), row in rows.items():
        secs = row["sections"]
        for k in ("pcc_all", "pcc_heg50", "pcc_hvg50", "mse", "mae"):
            row[k] = float(np.mean([m[k] for m in secs.values()]))
        row["n_sections"] = len(secs)
        out.append(row)
    order = {a: i for i, a in enumerate(ARMS)}
    morder = {"ridge": 0, "retrieval": 1, "probe": 2, "zero-shot": 3}
    out.sort(key=lambda r: (order.get(r["arm"], 99), morder.get(r["mode"], 9)))
    return out


def results_markdown(results: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    rows = summarise(results)
    sections = sorted({r["held_out"] for r in results})
    lines = []
    lines.append("| arm | predictor | sections | PCC all | PCC HEG-50 | PCC HVG-50 | MSE | MAE |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r['arm']} | {r['mode']} | {r['n_sections']} | {_fmt(r['pcc_all'])} | {_fmt(r['pcc_heg50'])} | "
                     f"{_fmt(r['pcc_hvg50'])} | {_fmt(r['mse'])} | {_fmt(r['mae'])} |")
    lines.append("")
    lines.append("Per held-out section (PCC all / HEG-50 / HVG-50; training time of the arm on that fold):")
    lines.append("")
    lines.append("| arm | predictor | " + " | ".join(sections) + " |")
    lines.append("|---|---|" + "---|" * len(sections))
    for r in rows:
        cells = []
        for s in sections:
            m = r["sections"].get(s)
            if m is None:
                cells.append("not run")
                continue
            t = r["train_s"].get(s)
            tt = f"; {t / 60:.1f} min" if t else ""
            cells.append(f"{_fmt(m['pcc_all'])} / {_fmt(m['pcc_heg50'])} / {_fmt(m['pcc_hvg50'])}{tt}")
        lines.append(f"| {r['arm']} | {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BEGIN = "<!-- loso-table:begin -->"
END = "<!-- loso-table:end -->"


def write_results_md(results, path, meta=None) -> None:
    """Replace the generated table between the markers of ``path`` (or create the file)."""
    from .training import _atomic_write_text

    path = Path(path)
    table = results_markdown(results, meta)
    block = f"{BEGIN}\n{table}{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            a = text.index(BEGIN)
            b = text.index(END) + len(END)
            text = text[:a] + block + text[b:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Results\n\n" + block + "\n"
    _atomic_write_text(path, text)


def loso_from_args(args: argparse.Namespace) -> int:
    arms = None
    if args.arms and args.arms.strip().lower() != "all":
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    res = run_loso(args.data, args.out, samples=args.sample, config=args.config, arms=arms,
                   max_steps=args.max_steps, seed=args.seed, device=args.device, results_md=args.results_md)
    print(results_markdown(res["results"], res["meta"]))
    return 0


__all__ = ["ARMS", "run_loso", "loso_from_args", "results_markdown", "write_results_md", "collect_results",
           "summarise", "run_ridge_fold", "run_model_fold"]
