"""What ``model.pt`` carries besides the weights: the retrieval bank and the ridge probe of the training spots.

* :func:`embed_patches` -- image embeddings and pooled features of uint8 patches, no augmentation;
* :func:`build_bank_and_probe` -- the bank (embeddings + panel expression of every training spot)
  and the probe (``training.probe_context``, engine/context.py) stored in the final checkpoint;
* :func:`refit_probe` -- a stored probe fitted again without retraining (``training/refit_probe.py``);
* :func:`save_final` -- ``model.pt`` itself (:func:`napari_comtip.model.checkpoint.save_checkpoint`);
* :func:`panel_rule_text` -- the gene panel rule in words, stored with the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..constants import Default
from .context import context_features_grouped, fit_context_probe
from .data import TrainingSet, build_training_set
from .embedding_cache import model_img_size
from .run_config import DataConfig, RunConfig
from .zero_shot_spread import EXTRAS_KEY as SPREAD_KEY
from .zero_shot_spread import fit_spread


@torch.no_grad()
def embed_patches(model, patches: np.ndarray, device: torch.device, batch_size: int = 128,
                  features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalised image embeddings (and the probe's features) of uint8 patches, no augmentation."""
    model.eval()
    embs, feats = [], []
    for s in range(0, len(patches), batch_size):
        x = torch.from_numpy(np.asarray(patches[s:s + batch_size])).to(device)
        x = model.preprocess(x)
        if features:  # one ViT pass for both
            e, f = model.encode_image_and_features(x)
            feats.append(f.float().cpu())
        else:
            e = model.encode_image(x)
        embs.append(e.float().cpu())
    e = torch.cat(embs).numpy()
    f = torch.cat(feats).numpy() if features else None
    return e, f


def reading_set(model, ts: TrainingSet, samples: Sequence | None = None) -> TrainingSet:
    """The labelled spots of ``ts`` as the model reads them at inference: ``ts`` itself when its
    patches are at the model's reading side (``model.input_px``), else the same spots of ``samples``
    read again at that side (``vision.morphology_px``: training patches are at ``img_size``)."""
    side = model_img_size(model)
    if ts.patches.shape[1] == side:
        return ts
    if samples is None:
        raise ValueError(f"the training patches are {ts.patches.shape[1]} px but the model reads {side} px: "
                         "pass the samples so that the probe's spots can be read at that side")
    out = build_training_set(samples, DataConfig(unlabelled=False), patch_um=model.config.patch_um, img_size=side,
                             panel=ts.panel)
    if list(out.spot_ids) != list(ts.spot_ids):
        raise ValueError("the samples given do not hold the training set's spots")
    return out


def build_bank_and_probe(model, ts: TrainingSet, device, cfg: RunConfig, samples: Sequence | None = None) -> dict[str, Any]:
    """The retrieval bank and probe stored inside ``model.pt`` (see model/checkpoint.py), from the
    spots of ``ts`` read as the model reads them (:func:`reading_set`; ``samples`` are needed only
    when that side differs from the training patches')."""
    ts = reading_set(model, ts, samples)
    emb, feats = embed_patches(model, ts.patches, device, features=cfg.training.probe)
    extras: dict[str, Any] = {}
    if cfg.training.bank:
        extras["bank"] = {
            "emb": torch.from_numpy(emb).half(),
            "expr": torch.from_numpy(ts.expr).half(),
            "ids": list(ts.spot_ids),
            "samples": list(ts.names),
            "source": "training spots (no augmentation)",
        }
    if cfg.training.probe:
        alpha = cfg.training.probe_alpha
        # 0 = automatic: exact leave-one-out over the training spots (the floor's rule, see
        # predictors.loo_ridge_alpha); a leave-one-section-out choice over-regularised (docs/results.md)
        ctx = cfg.training.probe_context
        x = context_features_grouped(feats, ts.centres_rc, ts.sample_of, ctx)
        probe = fit_context_probe(x, ts.expr, ctx, ts.centres_rc, ts.sample_of, alpha=alpha if alpha > 0 else None,
                                  genes=ts.panel).to_dict()
        probe["source"] = "training spots (no augmentation)"
        probe["context"] = ctx
        extras["probe"] = probe
    spread = fit_zero_shot_spread(model, emb, ts, source="training spots (no augmentation)")
    if spread is not None:
        extras[SPREAD_KEY] = spread
    return extras


