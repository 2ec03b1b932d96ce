"""The inputs of a prediction: the checkpoint, the genes and the reference dataset(s).

:func:`get_checkpoint` loads (and keeps in memory) the checkpoint, :func:`resolve_genes` turns
gene symbols into panel indices (a one-line error naming close matches and the bundled
checkpoint that has an unknown gene), :func:`as_samples` / :func:`reference_data` load and embed
a user's reference dataset(s), and the ``warn_if_*`` functions warn about a checkpoint that does
not fit the sample or whose own evaluation says the predictor is unreliable. Used by
:func:`engine.predict.predict_sample` and :mod:`engine.cohort`.
"""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import Default
from ..errors import InputError
from ..progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from ..io.record import SpatialSample
    from ..model.checkpoint import Checkpoint


# =========================================================================== checkpoints
_CKPT_LOCK = threading.Lock()
_CKPT_MEMO: dict[str, Any] = {}  # one loaded checkpoint, keyed by file identity


def get_checkpoint(checkpoint: Any = None) -> "Checkpoint":
    """The loaded :class:`~napari_comtip.model.checkpoint.Checkpoint` for None (the default
    bundled one), a bundled name, a path, or a loaded one (returned as is).

    The last checkpoint loaded from a file is kept in memory (keyed by path, size and mtime), so
    repeated predictions from the widget do not reload it.
    """
    from ..io.cache import file_identity
    from ..model.bundled import resolve_checkpoint
    from ..model.checkpoint import Checkpoint, load_checkpoint

    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    path = resolve_checkpoint(checkpoint)
    key = file_identity(path)
    with _CKPT_LOCK:
        if key not in _CKPT_MEMO:
            loaded = load_checkpoint(path, map_location="cpu")
            _CKPT_MEMO.clear()
            _CKPT_MEMO[key] = loaded
        return _CKPT_MEMO[key]


# =========================================================================== genes
def resolve_genes(genes: Sequence[str] | str | None, panel: Sequence[str], checkpoint_label: str = "the checkpoint",
                  *, checkpoint_path: str | os.PathLike | None = None) -> list[int]:
    """Panel indices of ``genes`` (all of the panel when None), in the requested order, deduplicated.

    Symbols match case-insensitively. An unknown symbol raises :class:`InputError` naming the
    closest panel symbols and, when ``checkpoint_path`` is given, the bundled checkpoint whose
    panel has it (a checkpoint of another panel or species).
    """
    panel = [str(g) for g in panel]
    if genes is None:
        return list(range(len(panel)))
    if isinstance(genes, str):
        genes = [g.strip() for g in genes.split(",") if g.strip()]
    if len(genes) == 0:
        raise InputError("no gene given", hint="pass gene symbols, e.g. --genes ERBB2,KRT19, or omit --genes for the whole panel")
    lookup = {g: i for i, g in enumerate(panel)}
    upper = {}
    for g, i in lookup.items():
        upper.setdefault(g.upper(), i)
    out: list[int] = []
    for g in genes:
        g = str(g).strip()
        i = lookup.get(g, upper.get(g.upper()))
        if i is None:
            raise _gene_not_in_panel(g, panel, checkpoint_label, checkpoint_path)
        if i not in out:
            out.append(i)
    return out


def _gene_not_in_panel(gene: str, panel: list[str], label: str, path: str | os.PathLike | None) -> InputError:
    """The one-line error for a gene outside the panel: close matches, and which bundled checkpoint has it."""
    spelt = {p.upper(): p for p in reversed(panel)}
    close = difflib.get_close_matches(gene, panel, n=5, cutoff=0.6) or \
        [spelt[c] for c in difflib.get_close_matches(gene.upper(), list(spelt), n=5, cutoff=0.6)]
    close_txt = f"; close matches: {', '.join(close)}" if close else ""
    others, species = [], None
    if path is not None:
        from ..model.catalogue import bundled_with_gene, checkpoint_info

        others = bundled_with_gene(gene, exclude=path)
        species = checkpoint_info(path)["species"]
    what = f"{len(panel)} {species} genes" if species else f"{len(panel)} genes"
    if others:
        name, symbol = others[0]
        sp = checkpoint_info(name)["species"]
        return InputError(f"gene '{gene}' is not in the gene panel of {label} ({what}){close_txt}; the bundled "
                          f"checkpoint {name} ({sp}) has it as {symbol}",
                          hint=f"pass --checkpoint {name} (the Predict widget: choose it under Checkpoint), "
                               f"or run without --genes to predict the whole panel of {label}")
    return InputError(f"gene '{gene}' is not in the gene panel of {label} ({what}){close_txt}",
                      hint="run `comtip predict` without --genes to predict the whole panel; its var_names list "
                           "every gene (`comtip checkpoints` lists the bundled checkpoints and their species)")


