"""The LOSO benchmark's tables: results collected from ``result.json`` files, means per arm and
predictor over sections and seeds, per-section and per-seed breakdowns, and the generated block
of ``docs/results.md`` (one block per data set, between its markers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .loso_arms import ARMS, MODE_ORDER

RESULT_FILE = "result.json"
METRICS = ("pcc_all", "pcc_heg50", "pcc_hvg50", "mse", "mae")


def collect_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``out`` (any depth: one sub-folder per seed is fine)."""
    res = []
    for p in sorted(Path(out).rglob(RESULT_FILE)):
        try:
            res.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return res


def _fmt(x, nd=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _arm_order():
    return {a: i for i, a in enumerate(ARMS)}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (arm, mode): metrics per (section, seed), per section (mean over seeds) and overall."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        seed = int(r.get("seed", 0))
        for mode, m in r["modes"].items():
            row = rows.setdefault((r["arm"], mode), {"arm": r["arm"], "mode": mode, "runs": {}, "train_s": {}})
            row["runs"][(r["held_out"], seed)] = m
            row["train_s"].setdefault(r["held_out"], []).append(r.get("train_seconds"))
    out = []
    for (arm, mode), row in rows.items():
        sections = sorted({s for s, _ in row["runs"]})
        row["seeds"] = sorted({k for _, k in row["runs"]})
        row["sections"] = {}
        for s in sections:
            ms = [m for (s2, _), m in row["runs"].items() if s2 == s]
            row["sections"][s] = {k: float(np.mean([m[k] for m in ms if k in m] or [np.nan])) for k in METRICS + ("unc_spearman",)}
            row["sections"][s]["n_seeds"] = len(ms)
        for k in METRICS + ("unc_spearman",):
            row[k] = float(np.nanmean([v[k] for v in row["sections"].values()])) if any(
                np.isfinite(v[k]) for v in row["sections"].values()) else float("nan")
        row["n_sections"] = len(sections)
        out.append(row)
    order = _arm_order()
    morder = {m: i for i, m in enumerate(MODE_ORDER)}
    out.sort(key=lambda r: (order.get(r["arm"], 99), morder.get(r["mode"], 9)))
    return out


def results_markdown(results: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    rows = summarise(results)
    sections = sorted({r["held_out"] for r in results})
    seeds = sorted({int(r.get("seed", 0)) for r in results})
    lines = ["| arm | predictor | seeds | sections | PCC all | PCC HEG-50 | PCC HVG-50 | MSE | MAE | unc. rho |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['mode']} | {len(r['seeds'])} | {r['n_sections']} | {_fmt(r['pcc_all'])} | "
                     f"{_fmt(r['pcc_heg50'])} | {_fmt(r['pcc_hvg50'])} | {_fmt(r['mse'])} | {_fmt(r['mae'])} | "
                     f"{_fmt(r['unc_spearman'], 2)} |")
    lines += ["", "Per held-out section, mean over seeds (PCC all / HEG-50 / HVG-50; minutes of training per run):", "",
              "| arm | predictor | " + " | ".join(sections) + " |", "|---|---|" + "---|" * len(sections)]
    for r in rows:
        cells = []
        for s in sections:
            m = r["sections"].get(s)
            if m is None:
                cells.append("not run")
                continue
            t = [x for x in r["train_s"].get(s, []) if x]
            tt = f"; {np.mean(t) / 60:.1f} min" if t else ""
            cells.append(f"{_fmt(m['pcc_all'])} / {_fmt(m['pcc_heg50'])} / {_fmt(m['pcc_hvg50'])}{tt}")
        lines.append(f"| {r['arm']} | {r['mode']} | " + " | ".join(cells) + " |")
    if len(seeds) > 1:
        lines += ["", "Per seed and section (PCC HEG-50 / HVG-50):", "",
                  "| arm | predictor | seed | " + " | ".join(sections) + " |", "|---|---|---|" + "---|" * len(sections)]
        for r in rows:
            for k in r["seeds"]:
                cells = []
                for s in sections:
                    m = r["runs"].get((s, k))
                    cells.append("not run" if m is None else f"{_fmt(m['pcc_heg50'])} / {_fmt(m['pcc_hvg50'])}")
                lines.append(f"| {r['arm']} | {r['mode']} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markers(key: str | None = None) -> tuple[str, str]:
    """The begin/end markers of a generated block (``key`` names the data set; None = the legacy block)."""
    tag = "loso-table" if not key else f"loso-table:{key}"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


BEGIN, END = markers()


def write_results_md(results, path, meta=None, key: str | None = None) -> None:
    """Replace the generated block ``key`` of ``path`` (or append it; create the file if needed)."""
    from ..io.writers import atomic_replace

    path = Path(path)
    begin, end = markers(key)
    block = f"{begin}\n{results_markdown(results, meta)}{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            a = text.index(begin)
            b = text.index(end) + len(end)
            text = text[:a] + block + text[b:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Results\n\n" + block + "\n"
    atomic_replace(path, lambda tmp: Path(tmp).write_text(text))


__all__ = ["RESULT_FILE", "MODE_ORDER", "collect_results", "summarise", "results_markdown", "markers", "write_results_md",
           "BEGIN", "END"]
