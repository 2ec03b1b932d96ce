"""Leave-one-section-out (LOSO) benchmark with the ablation arms of the paper's claim.

For each section S of the dataset: the gene panel is chosen from the other sections (the panel
rule of :mod:`engine.data`), each arm is pretrained on them with the same seed and step budget,
and the held-out S is predicted through :func:`engine.predict.predict_sample` (the path users
run) with each predictor (retrieval over the fold's own training spots, the ridge probe fitted
on them, zero-shot) and scored with :mod:`engine.evaluation` (protocol A of peers.md).

Arms (``--arms``, comma-separated; ``all`` = every one; listed in ``engine/loso_arms.py``):

========================  ==================================================================
``ridge``                 colour-texture features + ridge (non-learned floor, engine/baselines)
``untrained``             the config's architecture with its seeded random weights, no training
                          step, bank and probe fitted as for every arm (control)
``comtip``                names + values, MFM, PAAT, unlabelled tissue patches for MFM
``comtip-nomfm``          without MFM;  ``comtip-nopaat`` without PAAT; ``comtip-nomfm-nopaat``
``comtip-nounlab``        MFM on the spot patches only (no vision-only tissue batches)
``names`` / ``names-nomfm``            OmiCLIP-style: top expressed gene names, no values (no PAAT)
``values`` / ``values-nomfm`` / ``values-nopaat`` / ``values-nomfm-nopaat``  BLEEP-style
========================  ==================================================================

Predictors scored for each learned arm (``LEARNED_MODES``): ``retrieval``; ``probe-raw`` (ridge on
the spot's own pooled features, the rule before spatial context); ``probe`` (the checkpoint's stored
probe, in the recipe's ``training.probe_context``, engine/context.py); ``floor+probe`` (the probe
rule on the floor's features and the encoder's side by side: the ``floor+comtip`` control);
``zero-shot-raw`` (zero-shot on each spot's own image embedding) and ``zero-shot`` (the user's
predictor: the embedding in its neighbourhood, ``Default.ZERO_SHOT_CONTEXT``). The floor arm
reports ``ridge`` (its own features) and ``ridge-ctx`` (the same
features in the probe's context).

Every (arm, section) result is written to ``<out>/<arm>/<section>/result.json`` as soon as it
is done; a rerun skips finished ones, so the benchmark can be resumed, extended with more arms
or run arm by arm in parallel jobs. The markdown table is rebuilt from all results present.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..constants import PREDICT_MODES
from ..errors import ConfigError, InputError
from .loso_arms import ARMS, LEARNED_MODES, arm_overrides, is_untrained
from .loso_table import RESULT_FILE
from .run_config import with_overrides

RIDGE_PATCH_PX = 224  # the floor's features are computed on 224 px patches, as in peers.md


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # pragma: no cover - not a git checkout
        return "unknown"


def _write_json(path: Path, obj) -> None:
    from .run_folder import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


# --------------------------------------------------------------------------- one fold
def _floor_features(samples, cfg) -> list[np.ndarray]:
    from .baselines import colour_texture_features
    from .patch_cache import PatchCache

    cache = PatchCache()
    return [colour_texture_features(cache.spots(s, cfg.model.patch_um, RIDGE_PATCH_PX)) for s in samples]


def _panel_expr(samples, panel) -> np.ndarray:
    from .data import panel_matrix

    return np.concatenate([panel_matrix(s.expression[[str(i) for i in s.spots.index]], panel, s.name) for s in samples])


def _score(pred: np.ndarray, test_sample, panel, mode: str, unc: np.ndarray | None = None, **extra) -> dict[str, Any]:
    from .evaluation import metrics_from_arrays, uncertainty_error_spearman

    true = _true_panel(test_sample, panel)
    m = metrics_from_arrays(pred[:, true["cols"]], true["X"], true["genes"])
    if unc is not None:
        r = uncertainty_error_spearman(pred[:, true["cols"]], unc[:, true["cols"]], true["X"])
        m.update(unc_spearman=r["per_gene"], unc_spearman_pooled=r["pooled"])
    m.update(mode=mode, **extra)
    return m


def _centres_groups(samples) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([s.centers_rc() for s in samples]),
            np.concatenate([np.full(s.n_spots, i) for i, s in enumerate(samples)]))


def _ctx_stack(feats: Sequence[np.ndarray], samples, context: str) -> list[np.ndarray]:
    from .context import context_features

    return [context_features(f, s.centers_rc(), context) for f, s in zip(feats, samples)]


def run_ridge_fold(train_samples, test_sample, panel: Sequence[str], cfg) -> dict[str, Any]:
    """The colour-texture ridge floor on one fold (same panel as the learned arms): ``ridge`` on the
    spot's own features (the fixed floor of peers.md) and ``ridge-ctx`` on the same features in the
    probe's spatial context (engine/context.py), so the table shows what the context alone adds."""
    from . import predictors
    from .baselines import RidgeFloor
    from .context import fit_context_probe

    t0 = time.time()
    ftr, fte = _floor_features(train_samples, cfg), _floor_features([test_sample], cfg)[0]
    Y = _panel_expr(train_samples, panel)
    out: dict[str, Any] = {"modes": {}}
    model = RidgeFloor().fit(np.concatenate(ftr), Y)
    pred, unc = model.predict(fte, return_std=True)
    out["modes"]["ridge"] = _score(pred, test_sample, panel, "ridge", unc, alpha=model.alpha_, context="none",
                                   seconds=time.time() - t0)
    t1 = time.time()
    ctx = cfg.training.probe_context
    centres, groups = _centres_groups(train_samples)
    probe = fit_context_probe(np.concatenate(_ctx_stack(ftr, train_samples, ctx)), Y, ctx, centres, groups)
    pred, unc = predictors.probe_predict(probe, _ctx_stack([fte], [test_sample], ctx)[0], return_std=True)
    out["modes"]["ridge-ctx"] = _score(pred, test_sample, panel, "ridge-ctx", unc, alpha=probe.alpha, context=ctx,
                                       seconds=time.time() - t1)
    out["train_seconds"] = time.time() - t0
    return out


