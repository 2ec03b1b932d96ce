"""What a checkpoint is, read cheaply: the records ``comtip checkpoints`` prints and the widget shows.

:func:`checkpoint_info` reads a checkpoint's metadata without building a model (its tensors are
memory-mapped, never read) and keeps the result per process, keyed by the file's path, size and
modification time. :func:`list_bundled` gives one record per bundled checkpoint (the table of
:mod:`model.bundled` joined with what each file says about itself). :func:`bundled_with_gene`
answers "which bundled checkpoint predicts this gene?" for error messages; :func:`format_table`
is the human-readable listing of ``comtip checkpoints``.
"""

from __future__ import annotations

import os
from typing import Any

from ..constants import Default
from ..io.cache import file_identity
from .bundled import BUNDLED, DEFAULT_NAME, bundled_entry, checkpoint_name, resolve_checkpoint
from .checkpoint import read_checkpoint

_INFO: dict[str, tuple[dict[str, Any], list[str]]] = {}  # file identity -> (record, gene panel)


def _read(checkpoint: str | os.PathLike | None) -> tuple[dict[str, Any], list[str]]:
    path = resolve_checkpoint(checkpoint)
    key = file_identity(path)
    if key not in _INFO:
        blob = read_checkpoint(path, mmap=True)  # tensors stay on disk: only the metadata is read
        panel = [str(g) for g in blob["gene_panel"]]
        prov = blob.get("provenance") or {}
        run = prov.get("run_config") or {}
        evaluation = (blob.get("extras") or {}).get("evaluation") or {}
        name = checkpoint_name(path)
        entry = bundled_entry(name) if name else None
        samples = [str(s) for s in prov.get("samples") or []]
        probe = blob.get("probe") or {}
        record = {
            "name": name or path.stem,
            "path": str(path),
            "bundled": entry is not None,
            "default": name == DEFAULT_NAME,
            "species": entry.species if entry else None,
            "technology": entry.technology if entry else None,
            "tissue": entry.tissue if entry else None,
            "data": entry.data if entry else (f"sections {', '.join(samples)}" if samples else None),
            "model_card": entry.card if entry else None,
            "n_genes": len(panel),
            "recipe": evaluation.get("arm") or run.get("preset"),
            "preset": run.get("preset"),
            "samples": samples,
            "n_spots": prov.get("n_spots"),
            "steps": prov.get("steps"),
            "created": blob.get("created"),
            "package_version": blob.get("package_version"),
            "size_mb": round(path.stat().st_size / 1e6, 1),
            "storage_dtype": blob.get("storage_dtype"),
            "patch_um": blob.get("patch_um"),
            "bank_spots": len((blob.get("bank") or {}).get("ids") or []),
            "probe_context": probe.get("context") if probe else None,
            "evaluation": evaluation,
        }
        del blob
        _INFO[key] = (record, panel)
    record, panel = _INFO[key]
    return dict(record), panel


def checkpoint_info(checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The metadata record of a checkpoint (None: the default bundled one; a bundled name; a path).

    Keys: ``name`` (bundled name, else the file's stem), ``path``, ``bundled``, ``default``,
    ``species``/``technology``/``tissue``/``model_card`` (bundled ones; None otherwise), ``data``,
    ``n_genes``, ``recipe`` (the benchmark arm of its stored evaluation, else its preset),
    ``preset``, ``samples``, ``n_spots``, ``steps``, ``created``, ``package_version``, ``size_mb``,
    ``storage_dtype``, ``patch_um``, ``bank_spots``, ``probe_context`` and ``evaluation`` (the
    held-out evaluation stored by training/store_evaluation.py, or {}).
    """
    return _read(checkpoint)[0]


def gene_panel_of(checkpoint: str | os.PathLike | None = None) -> list[str]:
    """The gene panel of a checkpoint, without loading its model."""
    return list(_read(checkpoint)[1])


def list_bundled() -> list[dict[str, Any]]:
    """One :func:`checkpoint_info` record per bundled checkpoint, the default first."""
    return [checkpoint_info(b.name) for b in sorted(BUNDLED, key=lambda b: not b.default)]


def bundled_with_gene(gene: str, *, exclude: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """``(bundled name, panel symbol)`` of each bundled checkpoint whose panel has ``gene``
    (case-insensitively), leaving out the checkpoint file ``exclude``."""
    skip = None if exclude is None else os.path.realpath(os.fspath(exclude))
    found = []
    for b in sorted(BUNDLED, key=lambda b: not b.default):
        if not b.path.is_file() or (skip is not None and os.path.realpath(b.path) == skip):
            continue
        match = next((g for g in gene_panel_of(b.name) if g.upper() == str(gene).upper()), None)
        if match is not None:
            found.append((b.name, match))
    return found


def better_bundled_for(genes, checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """When the measured ``genes`` of a sample barely meet ``checkpoint``'s panel (< 10 %) but
    cover most (>= 50 %) of a bundled checkpoint's panel (a model of another species or tissue):
    ``{"name", "species", "shared", "n_genes", "own_shared", "own_genes", "own_species"}`` of the best such
    bundled checkpoint; else None."""
    measured = {str(g) for g in genes}
    own = gene_panel_of(checkpoint)
    own_shared = len(measured.intersection(own))
    if not measured or own_shared >= 0.1 * len(own):
        return None
    me = os.path.realpath(resolve_checkpoint(checkpoint))
    best = None
    for b in BUNDLED:
        if not b.path.is_file() or os.path.realpath(b.path) == me:
            continue
        panel = gene_panel_of(b.name)
        shared = len(measured.intersection(panel))
        if shared >= 0.5 * len(panel) and (best is None or shared / len(panel) > best["shared"] / best["n_genes"]):
            best = {"name": b.name, "species": b.species, "shared": shared, "n_genes": len(panel)}
    if best is None:
        return None
    return dict(best, own_shared=own_shared, own_genes=len(own), own_species=checkpoint_info(checkpoint)["species"])


def format_table(records: list[dict[str, Any]]) -> str:
    """The human-readable ``comtip checkpoints`` listing: one table row per checkpoint, then notes."""

    def score(r: dict, mode: str) -> str:
        m = (r["evaluation"].get("predictors") or {}).get(mode) or {}
        return f"{m['pcc_heg50']:.3f} / {m['pcc_hvg50']:.3f}" if "pcc_heg50" in m else "-"

    head = ("name", "species", "technology", "genes", "recipe", f"{Default.PREDICT_MODE} HEG/HVG-50",
            "zero-shot HEG/HVG-50", "MB")
    rows = [(r["name"] + (" *" if r["default"] else ""), r["species"] or "?", r["technology"] or "?", str(r["n_genes"]),
             r["recipe"] or "?", score(r, Default.PREDICT_MODE), score(r, "zero-shot"), f"{r['size_mb']:.1f}")
            for r in records]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"{r['name']}: trained on {r['data']}; model card {r['model_card']}" for r in records]
    lines += ["* = the default (used when --checkpoint is not given). Scores: mean per-gene Pearson r on held-out "
              "sections (leave-one-section-out of the same recipe, stored in the file; HEG/HVG-50 = the 50 most "
              "expressed / most variable genes).",
              "Use one with --checkpoint NAME (predict, evaluate, view) or choose it in the Predict widget; a path to "
              "a .pt file works too."]
    return "\n".join(lines)


__all__ = ["better_bundled_for", "bundled_with_gene", "format_table", "checkpoint_info", "gene_panel_of", "list_bundled"]
