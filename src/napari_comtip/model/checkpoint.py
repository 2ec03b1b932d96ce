"""The one checkpoint object: resolve (a bundled name or a path), load, digest, typed bank and probe.

A checkpoint file is a ``torch.save`` of plain dicts, lists, strings, numbers and tensors.
Everything in it loads with ``torch.load(..., weights_only=True)`` (no pickled Python objects),
so opening a checkpoint from someone else cannot run code. Layout (``FORMAT_VERSION`` 1)::

    format            "napari-comtip-checkpoint"
    format_version    1
    package_version   napari-comtip version that wrote it
    config            ComtipConfig.to_dict() (every hyperparameter, model version included)
    gene_panel        [symbol, ...] in model order
    normalization     {"target_sum": 1e4, "log1p": True}
    patch_um          physical side of a spot patch in micrometres
    state_dict        weights (float16 when saved with half=True; restored to float32 on load)
    storage_dtype     "float32" | "float16"
    provenance        training provenance (data, steps, seed, metrics, versions ...)
    bank              None | {"emb": (M, D) fp16, "expr": (M, G) fp16, "ids": [str], ...}
    probe             None | {"weight": (F, G'), "bias": (G',), "mean": (F,), "std": (F,), "genes": [...],
                              "alpha": a, "context": "none" | ..., ...}
    extras            any other primitive data, e.g. "evaluation" (training/store_evaluation.py)

:func:`model.bundled.resolve_checkpoint` is the one place a checkpoint argument (None = the
default bundled one, a bundled name, or a path) becomes a file, and the one place its existence is
checked; every reader here goes through it. :func:`load_checkpoint` returns a :class:`Checkpoint` (model, panel,
path, digest, :class:`Bank`, :class:`StoredProbe`, metadata). Files are written to a temporary
file in the target folder and renamed (``os.replace``). The digest and the conversion to
weights_only-safe primitives are in :mod:`model.checkpoint_file`.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..io.writers import atomic_replace
from .bundled import checkpoint_name, resolve_checkpoint
from .checkpoint_file import checkpoint_digest, to_primitive, torch_save
from .comtip import CoMTIP
from .config import MODEL_VERSION, ComtipConfig, apply_reading

FORMAT = "napari-comtip-checkpoint"
FORMAT_VERSION = 1
#: kept in float32 even in half-precision storage (tiny, and fp16 would lose their meaning)
_KEEP_FP32 = ("logit_scale", "value_lo", "value_hi", "value_mu", "value_sd")
#: extras key of zero-shot's residual spread (written by engine/bank_probe.py)
ZERO_SHOT_SPREAD_KEY = "zero_shot_spread"


@dataclass
class Bank:
    """A retrieval reference bank: image embeddings and the expression of the same spots."""

    emb: torch.Tensor  # (M, D) float32
    expr: torch.Tensor  # (M, G) float32, log-normalised, panel order
    ids: list[str]
    meta: dict = field(default_factory=dict)


@dataclass
class StoredProbe:
    """The ridge probe stored in a checkpoint: y = ((x - mean) / std) @ weight + bias.

    ``x`` is the pooled image features in ``context`` (engine/context.py); the fields are the
    ones :func:`engine.predictors.probe_predict` applies. ``genes``: the output columns (None:
    the checkpoint's panel).
    """

    weight: np.ndarray  # (F, G') float32
    bias: np.ndarray  # (G',)
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)
    alpha: float
    genes: list[str] | None = None
    context: str = "none"
    meta: dict = field(default_factory=dict)  # alpha_rule, alpha_scores, source

    @classmethod
    def from_entry(cls, d: dict) -> StoredProbe:
        d = dict(d)

        def arr(name: str) -> np.ndarray:
            return d.pop(name).float().numpy()

        weight, bias, mean, std = arr("weight"), arr("bias"), arr("mean"), arr("std")
        genes = d.pop("genes", None)
        return cls(weight, bias, mean, std, float(d.pop("alpha")), None if genes is None else [str(g) for g in genes],
                   str(d.pop("context", None) or "none"), d)

    def to_dict(self) -> dict:
        """The checkpoint entry (see :func:`update_checkpoint`)."""
        return {"weight": torch.from_numpy(self.weight), "bias": torch.from_numpy(self.bias),
                "mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std), "alpha": float(self.alpha),
                "genes": self.genes, "context": self.context, **self.meta}


@dataclass
class Checkpoint:
    """A loaded checkpoint: an eval-mode model and everything stored beside it."""

    model: CoMTIP
    config: ComtipConfig
    gene_panel: list[str]
    path: Path
    digest: str  # first 16 hex digits of the file's SHA-256
    name: str | None = None  # the bundled name, for a bundled checkpoint
    bank: Bank | None = None
    probe: StoredProbe | None = None
    meta: dict = field(default_factory=dict)  # provenance, extras, normalization, patch_um, versions ...

    @property
    def label(self) -> str:
        """How messages name it: the bundled name, else the file name."""
        return self.name or self.path.name

    @property
    def provenance(self) -> dict:
        return self.meta.get("provenance") or {}

    @property
    def zero_shot_spread(self) -> dict | None:
        """Zero-shot's residual spread per gene (``extras["zero_shot_spread"]``, engine/zero_shot_spread.py), or None."""
        return (self.meta.get("extras") or {}).get(ZERO_SHOT_SPREAD_KEY)

    @property
    def evaluation(self) -> dict:
        """The held-out evaluation of its recipe (``extras["evaluation"]``), or {}."""
        return (self.meta.get("extras") or {}).get("evaluation") or {}


# ---------------------------------------------------------------------------- save
def _bank_entry(bank: Any, n_genes: int, dim: int) -> dict:
    """Normalise a bank to {"emb" (M, D) fp16, "expr" (M, G) fp16, "ids" [str], other metadata}."""
    if isinstance(bank, Bank):
        bank = {"emb": bank.emb, "expr": bank.expr, "ids": bank.ids, **bank.meta}
    bank = to_primitive(dict(bank), "bank")
    emb, expr = bank.get("emb"), bank.get("expr")
    if not isinstance(emb, torch.Tensor) or not isinstance(expr, torch.Tensor):
        raise ValueError("extras['bank'] needs tensors 'emb' (M, D) and 'expr' (M, G)")
    if emb.ndim != 2 or emb.shape[1] != dim or tuple(expr.shape) != (emb.shape[0], n_genes):
        raise ValueError(f"bank shapes emb {tuple(emb.shape)}, expr {tuple(expr.shape)} do not fit D={dim}, G={n_genes}")
    ids = [str(i) for i in bank.get("ids", range(emb.shape[0]))]
    if len(ids) != emb.shape[0]:
        raise ValueError("bank ids must have one entry per bank row")
    bank.update(emb=emb.to(torch.float16), expr=expr.to(torch.float16), ids=ids)
    return bank


def save_checkpoint(
    path: str | os.PathLike,
    model: CoMTIP,
    config: ComtipConfig | None = None,
    gene_panel: Sequence[str] | None = None,
    extras: dict | None = None,
    *,
    half: bool = False,
) -> Path:
    """Write ``model`` (+ config, panel, provenance, optional bank/probe) atomically to ``path``.

    ``extras`` keys with a meaning: ``provenance`` (dict), ``bank`` ({emb, expr, ids} or
    :class:`Bank`), ``probe`` (dict of tensors, see engine.predictors.Probe.to_dict),
    ``normalization`` (overrides the config's); ``training`` is taken as the provenance when no
    ``provenance`` is given; any other key goes to ``extras``.
    ``half=True`` stores floating weights as float16 (half the file size, for shipping); a model
    already converted with ``.half()`` is stored as float16 too. Loading restores float32.
    """
    path = Path(path)
    cfg = model.config
    if config is not None and _arch_dict(config) != _arch_dict(cfg):
        diff = sorted(k for k, v in _flat(_arch_dict(config)).items() if _flat(_arch_dict(cfg)).get(k) != v)
        raise ValueError(f"config differs from the model's own config at {', '.join(diff[:8])}; pass model.config")
    if gene_panel is not None and [str(g) for g in gene_panel] != model.gene_panel:
        raise ValueError("gene_panel differs from the panel the model was built for")
    extras = dict(extras or {})
    raw = model.state_dict()
    half = half or any(v.dtype == torch.float16 for v in raw.values())
    state = {}
    for k, v in raw.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float() if k.endswith(_KEEP_FP32) else v.to(torch.float16 if half else torch.float32)
        state[k] = v.clone()
    from .. import __version__

    normalization = {"target_sum": float(cfg.target_sum), "log1p": bool(cfg.log1p)}
    normalization.update(to_primitive(extras.pop("normalization", {}) or {}, "normalization"))
    bank = extras.pop("bank", None)
    probe = extras.pop("probe", None)
    provenance = extras.pop("provenance", None)
    if provenance is None:
        provenance = extras.pop("training", None)
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_version": MODEL_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "gene_panel": list(model.gene_panel),
        "normalization": normalization,
        "patch_um": float(cfg.patch_um),
        "storage_dtype": "float16" if half else "float32",
        "state_dict": state,
        "provenance": to_primitive(provenance or {}, "provenance"),
        "bank": None if bank is None else _bank_entry(bank, model.n_genes, model.embed_dim),
        "probe": None if probe is None else to_primitive(probe, "probe"),
        "extras": to_primitive(extras, "extras"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: torch_save(blob, tmp))  # a full disk: the old file stays, one OSError
    return path


def _arch_dict(cfg: ComtipConfig) -> dict:
    d = cfg.to_dict()
    d["vision"].pop("mean", None)  # resolved by the model when None
    d["vision"].pop("std", None)
    return d


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------- read
def read_checkpoint(checkpoint: str | os.PathLike | None, map_location: str | torch.device = "cpu", *,
                    mmap: bool = False) -> dict:
    """The raw checkpoint dict of a bundled name or a path, validated as ours and of this format
    version. ``mmap=True`` maps the tensors instead of reading them (cheap metadata reads)."""
    path = resolve_checkpoint(checkpoint)
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(
            "not a PyTorch checkpoint file (or it is truncated)", path=path, hint="use a .pt file written by `comtip pretrain`"
        )
    try:
        blob = torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(
            "not a napari-comtip checkpoint (it contains pickled Python objects, which are not loaded for safety)",
            path=path,
            hint="use a checkpoint written by `comtip pretrain`",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"not a PyTorch checkpoint file or it is damaged ({type(exc).__name__})",
            path=path,
            hint="use a .pt file written by `comtip pretrain`",
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            "not a napari-comtip checkpoint (no 'format' marker)",
            path=path,
            hint="use a checkpoint written by `comtip pretrain`; plain timm/ViT weights go into the config's vision.weights",
        )
    ver = blob.get("format_version")
    if ver != FORMAT_VERSION:
        if isinstance(ver, int) and ver > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format {ver} is newer than this napari-comtip reads ({FORMAT_VERSION})",
                path=path,
                hint="upgrade napari-comtip (pip install -U napari-comtip)",
            )
        raise CheckpointError(
            f"checkpoint format {ver} is older than this napari-comtip reads ({FORMAT_VERSION})",
            path=path,
            hint="re-train with `comtip pretrain` or use the napari-comtip release that wrote it",
        )
    for key in ("config", "gene_panel", "state_dict"):
        if key not in blob:
            raise CheckpointError(f"checkpoint is incomplete (no {key!r})", path=path, hint="re-save it with `comtip pretrain`")
    return blob


