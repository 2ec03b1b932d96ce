"""The list of samples of a cohort prediction: from paths, folders, or a manifest CSV.

A manifest is a CSV with a ``path`` column and optional ``sample``, ``slide``, ``mpp``,
``pitch_um`` and ``out`` columns (one row per sample; relative paths are relative to the
manifest's folder, a relative ``out`` to the output folder). Without a manifest, each path is a
data set (every sample of a multi-sample data set becomes one item), a single slide or file, or a
folder of those. Everything that can be checked without reading a slide is checked here, before
any work: a missing column, a path that does not exist, two items writing the same output, an
empty list, an output folder that cannot be written. Each error names the row and the fix.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .writers import check_writable

MANIFEST_COLUMNS = ("path", "sample", "slide", "mpp", "pitch_um", "out")
REQUIRED_COLUMNS = ("path",)


@dataclass(frozen=True)
class CohortItem:
    """One sample of a cohort: how to load it and where its prediction goes."""

    path: str
    out: str
    sample: str | None = None
    slide: str | None = None
    mpp: float | None = None
    pitch_um: float | None = None
    label: str = ""  # where it came from, for error messages (e.g. "manifest.csv row 3")

    @property
    def name(self) -> str:
        return Path(self.out).stem

    def load_kwargs(self) -> dict:
        return {"sample": self.sample, "slide": self.slide, "mpp": self.mpp, "pitch_um": self.pitch_um}


def _float(value: str, column: str, where: str, path: Path) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        v = float(value)
    except ValueError:
        raise InputError(f"{where}: column '{column}' is {value!r}, not a number", path=path,
                         hint=f"write a number in micrometres or leave '{column}' empty") from None
    if not v > 0:
        raise InputError(f"{where}: column '{column}' must be positive, got {value}", path=path,
                         hint=f"fix the value or leave '{column}' empty")
    return v


def read_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, *, mpp: float | None = None,
                  pitch_um: float | None = None) -> list[CohortItem]:
    """The items of a manifest CSV (see the module docstring); ``mpp``/``pitch_um`` fill empty cells."""
    m = Path(manifest).expanduser()
    if not m.is_file():
        raise InputError("manifest not found", path=m, hint="give a CSV file with a 'path' column")
    with open(m, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise InputError(f"the manifest has no '{missing[0]}' column (found: {', '.join(header) or 'nothing'})",
                             path=m, hint="the first line must name the columns, e.g. path,sample,out")
        unknown = [c for c in header if c and c not in MANIFEST_COLUMNS]
        if unknown:
            raise InputError(f"unknown manifest column '{unknown[0]}'", path=m,
                             hint=f"use only {', '.join(MANIFEST_COLUMNS)}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    base, out_base = m.parent, Path(out_dir).expanduser()
    items = []
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        if not any(r.values()):
            continue
        where = f"row {i}"
        if not r.get("path"):
            raise InputError(f"{where}: the 'path' cell is empty", path=m, hint="give the data set or slide of this row")
        p = Path(r["path"]).expanduser()
        p = p if p.is_absolute() or r["path"].startswith("@") else base / p
        if not r["path"].startswith("@") and not p.exists():
            raise InputError(f"{where}: path {r['path']!r} does not exist", path=m,
                             hint="fix the path (relative paths are relative to the manifest's folder)")
        slide = r.get("slide") or None
        if slide:
            s = Path(slide).expanduser()
            s = s if s.is_absolute() else base / s
            if not s.is_file():
                raise InputError(f"{where}: slide {slide!r} does not exist", path=m, hint="fix the slide path")
            slide = str(s)
        sample = r.get("sample") or None
        out = r.get("out") or f"{sample or _default_name(p)}.h5ad"
        out_p = Path(out).expanduser()
        out_p = out_p if out_p.is_absolute() else out_base / out_p
        if out_p.suffix.lower() != ".h5ad":
            raise InputError(f"{where}: out {out!r} is not an .h5ad file", path=m, hint="name it e.g. C2.h5ad")
        items.append(CohortItem(path=str(p), out=str(out_p), sample=sample, slide=slide,
                                mpp=_float(r.get("mpp"), "mpp", where, m) or mpp,
                                pitch_um=_float(r.get("pitch_um"), "pitch_um", where, m) or pitch_um,
                                label=f"{m.name} {where}"))
    if not items:
        raise InputError("the manifest lists no samples", path=m, hint="add one row per sample below the header")
    return items


def _default_name(p: Path) -> str:
    name = p.name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    if p.is_dir() and p.name == "outs":
        return p.parent.name
    return p.stem if p.is_file() else p.name


def expand_paths(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, mpp: float | None = None,
                 pitch_um: float | None = None) -> list[CohortItem]:
    """One item per sample of each path: a data set (all its samples), a slide or file, or a folder of those."""
    from . import detect_format, list_samples

    out_base = Path(out_dir).expanduser()
    items: list[CohortItem] = []

    def add(p: Path | str, label: str) -> None:
        names = list_samples(p)
        multi = len(names) > 1
        for s in names:
            items.append(CohortItem(path=str(p), out=str(out_base / f"{s}.h5ad"), sample=s if multi else None,
                                    mpp=mpp, pitch_um=pitch_um, label=label + (f" sample {s}" if multi else "")))

    for raw in paths:
        if str(raw).startswith("@"):
            add(str(raw), str(raw))
            continue
        p = Path(raw).expanduser()
        if not p.exists():
            raise InputError("path not found", path=p, hint="check the spelling")
        try:
            detect_format(p)
        except InputError:
            if not p.is_dir():
                raise
            children = [c for c in sorted(p.iterdir()) if not c.name.startswith(".")]
            found = 0
            for c in children:
                try:
                    detect_format(c)
                except InputError:
                    continue
                add(c, str(c))
                found += 1
            if not found:
                raise InputError("no slides or data sets in this folder", path=p,
                                 hint="give data set folders, slides or .h5ad files, or a --manifest") from None
            continue
        add(p, str(p))
    if not items:
        raise InputError("no samples to predict", hint="give paths or a --manifest")
    return items


def check_items(items: Sequence[CohortItem], out_dir: str | os.PathLike) -> None:
    """Up-front checks of a whole cohort: no two items share an output, the output folder is writable."""
    if not items:
        raise InputError("no samples to predict", hint="give paths or a --manifest with one row per sample")
    seen: dict[str, CohortItem] = {}
    for it in items:
        key = str(Path(it.out).resolve())
        if key in seen:
            raise InputError(f"{it.label} and {seen[key].label} both write {Path(it.out).name}",
                             hint="give them distinct names in the manifest's 'out' column")
        seen[key] = it
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError("the output folder is a file", path=out, hint="give a folder for the cohort's outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder ({exc.strerror})", path=out,
                         hint="choose a folder you can write") from None
    for d in {Path(it.out).parent for it in items} | {out}:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the output folder ({exc.strerror})", path=d,
                             hint="choose a folder you can write") from None
        check_writable(d)  # a real probe file (os.access says yes to root on some read-only paths) and free space


__all__ = ["CohortItem", "MANIFEST_COLUMNS", "read_manifest", "expand_paths", "check_items"]