def fit_zero_shot_spread(model, emb: np.ndarray, ts: TrainingSet, *, source: str,
                         context: str = Default.ZERO_SHOT_CONTEXT) -> dict[str, Any] | None:
    """Zero-shot's residual spread (engine/zero_shot_spread.py) on the labelled spots of ``ts``
    from their image embeddings ``emb`` (each section in its own spatial ``context``, as zero-shot
    predicts); None for a model without zero-shot (text.mode names)."""
    if not model.text.encodes_values or ts.n_spots < 2:
        return None
    from . import predictors
    from .context import embedding_context_grouped

    x = embedding_context_grouped(emb, ts.centres_rc, ts.sample_of, context)
    entry: dict[str, Any] = fit_spread(predictors.zero_shot(model, x), ts.expr)
    entry.update(context=context, n_spots=int(ts.n_spots), source=source, samples=list(ts.names))
    return entry


def refit_probe(checkpoint: str | os.PathLike, samples: Sequence, *, device: str = "auto", alpha: float | None = None,
                note: dict | None = None, context: str = Default.PROBE_CONTEXT,
                reading: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-fit the ridge probe stored in ``checkpoint`` on ``samples`` (loaded SpatialSamples with
    expression), in place and atomically, and zero-shot's residual spread on the same spots; the
    encoder and config are not touched. The retrieval bank is re-embedded when it holds exactly
    these spots (its embeddings then follow the model's current reading, e.g. ``vision.test_views``);
    a bank of other spots is kept as it is. ``reading``: first switch how the model reads a
    patch (``model.config.READING_KEYS`` keys, e.g. ``{"vision.test_views": 8}``); the file is
    written once, with the new reading and everything fitted on it.

    For a checkpoint trained before the current probe rule, or to move its probe to other
    labelled sections. ``alpha=None``: leave-one-out choice (:func:`predictors.loo_ridge_alpha`).
    Returns the new probe's alpha and per-alpha scores.
    """
    from ..model.checkpoint import load_checkpoint, update_checkpoint
    from ..model.config import apply_reading
    from .device import resolve_device

    ck = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    cfg = ck.model.config = apply_reading(ck.model.config, reading)  # refused before any work
    ts = build_training_set(samples, DataConfig(unlabelled=False), patch_um=cfg.patch_um,
                            img_size=ck.model.input_px, panel=ck.gene_panel)
    ck.model.to(dev)
    emb, feats = embed_patches(ck.model, ts.patches, dev)
    x = context_features_grouped(feats, ts.centres_rc, ts.sample_of, context)
    probe = fit_context_probe(x, ts.expr, context, ts.centres_rc, ts.sample_of, alpha=alpha, genes=ts.panel).to_dict()
    source = f"spots of {', '.join(ts.names)} (no augmentation)"
    probe["source"] = source
    probe["context"] = context
    spread = fit_zero_shot_spread(ck.model, emb, ts, source=source)
    bank = None
    if ck.bank is not None and list(ck.bank.ids) == list(ts.spot_ids):
        bank = {"emb": torch.from_numpy(emb).half(), "expr": ck.bank.expr.half(), "ids": list(ck.bank.ids),
                **ck.bank.meta}
    what = ("reading switched, " if reading else "") + "probe re-fitted" + (", bank re-embedded" if bank else "") \
        + (", zero-shot spread fitted" if spread else "")
    update_checkpoint(checkpoint, probe=probe, bank=bank, extras=None if spread is None else {SPREAD_KEY: spread},
                      reading=reading, note=dict(note or {}, what=what, samples=list(ts.names), n_spots=ts.n_spots,
                                                 alpha=probe["alpha"], alpha_rule=probe["alpha_rule"],
                                                 **({"reading": dict(reading)} if reading else {})))
    return {"alpha": probe["alpha"], "alpha_scores": probe["alpha_scores"], "n_spots": ts.n_spots,
            "bank_reembedded": bank is not None, "zero_shot_spread": spread is not None}


def panel_rule_text(dc: DataConfig) -> str:
    """The panel rule of :func:`engine.data.select_gene_panel` with this config's numbers."""
    return (f"genes present in all training sections and detected in >= {dc.min_spot_frac:.0%} of training spots; "
            f"top {dc.n_hvg} by Seurat normalised dispersion of the pooled log-normalised training spots, "
            f"plus the top {dc.n_mean} by mean log-normalised expression (union)")


def save_final(path: Path, model, panel: Sequence[str], extras: dict[str, Any], *, fp16: bool) -> None:
    """Write ``model.pt``: the weights (fp16 storage when ``fp16``), the panel, the bank and probe in ``extras``."""
    from ..model.checkpoint import save_checkpoint

    save_checkpoint(path, model, model.config, panel, extras=extras, half=fp16)


__all__ = ["embed_patches", "build_bank_and_probe", "fit_zero_shot_spread", "refit_probe", "save_final", "panel_rule_text"]