def update_checkpoint(path: str | os.PathLike, *, probe: dict | None = None, extras: dict | None = None,
                      note: dict | None = None, bank: dict | None = None, reading: dict | None = None) -> Path:
    """Rewrite ``path`` atomically with a new ``probe`` entry, a new ``bank`` (same shape rules as
    at saving), merged ``extras`` (primitives, e.g. ``{"evaluation": ...}``) and/or new values of
    config keys in ``READING_KEYS`` (``reading``, e.g. ``{"vision.test_views": 8}``: how the model
    reads a patch at inference; re-fit the probe after it); the weights are untouched.

    ``note`` (primitives) is appended to ``provenance["updates"]`` so the file says when and how
    it was changed after training.
    """
    path = resolve_checkpoint(path)  # a bundled name is rewritten where it lies, never in the cwd
    blob = read_checkpoint(path)
    cfg = ComtipConfig.from_dict(blob["config"])
    if reading:
        cfg = apply_reading(cfg, reading)
        blob["config"] = cfg.to_dict()
    if probe is not None:
        blob["probe"] = to_primitive(probe, "probe")
    if bank is not None:  # the shapes the model has: its panel and its shared-space width
        blob["bank"] = _bank_entry(bank, len(blob["gene_panel"]), int(cfg.embed_dim))
    if extras:
        blob["extras"] = dict(blob.get("extras") or {}, **to_primitive(extras, "extras"))
    prov = dict(blob.get("provenance") or {})
    updates = list(prov.get("updates") or [])
    updates.append(to_primitive(dict(note or {}, at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
                              "note"))
    prov["updates"] = updates
    blob["provenance"] = prov
    atomic_replace(path, lambda tmp: torch.save(blob, tmp))
    return path


def load_checkpoint(
    checkpoint: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    *,
    expected_panel: Sequence[str] | None = None,
) -> Checkpoint:
    """Load a checkpoint (a path, a bundled name, or None: the default bundled one) into an
    eval-mode model on ``map_location``.

    Raises CheckpointError for a missing/foreign/damaged file, another format or model version,
    or (with ``expected_panel``) a checkpoint trained on another gene panel.
    """
    path = resolve_checkpoint(checkpoint)
    blob = read_checkpoint(path, map_location="cpu")
    try:
        config = ComtipConfig.from_dict(blob["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config cannot be used: {exc}", path=path) from None
    panel = [str(g) for g in blob["gene_panel"]]
    if expected_panel is not None:
        _check_panel(path, panel, [str(g) for g in expected_panel])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in blob["state_dict"].items()}
    from .factory import build_model

    try:
        model = build_model(config, panel, name_embeddings=state.get("text.name_emb"), load_weights=False)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ConfigError) as exc:
        first = str(exc).splitlines()[0][:300]
        raise CheckpointError(f"weights do not fit the stored config ({first})", path=path, hint="the file is damaged or was edited; re-save it") from None
    model.eval().to(map_location)
    bank = probe = None
    try:
        if blob.get("bank"):
            b = dict(blob["bank"])
            bank = Bank(emb=b.pop("emb").float(), expr=b.pop("expr").float(), ids=[str(i) for i in b.pop("ids")], meta=b)
        if blob.get("probe"):
            probe = StoredProbe.from_entry(blob["probe"])
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the stored bank or probe is incomplete ({type(exc).__name__}: {exc})", path=path,
                              hint="re-save the checkpoint with `comtip pretrain`") from None
    meta = {
        "format_version": blob["format_version"],
        "model_version": blob.get("model_version"),
        "package_version": blob.get("package_version"),
        "created": blob.get("created"),
        "normalization": blob["normalization"],
        "patch_um": float(blob["patch_um"]),
        "storage_dtype": blob["storage_dtype"],
        "provenance": blob.get("provenance") or {},
        "extras": blob.get("extras") or {},
    }
    return Checkpoint(model=model, config=model.config, gene_panel=panel, path=path, digest=checkpoint_digest(path),
                      name=checkpoint_name(path), bank=bank, probe=probe, meta=meta)


def _check_panel(path: Path, panel: list[str], expected: list[str]) -> None:
    if expected == panel:
        return
    missing = [g for g in expected if g not in set(panel)]
    detail = (
        f"{len(missing)} expected genes are not in it (e.g. {', '.join(missing[:5])})"
        if missing
        else "same genes in another order" if sorted(expected) == sorted(panel) else "it has extra genes"
    )
    raise CheckpointError(
        f"checkpoint was trained on another gene panel ({len(panel)} genes vs {len(expected)} expected; {detail})",
        path=path,
        hint="use the checkpoint that matches this panel, or re-train on it",
    )


__all__ = ["Bank", "Checkpoint", "StoredProbe", "FORMAT_VERSION",
           "load_checkpoint", "read_checkpoint", "save_checkpoint", "update_checkpoint"]