# =========================================================================== references
def as_samples(reference, reference_samples, progress: Progress | None) -> list["SpatialSample"]:
    """Load the reference dataset(s): a path (all its samples, or ``reference_samples``) or samples."""
    from ..io.record import SpatialSample

    if isinstance(reference, SpatialSample):
        return [reference]
    if isinstance(reference, (list, tuple)) and reference and all(isinstance(r, SpatialSample) for r in reference):
        return list(reference)
    from ..io import list_samples, load_sample

    refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    out = []
    for ref in refs:
        names = list(reference_samples) if reference_samples else (list_samples(ref) or [None])
        for name in names:
            out.append(load_sample(ref, sample=name))
    return out


def reference_data(refs: Sequence["SpatialSample"], model, panel: list[str], *, device, batch_size,
                    features: bool, progress, cancel, context: str = "none") -> dict[str, Any]:
    """Embeddings (and probe inputs: features in ``context``, per section) of every reference spot
    plus their panel expression."""
    from .context import context_features
    from .data import panel_matrix
    from .inference import embed_sample

    embs, feats, exprs, names, centres, groups = [], [], [], [], [], []
    for ref in refs:
        if ref.expression is None:
            raise InputError(f"reference sample '{ref.name}' has no measured expression",
                             path=ref.provenance.get("root") or ref.provenance.get("image"),
                             hint="a reference needs counts (e.g. a her2st section or a Space Ranger outs/ folder)")
        e = embed_sample(ref, model, device=device, batch_size=batch_size, progress=progress, cancel=cancel,
                         cache=True, features=features)
        embs.append(np.asarray(e.image, dtype=np.float32))
        if features:
            feats.append(context_features(np.asarray(e.features, dtype=np.float32), ref.centers_rc(), context))
        exprs.append(panel_matrix(ref.expression, panel, sample_name=ref.name,
                                  min_shared=Default.MIN_SHARED_GENES))
        names.append(ref.name)
        centres.append(ref.centers_rc())
        groups.append(np.full(ref.n_spots, len(names) - 1))
    var_sets = [set(map(str, r.expression.var_names)) for r in refs]
    missing = [g for g in panel if not any(g in s for s in var_sets)]
    return {
        "image_emb": np.concatenate(embs),
        "features": np.concatenate(feats) if features else None,
        "expr": np.concatenate(exprs).astype(np.float32),
        "samples": names,
        "centres": np.concatenate(centres),
        "groups": np.concatenate(groups),
        "missing_genes": missing,
        "paths": [p for r in refs for p in r.provenance.get("inputs", [])],
    }



def warn_if_other_species(sample: "SpatialSample", ck: "Checkpoint") -> None:
    """Warn when the sample's measured genes barely meet the checkpoint's panel but fit another
    bundled checkpoint (a model of another species or tissue), naming that one."""
    import warnings

    from ..model.catalogue import better_bundled_for

    if sample.expression is None:
        return
    b = better_bundled_for(sample.expression.var_names, ck.path)
    if b is not None:
        own = f"{ck.label} ({b['own_species']})" if b["own_species"] else ck.label
        warnings.warn(f"sample '{sample.name}' measures only {b['own_shared']} of the {b['own_genes']} genes of {own} "
                      f"but {b['shared']} of the {b['n_genes']} of the bundled {b['name']} ({b['species']}): "
                      f"a model of another species or tissue? use --checkpoint {b['name']} "
                      f"(the Predict widget: its Checkpoint list)", UserWarning, stacklevel=3)


def warn_if_unreliable(ck: "Checkpoint", mode: str) -> None:
    """Warn when the checkpoint's own held-out evaluation (``extras["evaluation"]``, written by
    its maintainers, see docs/model-card.md) says this predictor's output does not track the
    measured expression (mean per-gene PCC <= 0 on held-out sections)."""
    import warnings

    ev = ck.evaluation
    m = (ev.get("predictors") or {}).get(mode) or {}
    r = m.get("pcc_hvg50")
    if isinstance(r, (int, float)) and r <= 0:
        warnings.warn(f"{mode} predictions of {ck.label} were not positively correlated with measured expression "
                      f"on held-out sections (HVG-50 PCC {r:.2f}, {ev.get('protocol', 'see its model card')}); "
                      f"use --mode probe for expression patterns", UserWarning, stacklevel=3)


__all__ = ["get_checkpoint", "resolve_genes", "as_samples", "reference_data", "warn_if_other_species",
           "warn_if_unreliable"]
