"""One entry point for the three predictors: :func:`predict_sample`.

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

:func:`engine.predict_file.predict_to_file` also writes it, atomically. The checkpoint, genes
and reference come from :mod:`engine.predict_inputs`, the provenance's helpers from
:mod:`engine.provenance`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..constants import PREDICT_MODES, Default, Key
from ..errors import InputError
from ..progress import Cancel, Progress
from .predict_inputs import (
    as_samples, get_checkpoint, reference_data, resolve_genes, warn_if_other_species, warn_if_unreliable,
)
from .provenance import h5ad_safe, uncertainty_note, versions
from .zero_shot_spread import check_spread

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from ..io.record import SpatialSample
    from .inference import Embeddings

log = logging.getLogger(__name__)

_MODE_ALIASES = {"zero_shot": "zero-shot", "zeroshot": "zero-shot", "knn": "retrieval", "ridge": "probe"}


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
    a checkpoint's stored probe always uses the context it was fitted with. For zero-shot, the
    image embeddings it reads (``none`` or ``neighbours``, default ``Default.ZERO_SHOT_CONTEXT``;
    ``obsm`` keeps each spot's own embedding).
    """
    import anndata

    from . import predictors
    from .device import describe_device, resolve_device
    from .embedding_cache import check_signature, embedding_signature, model_img_size, weights_digest
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
    warn_if_other_species(sample, ck)
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
    from .context import check_context, check_zero_shot_context, context_features, embedding_context, fit_context_probe

    if mode == "zero-shot":  # the embeddings zero-shot reads (engine/context.embedding_context)
        context = check_zero_shot_context(context or Default.ZERO_SHOT_CONTEXT)
    else:
        if mode == "probe" and reference is None:
            stored = probe.context
            if context is not None and check_context(context) != stored:
                raise InputError(f"the probe of {ck_label} was fitted with context '{stored}', not '{context}'",
                                 hint="leave the context out, or pass --reference to fit a new probe")
            context = stored
        context = check_context(context or Default.PROBE_CONTEXT)
    if reference is not None and mode != "zero-shot":
        refs = as_samples(reference, reference_samples, progress)
        ref = reference_data(refs, model, panel, device=dev, batch_size=batch_size, features=mode == "probe",
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
        spread = check_spread(ck.zero_shot_spread, model.n_genes)  # its residual spread, when stored
        params = {"grid": int(model.config.zero_shot.grid),
                  "temperature": model.config.zero_shot.temperature or float(model.temperature()),
                  "context": context, "residual_spread": None if spread is None else str(spread.get("source"))}
        zs_in = embedding_context(emb.image, sample.centers_rc(), context)
    if ref is None:  # the checkpoint's own bank / probe / text encoder: its stored evaluation applies
        warn_if_unreliable(ck, mode)

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
            xa, ua = predictors.zero_shot(model, zs_in[a:b], gene_idx, return_std=True, spread=spread)
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
        "uncertainty": uncertainty_note(mode, params, probe, U is not None),
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
        "read_px": model_img_size(model),
        "mpp": float(sample.mpp),
        "mpp_source": str(sample.mpp_source),
        "sample": {"name": sample.name, "format": sample.format, "identity": sample.identity,
                   "source": str(sample.provenance.get("root") or sample.provenance.get("image") or ""),
                   **({"grid": sample.provenance["grid"]} if "grid" in sample.provenance else {})},
        "inputs": inputs,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "timings": {k2: float(v) for k2, v in (emb.timings or {}).items()},
    }
    adata.uns[Key.PROVENANCE] = h5ad_safe(prov)
    return adata


__all__ = ["predict_sample"]