def _true_panel(sample, panel):
    from .data import lognorm_matrix

    ad = sample.expression[[str(i) for i in sample.spots.index]]
    col = {g: i for i, g in enumerate(map(str, ad.var_names))}
    genes = [g for g in panel if g in col]
    ln = lognorm_matrix(ad.copy())
    return {"X": ln[:, [col[g] for g in genes]], "genes": genes, "cols": [i for i, g in enumerate(panel) if g in col]}


def save_untrained(cfg, ts, path: Path, *, device="auto", samples=None) -> Path:
    """The ``untrained`` control: the recipe's architecture with its seeded random initialisation
    (no training step), with the bank and probe fitted on the fold's training spots exactly as
    after training. The same probe rule and context as every learned arm."""
    import torch

    from ..model.factory import build_model
    from .device import resolve_device
    from .bank_probe import build_bank_and_probe, panel_rule_text, save_final

    dev = resolve_device(device)
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model, ts.panel).to(dev)
    if model.text.encodes_values:  # zero-shot's readout as training would leave it, without the step:
        # each gene's value range over the training spots and the calibration line to lognorm
        expr = torch.from_numpy(np.asarray(ts.expr, np.float32)).to(dev)
        gi = torch.arange(expr.shape[1], device=dev).expand(expr.shape[0], -1)
        model.observe_values(gi, model.text_values(expr), torch.ones_like(gi, dtype=torch.bool))
        model.calibrate_values(ts.expr)
    extras = build_bank_and_probe(model, ts, dev, cfg, samples=samples)
    extras["training"] = {"steps": 0, "total_steps": 0, "samples": list(ts.names), "n_spots": ts.n_spots,
                          "zero_shot_readout": "value range and calibration line from the training spots",
                          "run_config": cfg.to_dict(), "panel_rule": panel_rule_text(cfg.data),
                          "selection_rule": "untrained control: random initialisation, seed " + str(cfg.training.seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_final(path, model, ts.panel, extras, fp16=cfg.training.fp16_final)
    return path


def _floor_plus_probe(ckpt, train_samples, test_sample, panel, cfg, device) -> dict[str, Any]:
    """``floor+probe``: the probe rule on the floor's colour-texture features and the encoder's pooled
    features side by side (each in the probe's context; the probe standardises every column),
    fitted on the fold's training spots."""
    from ..model.checkpoint import load_checkpoint
    from . import predictors
    from .context import fit_context_probe
    from .inference import embed_sample

    t0 = time.time()
    model = load_checkpoint(ckpt).model
    ctx = cfg.training.probe_context

    def feats(samples):
        return [np.asarray(embed_sample(s, model, device=device, features=True).features, np.float32) for s in samples]

    def both(fl, en, samples):
        return [np.hstack([a, b]) for a, b in zip(_ctx_stack(fl, samples, ctx), _ctx_stack(en, samples, ctx))]

    X = np.concatenate(both(_floor_features(train_samples, cfg), feats(train_samples), train_samples))
    centres, groups = _centres_groups(train_samples)
    probe = fit_context_probe(X, _panel_expr(train_samples, panel), ctx, centres, groups)
    xt = both(_floor_features([test_sample], cfg), feats([test_sample]), [test_sample])[0]
    pred, unc = predictors.probe_predict(probe, xt, return_std=True)
    return _score(pred, test_sample, panel, "floor+probe", unc, alpha=probe.alpha, context=ctx, seconds=time.time() - t0)


def evaluate_fold(arm: str, cfg, ckpt: Path, train_samples, test_sample, panel, *, device="auto",
                  modes: Sequence[str] = PREDICT_MODES) -> dict[str, dict[str, Any]]:
    """Every predictor of a learned (or untrained) arm on the held-out section, through the user path."""
    from .evaluation import evaluate_predictions
    from .predict import predict_sample

    out: dict[str, dict[str, Any]] = {}
    # zero-shot is undefined for names-only text, and meaningless for an untrained control saved
    # without zero-shot's readout (value ranges and calibration; before 2026-12-07e)
    if cfg.model.text.mode == "names" or (is_untrained(arm) and not _has_zero_shot_readout(ckpt)):
        modes = [m for m in modes if not m.startswith("zero-shot")]
    for mode in modes:
        t1 = time.time()
        if mode == "floor+probe":
            out[mode] = _floor_plus_probe(ckpt, train_samples, test_sample, panel, cfg, device)
            continue
        # the "-raw" variants: the user's predictor on the spot alone (a probe fitted here without context)
        user_mode, kw = {"probe-raw": ("probe", {"reference": train_samples, "context": "none"}),
                         "zero-shot-raw": ("zero-shot", {"context": "none"})}.get(mode, (mode, {}))
        pred = predict_sample(test_sample, checkpoint=str(ckpt), mode=user_mode, device=device, **kw)
        m = evaluate_predictions(pred, test_sample.expression)
        m.update(mode=mode, seconds=time.time() - t1)
        if "uncertainty" in pred.layers:
            r = _unc_spearman(pred, test_sample)
            m.update(unc_spearman=r["per_gene"], unc_spearman_pooled=r["pooled"])
        out[mode] = m
    return out


def _has_zero_shot_readout(ckpt: Path) -> bool:
    from ..model.checkpoint import read_checkpoint

    prov = read_checkpoint(ckpt, mmap=True).get("provenance") or {}  # metadata only: tensors mapped, not read
    return bool(prov.get("zero_shot_readout"))


def _unc_spearman(pred, test_sample) -> dict[str, float]:
    """Rank correlation of the predictor's uncertainty with its absolute error
    (:func:`engine.evaluation.uncertainty_error_spearman`: ``per_gene`` over HEG-50, and ``pooled``)."""
    from .evaluation import uncertainty_error_spearman

    genes = [str(g) for g in pred.var_names]
    true = _true_panel(test_sample, genes)
    cols = true["cols"]
    return uncertainty_error_spearman(np.asarray(pred.X)[:, cols], np.asarray(pred.layers["uncertainty"])[:, cols], true["X"])


def run_model_fold(arm: str, cfg, fold_dir: Path, train_ts, train_samples, test_sample, *, max_steps=None,
                   device="auto", modes: Sequence[str] = PREDICT_MODES) -> dict[str, Any]:
    """Pretrain one arm on a fold's training set (or reuse its checkpoint) and evaluate the held-out section."""
    from .run_folder import read_metrics
    from .training import pretrain

    t0 = time.time()
    ckpt = fold_dir / "run" / "model.pt"
    train_s = None
    if not ckpt.exists():
        if is_untrained(arm):
            save_untrained(cfg, train_ts, ckpt, device=device, samples=train_samples)
        else:
            ckpt = pretrain(cfg, [], fold_dir / "run", overwrite=True, max_steps=max_steps, device=device,
                            training_set=train_ts, training_samples=train_samples)
        train_s = time.time() - t0
    elif (fold_dir / "run" / "metrics.csv").exists():
        rows = read_metrics(fold_dir / "run" / "metrics.csv")
        train_s = rows[-1]["elapsed_s"] if rows else None
    return {"modes": evaluate_fold(arm, cfg, ckpt, train_samples, test_sample, train_ts.panel, device=device, modes=modes),
            "train_seconds": train_s, "checkpoint": str(ckpt)}


# --------------------------------------------------------------------------- benchmark
def run_loso(data: str, out: str | os.PathLike, *, samples: Sequence[str] | None = None, config=None,
             arms: Sequence[str] | None = None, max_steps: int | None = None, seed: int = 0, device: str = "auto",
             results_md: str | os.PathLike | None = None, results_root: str | os.PathLike | None = None,
             table_key: str | None = None, reevaluate: bool = False, progress=None) -> dict[str, Any]:
    """Leave-one-section-out over the sections of ``data`` (see the module docstring).

    ``reevaluate``: score the stored fold checkpoints again with the current predictors (their
    stored probe re-fitted with the current rule first) instead of skipping finished folds.
    ``results_root``: build the table from every result under this folder (e.g. the parent of
    one folder per seed); ``table_key``: the data set's block in ``results_md``.
    """
    from ..io import list_samples, load_sample
    from .data import build_training_set
    from .loso_table import collect_results, write_results_md
    from .bank_probe import refit_probe
    from .run_config import load_run_config

    out = Path(out)
    from ..io.writers import check_writable

    check_writable(out, what="benchmark folder", create=True)  # before any training (nothing made yet)
    if results_md:
        check_writable(Path(results_md).expanduser().parent, what="folder of --results-md")
    out.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None and not isinstance(config, (str, os.PathLike)) else (
        load_run_config(config) if config else load_run_config(None, preset="loso"))  # the packaged preset
    cfg = with_overrides(cfg, {"training.seed": seed})
    names = list(samples) if samples else list_samples(data)
    if len(names) < 2:
        raise InputError(f"leave-one-section-out needs at least 2 sections, found {len(names)}", path=data)
    arms = list(arms) if arms else list(ARMS)
    for a in arms:  # every held-out section's pixels stay unseen: no arm reads the benchmark's slides as tissue
        for p in with_overrides(cfg, arm_overrides(a)).data.tissue_only:
            if Path(p).expanduser().resolve() == Path(data).expanduser().resolve():
                raise ConfigError(f"arm {a!r}: data.tissue_only names the benchmark's own data {data}, so each "
                                  "held-out section's tissue would be trained on", hint="name other slides in data.tissue_only")
    loaded = {n: load_sample(data, sample=n) for n in names}
    meta = {"data": str(data), "sections": names, "arms": arms, "max_steps": max_steps, "seed": seed,
            "config": cfg.to_dict(), "commit": _git_commit(), "host": platform.node(),
            "cpu_threads": os.cpu_count()}
    _write_json(out / "benchmark.json", meta)
    root = Path(results_root) if results_root else out

    def table():
        if results_md:
            write_results_md(collect_results(root), results_md, meta, key=table_key)

    done = 0
    for held in names:
        train = [loaded[n] for n in names if n != held]
        ts_cache: dict[tuple, Any] = {}
        for arm in arms:
            fold_dir = out / arm / held
            old = None
            if (fold_dir / RESULT_FILE).exists():
                if not reevaluate:
                    continue
                old = json.loads((fold_dir / RESULT_FILE).read_text())
            t0 = time.time()
            arm_cfg = with_overrides(cfg, arm_overrides(arm))
            key = (arm_cfg.model.patch_um, arm_cfg.model.vision.img_size, json.dumps(arm_cfg.data.to_dict(), sort_keys=True))
            if key not in ts_cache:
                ts_cache[key] = build_training_set(train, arm_cfg.data, patch_um=arm_cfg.model.patch_um,
                                                   img_size=arm_cfg.model.vision.img_size, seed=seed)
            ts = ts_cache[key]
            if arm == "ridge":
                res = run_ridge_fold(train, loaded[held], ts.panel, arm_cfg)
            else:
                ckpt = fold_dir / "run" / "model.pt"
                if old is not None and ckpt.exists():
                    refit_probe(ckpt, train, device=device, context=arm_cfg.training.probe_context,
                                note={"why": "benchmark-loso --reevaluate"})
                res = run_model_fold(arm, arm_cfg, fold_dir, ts, train, loaded[held], max_steps=max_steps,
                                     device=device, modes=LEARNED_MODES)
            if old is not None:
                res["train_seconds"] = old.get("train_seconds", res.get("train_seconds"))
                res["previous_modes"] = old.get("modes")
            res.update(arm=arm, held_out=held, train_sections=[s.name for s in train], n_panel=len(ts.panel),
                       n_train_spots=ts.n_spots, total_seconds=time.time() - t0, commit=meta["commit"],
                       overrides=arm_overrides(arm), max_steps=max_steps, seed=seed, data=str(data))
            _write_json(fold_dir / RESULT_FILE, res)
            done += 1
            table()
            if progress is not None:
                progress(done, len(arms) * len(names), f"{arm} {held}")
    table()
    return {"results": collect_results(root), "meta": meta}


__all__ = ["run_loso", "run_ridge_fold", "run_model_fold", "evaluate_fold", "save_untrained"]
