"""One entry point for the three predictors, and the atomic writers of ``comtip predict``.

:func:`predict_sample` embeds the spot patches of a sample (:func:`engine.inference.embed_sample`,
cached) and turns the embeddings into predicted log-normalised expression with one of

* ``retrieval`` (default): the average expression of the ``k`` most similar reference spots
  (BLEEP-style). The reference is the bank stored in the checkpoint (image embeddings and
  log-normalised panel expression of the training spots), or, with ``reference=``, built here
  from a user's dataset(s): their spots are embedded with the same model (and cached) and their
  expression is taken log-normalised over the checkpoint's gene panel;
* ``probe``: a ridge head on the frozen pooled image features: the checkpoint's stored probe,
  or one fitted here on ``reference=`` (an error names both options when neither exists);
* ``zero-shot``: no reference at all: the image embedding is scored against the sentences
  "gene g at value v" (see ``engine.predictors.zero_shot``).

The result is an :class:`anndata.AnnData` aligned with the sample's spot table:
``obs_names`` = the source's spot ids, ``obsm['spatial']`` = (x, y) full-resolution pixels,
``var_names`` = genes, ``X`` = predicted log-normalised expression (float32),
``layers[Key.UNCERTAINTY]`` = the predictor's own spread per spot and gene (same units; absent,
with the reason in the provenance, for a stored probe that predates it; docs/model.md),
``obsm[Key.EMBEDDING]`` = the image embeddings and ``uns[Key.PROVENANCE]`` = where it came from
(checkpoint path, digest and training provenance, predictor and its parameters, device actually
used, batch size, patch size, package versions, time, sample source).

:func:`predict_to_file` also writes it, atomically (temporary file + rename): an existing output
is refused without ``overwrite=True``, and an input file is never written over.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..constants import PREDICT_MODES, Default, Key
from ..errors import InputError
from ..progress import Cancel, Progress
from ..io.export_csv import prediction_table  # noqa: F401 - the CSV table, exported from here too
from ..io.writers import check_writable

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from ..io.record import SpatialSample
    from ..model.checkpoint import Checkpoint
    from .inference import Embeddings

log = logging.getLogger(__name__)

_MODE_ALIASES = {"zero_shot": "zero-shot", "zeroshot": "zero-shot", "knn": "retrieval", "ridge": "probe"}


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
def _as_samples(reference, reference_samples, progress: Progress | None) -> list["SpatialSample"]:
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


def _reference_data(refs: Sequence["SpatialSample"], model, panel: list[str], *, device, batch_size,
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


# =========================================================================== provenance
def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("napari-comtip", "torch", "timm", "anndata", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "not installed"
    return out


def _h5ad_safe(obj: Any, depth: int = 0) -> Any:
    """Make ``obj`` storable in ``uns`` of an .h5ad (no None, no mixed lists, no objects)."""
    if depth > 6:
        return json.dumps(obj, default=str)
    if obj is None:
        return ""
    if isinstance(obj, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _h5ad_safe(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(isinstance(v, str) for v in obj):
            return [str(v) for v in obj] if obj else np.array([], dtype=str)
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in obj):
            return np.asarray(obj)
        return json.dumps(obj, default=str)
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf" and obj.size <= 4096:
        return obj
    return str(obj)


def _warn_if_other_species(sample: "SpatialSample", ck: "Checkpoint") -> None:
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


def _warn_if_unreliable(ck: "Checkpoint", mode: str) -> None:
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


# =========================================================================== predict
def predict_sample(
    sample: "SpatialSample | str | os.PathLike",
    checkpoint: Any = None,
    mode: str = Default.PREDICT_MODE,
    genes: Sequence[str] | str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    reference: Any = None,
    reference_samples: Sequence[str] | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    embeddings: "Embeddings | None" = None,
    *,
    k: int = Default.RETRIEVAL_K,
    alpha: float | None = Default.PROBE_ALPHA,
    context: str | None = None,
) -> "anndata.AnnData":
    """Predict log-normalised expression for every spot of ``sample`` (see the module docstring).

    ``checkpoint``: a path, a loaded checkpoint, or None (the bundled one). ``mode``:
    ``"retrieval"``, ``"probe"`` or ``"zero-shot"``. ``genes``: symbols or the sample's feature
    ids (default: the whole panel). ``reference``/``reference_samples``: dataset(s) to build the retrieval bank or fit
    the probe from (default: what the checkpoint stores). ``embeddings``: precomputed
    :class:`~napari_comtip.engine.inference.Embeddings` of this sample with this checkpoint (the
    widget's cache; with ``probe`` they must include features). ``k``: neighbours for retrieval;
    ``alpha``: ridge penalty when a probe is fitted here (None: chosen by leave-one-out on the
    reference spots, see :func:`~napari_comtip.engine.predictors.loo_ridge_alpha`). ``context``:
    the input of a probe fitted here (:mod:`engine.context`; default ``Default.PROBE_CONTEXT``);
    a checkpoint's stored probe always uses the context it was fitted with.
    """
    import anndata

    from . import predictors
    from .device import describe_device, resolve_device
    from .embedding_cache import check_signature, embedding_signature, weights_digest
    from .inference import embed_sample, precision_for

    t0 = time.perf_counter()
    mode = _MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
    if mode not in PREDICT_MODES:
        raise InputError(f"unknown prediction mode '{mode}'", hint=f"use {', '.join(PREDICT_MODES)}")
    if isinstance(sample, (str, os.PathLike)):
        from ..io import load_sample

        sample = load_sample(sample)
    dev = resolve_device(device)
    ck = get_checkpoint(checkpoint)
    model = ck.model
    panel = [str(g) for g in ck.gene_panel]
    ck_label = ck.label
    if genes is not None and sample.expression is not None:  # feature ids (e.g. ENSMUSG...) -> symbols
        from ..io.expression import symbols_for

        genes = symbols_for([g for g in genes.split(",") if g.strip()] if isinstance(genes, str) else genes,
                            sample.expression.var)
    _warn_if_other_species(sample, ck)
    gene_idx = resolve_genes(genes, panel, ck_label, checkpoint_path=ck.path)
    gene_names = [panel[i] for i in gene_idx]

    # ------------------------------------------------------------------ the predictor's inputs
    bank = probe = ref = None
    if mode == "retrieval":
        if reference is None:
            bank = ck.bank
            if bank is None:
                raise InputError(f"{ck_label} stores no retrieval bank",
                                 hint="pass --reference with a dataset that has expression, or use --mode zero-shot")
    elif mode == "probe":
        if reference is None:
            probe = ck.probe
            if probe is None:
                raise InputError(f"{ck_label} stores no probe",
                                 hint="pass --reference with a dataset that has expression to fit one, "
                                      "or use --mode retrieval / zero-shot")
    from .context import check_context, context_features, fit_context_probe

    if mode == "probe" and reference is None:
        stored = probe.context
        if context is not None and check_context(context) != stored:
            raise InputError(f"the probe of {ck_label} was fitted with context '{stored}', not '{context}'",
                             hint="leave the context out, or pass --reference to fit a new probe")
        context = stored
    context = check_context(context or Default.PROBE_CONTEXT)
    if reference is not None and mode != "zero-shot":
        refs = _as_samples(reference, reference_samples, progress)
        ref = _reference_data(refs, model, panel, device=dev, batch_size=batch_size, features=mode == "probe",
                              progress=progress, cancel=cancel, context=context)
        if ref["missing_genes"]:
            miss = [g for g in gene_names if g in set(ref["missing_genes"])]
            if miss:
                log.warning("%d requested gene(s) are not measured in the reference and predict as 0: %s",
                            len(miss), ", ".join(miss[:10]))

    # ------------------------------------------------------------------ embeddings of the sample
    need_feats = mode == "probe"
    if embeddings is not None:
        check_signature(embeddings.signature, embedding_signature(sample, model, precision=precision_for(dev)),
                        sample_name=sample.name)
        if embeddings.n_spots != sample.n_spots:
            raise InputError(f"the given embeddings have {embeddings.n_spots} rows but sample "
                             f"'{sample.name}' has {sample.n_spots} spots", hint="recompute them for this sample")
        if need_feats and embeddings.features is None:
            embeddings = None  # the probe needs the pooled features: compute them (cached)
    emb = embeddings if embeddings is not None else embed_sample(
        sample, model, device=dev, batch_size=batch_size, progress=progress, cancel=cancel, features=need_feats)

    # ------------------------------------------------------------------ predict, in chunks of spots
    n, G = sample.n_spots, len(gene_idx)
    X = np.empty((n, G), dtype=np.float32)
    params: dict[str, Any] = {}
    if mode == "retrieval":
        if ref is not None:
            bank_emb, bank_expr = ref["image_emb"], ref["expr"]
        else:
            bank_emb, bank_expr = bank.emb.numpy(), bank.expr.numpy()
        bank_expr = np.ascontiguousarray(bank_expr[:, gene_idx])
        k_eff = int(min(k, len(bank_emb)))
        params = {"k": k_eff, "bank_spots": int(len(bank_emb)),
                  "bank_source": "reference" if ref is not None else "checkpoint"}
    elif mode == "probe":
        if ref is not None:
            probe = fit_context_probe(ref["features"], ref["expr"], context, ref["centres"], ref["groups"],
                                      alpha=alpha, genes=panel)
            params = {"alpha": float(probe.alpha), "probe_source": "reference", "probe_spots": int(len(ref["expr"]))}
        else:
            params = {"alpha": float(probe.alpha), "probe_source": "checkpoint"}
        params["context"] = context
        probe_in = context_features(np.asarray(emb.features, dtype=np.float32), sample.centers_rc(), context)
        probe_genes = probe.genes or panel
        col = {str(g): j for j, g in enumerate(probe_genes)}
        lacking = [g for g in gene_names if g not in col]
        if lacking:
            raise InputError(f"the probe of {ck_label} does not cover {len(lacking)} requested gene(s) "
                             f"(e.g. {', '.join(lacking[:5])})", hint="pass --reference to fit a probe over the whole panel")
        probe_cols = np.asarray([col[g] for g in gene_names], dtype=np.int64)
        if not isinstance(probe, predictors.Probe):  # a checkpoint's StoredProbe: its spread rides in its entry
            probe = predictors.Probe.from_dict(probe.to_dict() if hasattr(probe, "to_dict") else probe)
    else:
        params = {"grid": int(model.config.zero_shot.grid),
                  "temperature": model.config.zero_shot.temperature or float(model.temperature())}
    if ref is None:  # the checkpoint's own bank / probe / text encoder: its stored evaluation applies
        _warn_if_unreliable(ck, mode)

    U: np.ndarray | None = np.empty((n, G), dtype=np.float32)
    chunk = int(Default.EMBED_CHUNK_SPOTS)
    for a in range(0, n, chunk):
        if cancel is not None and cancel():
            from ..errors import Cancelled

            raise Cancelled(f"prediction of '{sample.name}' cancelled")
        b = min(n, a + chunk)
        e = np.asarray(emb.image[a:b], dtype=np.float32)
        if mode == "retrieval":
            xa, ua = predictors.retrieval(e, bank_emb, bank_expr, k_eff, return_std=True)
        elif mode == "probe":
            xa, ua = predictors.probe_predict(probe, probe_in[a:b], return_std=True)
            xa, ua = xa[:, probe_cols], None if ua is None else ua[:, probe_cols]
        else:
            xa, ua = predictors.zero_shot(model, e, gene_idx, return_std=True)
        X[a:b] = xa
        if ua is None:
            U = None
        elif U is not None:
            U[a:b] = ua
        if progress is not None:
            progress(b, n, f"predicting ({mode})")

    # ------------------------------------------------------------------ the AnnData
    obs = pd.DataFrame(index=pd.Index(sample.spot_ids, name=None))
    for col in (Key.ROW, Key.COL, Key.DIAMETER, Key.ARRAY_ROW, Key.ARRAY_COL, Key.IN_TISSUE):
        if col in sample.spots.columns:
            obs[col] = sample.spots[col].to_numpy()
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(gene_names)))
    adata.obsm[Key.SPATIAL] = sample.centers_xy().astype(np.float64)
    adata.obsm[Key.EMBEDDING] = np.asarray(emb.image, dtype=np.float32)
    if U is not None:
        adata.layers[Key.UNCERTAINTY] = U

    ck_path = str(ck.path)
    inputs = [str(p) for p in sample.provenance.get("inputs", [])]
    inputs.append(ck_path)
    if ref is not None:
        inputs.extend(str(p) for p in ref["paths"])
    prov: dict[str, Any] = {
        "predictor": mode,
        "params": params,
        "uncertainty": _uncertainty_note(mode, params, probe, U is not None),
        "genes_requested": "all" if genes is None else ",".join(gene_names),
        "checkpoint": ck_path,
        "checkpoint_name": ck.label,
        "checkpoint_digest": ck.digest,
        "weights_digest": weights_digest(model),
        "model_version": int(getattr(model.config, "version", 0)),
        "training": ck.provenance,
        "reference": {"samples": ref["samples"], "missing_genes": ref["missing_genes"]} if ref is not None else {},
        "device": (describe_device(resolve_device(emb.device)) if not emb.cached
                   else f"{emb.device} (embeddings from the cache, computed there)"),
        "device_type": str(emb.device).split(":")[0],
        "precision": emb.precision,
        "batch_size": int(emb.batch_size),
        "embeddings_cached": bool(emb.cached),
        "patch_um": float(model.config.patch_um),
        "img_size": int(model.config.vision.img_size),
        "mpp": float(sample.mpp),
        "mpp_source": str(sample.mpp_source),
        "sample": {"name": sample.name, "format": sample.format, "identity": sample.identity,
                   "source": str(sample.provenance.get("root") or sample.provenance.get("image") or ""),
                   **({"grid": sample.provenance["grid"]} if "grid" in sample.provenance else {})},
        "inputs": inputs,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "timings": {k2: float(v) for k2, v in (emb.timings or {}).items()},
    }
    adata.uns[Key.PROVENANCE] = _h5ad_safe(prov)
    return adata


def _uncertainty_note(mode: str, params: dict[str, Any], probe, available: bool) -> dict[str, Any]:
    """What ``layers[Key.UNCERTAINTY]`` holds (the provenance's words for it)."""
    note: dict[str, Any] = {"layer": Key.UNCERTAINTY if available else "",
                            "units": "standard deviation, log-normalised expression (log1p of counts per 1e4)"}
    if mode == "retrieval":
        note["what"] = f"spread (standard deviation) of the {params.get('k')} retrieved neighbours' values around their mean"
    elif mode == "zero-shot":
        note["what"] = (f"spread (standard deviation) of the zero-shot softmax over the {params.get('grid')}-value grid "
                        "(through the model's per-gene calibration line, when it has one)")
    elif available:
        rule = getattr(probe, "resid_rule", None) or "cross-validation"
        s2 = (f"the gene's residual variance at the spot from a ridge of the log squared training residuals, its mean "
              f"the held-out residual variance ({rule})" if getattr(probe, "var_weight", None) is not None
              else f"the gene's held-out residual variance ({rule})")
        note["what"] = f"the ridge probe's predictive standard deviation sqrt(s2_g (1 + 1/n + z' (Z'Z + alpha I)^-1 z)), s2_g = {s2}"
    else:
        note["what"] = ("not available: this probe was stored before probes kept their predictive spread; re-fit it "
                        "(training/refit_probe.py) or pass --reference to fit one here")
    return note


def check_outputs(out: str | os.PathLike, csv: str | os.PathLike | None = None, overwrite: bool = False,
                  protected: Sequence[str] = ()) -> None:
    """Raise :class:`InputError` now if ``out``/``csv`` could not be written later (before slow work).

    The same check as the writers' (:mod:`io.writers`), which run it again when they write.
    """
    from ..io.writers import _check_target, _protected_paths

    guard = _protected_paths(None, protected)
    out = _check_target(Path(out), overwrite, guard)
    if out.suffix.lower() != ".h5ad":
        raise InputError("the output must be an .h5ad file", path=out,
                         hint="name it e.g. prediction.h5ad (use --csv for a table)")
    if csv is not None:
        csv_path = _check_target(Path(csv), overwrite, guard)
        if csv_path.resolve() == out.resolve():
            raise InputError("--csv and --out name the same file", path=csv_path, hint="give the CSV its own name")
        check_writable(csv_path.parent)
    check_writable(out.parent)  # a real probe file and some free space (io/writers.py)


def predict_to_file(
    sample: "SpatialSample | str | os.PathLike",
    out: str | os.PathLike,
    checkpoint: Any = None,
    mode: str = Default.PREDICT_MODE,
    genes: Sequence[str] | str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    reference: Any = None,
    reference_samples: Sequence[str] | None = None,
    csv: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    embeddings: "Embeddings | None" = None,
    **kwargs: Any,
) -> "anndata.AnnData":
    """:func:`predict_sample`, then write ``out`` (.h5ad) and optionally ``csv``, atomically.

    The output paths are checked before any work: an existing file is refused without
    ``overwrite`` and an input of the prediction (slide, counts, checkpoint, reference) is never
    a valid output.
    """
    from ..io.writers import write_prediction
    from ..model.bundled import resolve_checkpoint
    from ..model.checkpoint import Checkpoint

    if isinstance(sample, (str, os.PathLike)):
        from ..io import load_sample

        sample = load_sample(sample)
    protected = [str(p) for p in sample.provenance.get("inputs", [])]
    protected.append(str(checkpoint.path if isinstance(checkpoint, Checkpoint) else resolve_checkpoint(checkpoint)))
    check_outputs(out, csv, overwrite, protected)
    csv_path = Path(csv).expanduser() if csv is not None else None

    adata = predict_sample(sample, checkpoint=checkpoint, mode=mode, genes=genes, device=device,
                           batch_size=batch_size, reference=reference, reference_samples=reference_samples,
                           progress=progress, cancel=cancel, embeddings=embeddings, **kwargs)
    prov_inputs = list(adata.uns[Key.PROVENANCE].get("inputs", []))
    write_prediction(adata, out, csv_path, overwrite=overwrite, protect=prov_inputs)  # both or neither
    return adata


__all__ = ["predict_sample", "predict_to_file", "check_outputs", "resolve_genes", "get_checkpoint",
           "prediction_table"]
