"""The run folder of a pretraining run (``comtip pretrain --out``) and its files; written by rank 0 only.

* ``config.yaml`` -- the resolved config (model + data + training sections, after ``--set``);
* ``metrics.csv`` -- one row per optimizer step, stable columns :data:`METRIC_COLUMNS`;
* ``checkpoints/step-NNNNNNN.pt`` -- resumable training state (model, optimizer, scheduler,
  step, epoch, data position, RNG states), written atomically every
  ``training.checkpoint_every`` steps; the newest ``training.keep_checkpoints`` are kept;
* ``model.pt`` -- the final model with its retrieval bank and probe (``engine/bank_probe.py``).

Nothing else in the folder is ever touched: ``--overwrite`` removes only these.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import InputError, TrainingError

#: Columns of ``metrics.csv`` (stable: the pretrain widget parses them). ``img_emb_std`` is the
#: mean over dimensions of the per-dimension standard deviation of the batch's L2-normalised
#: image embeddings (collapse watch: it falls towards 0 when all images map to one point);
#: ``i2t_acc`` is the fraction of the batch's images whose best-scoring text is their own;
#: ``profile``, ``grid``, ``text_ssl`` and ``image_ssl`` are the (unweighted) profile, value-grid,
#: expression-only and image self-distillation terms, 0 when off.
METRIC_COLUMNS = (
    "step", "epoch", "loss", "infonce", "mfm", "paat", "lr", "samples_per_s", "elapsed_s", "img_emb_std", "i2t_acc",
    "profile", "grid", "text_ssl", "image_ssl",
)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
CKPT_DIR = "checkpoints"
FINAL_FILE = "model.pt"
STATE_FORMAT = "comtip-train-state"
STATE_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")


# --------------------------------------------------------------------------- atomic writes
def atomic_write_text(path: Path, text: str) -> None:
    from ..io.writers import atomic_replace

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj, path: Path) -> None:
    from ..io.writers import atomic_replace

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------- the folder
def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every resumable state in the run folder, oldest first."""
    d = Path(out_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_run_folder(out: Path) -> bool:
    out = Path(out)
    return out.is_dir() and any((out / n).exists() for n in (CONFIG_FILE, METRICS_FILE, CKPT_DIR, FINAL_FILE))


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that cannot be used as asked (read-only check, before loading data)."""
    out = Path(out)
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other", path=out, hint="choose one")
    if out.exists() and not out.is_dir():
        raise InputError("the output path exists and is not a folder", path=out, hint="choose a new --out folder")
    if resume and not list_checkpoints(out):
        raise InputError("nothing to resume: no checkpoint in this run folder", path=out,
                         hint="start a new run without --resume")
    if not resume and not overwrite and is_run_folder(out):
        raise InputError("the output folder already holds a training run", path=out,
                         hint="pass --resume to continue it, --overwrite to replace it, or choose another --out")
    from ..io.writers import check_writable

    check_writable(out, what="run folder", create=True)  # a real probe: read-only or full shows now, not after the work


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """:func:`check_out_dir`, then (``overwrite``) remove what an earlier run wrote, and create the folder."""
    out = Path(out)
    check_out_dir(out, resume, overwrite)
    if resume:
        return
    if is_run_folder(out):  # overwrite: remove only what a run writes; never anything else in the folder
        for n in (CONFIG_FILE, METRICS_FILE, FINAL_FILE):
            if (out / n).exists():
                (out / n).unlink()
        if (out / CKPT_DIR).is_dir():
            shutil.rmtree(out / CKPT_DIR)
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- training state
def write_state(out: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step-NNNNNNN.pt`` atomically and drop all but the newest ``keep``."""
    path = Path(out) / CKPT_DIR / f"step-{step:07d}.pt"
    atomic_torch_save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, path)
    for _, old in list_checkpoints(out)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_latest_state(out: Path) -> dict:
    """The newest readable training state of the run folder (a damaged file falls back to the one before)."""
    for _, p in reversed(list_checkpoints(out)):
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged file: fall back to the previous one
            continue
    raise TrainingError("no readable checkpoint to resume from", path=Path(out) / CKPT_DIR,
                        hint="start a new run with --overwrite")


# --------------------------------------------------------------------------- metrics.csv
def init_metrics(path: Path, keep_until: int | None) -> None:
    """Start ``metrics.csv`` (or, on resume, drop rows after the resumed step)."""
    header = ",".join(METRIC_COLUMNS) + "\n"
    if keep_until is None or not path.exists():
        atomic_write_text(path, header)
        return
    rows = [header]
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                if int(r["step"]) <= keep_until:
                    rows.append(",".join(r.get(c, "") or "" for c in METRIC_COLUMNS) + "\n")
            except (KeyError, ValueError):
                continue
    atomic_write_text(path, "".join(rows))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def append_metrics(path: Path, m: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(",".join(_fmt(m[c]) for c in METRIC_COLUMNS) + "\n")
            f.flush()
    except OSError as exc:  # a full disk: one line naming the file (the CLI prints it)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as dicts of floats (empty cells -> NaN)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else float("nan")) for k, v in r.items()})
    return rows


__all__ = ["METRIC_COLUMNS", "CONFIG_FILE", "METRICS_FILE", "CKPT_DIR", "FINAL_FILE", "atomic_write_text",
           "atomic_torch_save", "list_checkpoints", "is_run_folder", "check_out_dir", "prepare_out", "write_state",
           "load_latest_state", "init_metrics", "append_metrics", "read_metrics"]
