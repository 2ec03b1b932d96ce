"""The run config of ``comtip pretrain``: model preset + overrides, the ``data`` and ``training`` sections.

A YAML file (``training/configs/*.yaml``) or a preset, plus ``--set KEY=VALUE`` overrides, becomes
one :class:`RunConfig`. Every section is read by the same rule as the model config
(:func:`napari_comtip.model.config.apply_mapping`: unknown keys refused, values coerced to the
field's type) and range-checked from the one table of :mod:`napari_comtip.model.config_checks`;
an error names the key and where the value came from (the file, the preset, or ``--set``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..constants import Default
from ..errors import ConfigError
from ..model.config import ComtipConfig, apply_mapping
from ..model.presets import DEFAULT_PRESET, preset_sections
from ..model.config_checks import check_ranges
from .context import CONTEXTS

#: ``data.sentence_sampler``: weighted towards expressed genes, the same genes for the whole batch
#: (weighted by how often each is detected in it), or the model's own sampler.
SENTENCE_SAMPLERS = ("expressed", "shared", "uniform")
#: ``data.expression_only_sampler``: the run's sentence sampler, or one gene set per view for the batch
EXPRESSION_ONLY_SAMPLERS = ("run", "shared")
#: ``data.batches``: each batch drawn from all training spots, or from one section's spots only (so
#: that InfoNCE's negatives share the positive's stain and patient, engine/batches.py ``section_batches``)
BATCH_MODES = ("mixed", "per_section")
#: ``training.amp``: bf16 autocast on CUDA ("auto"), always, or never.
AMP_MODES = ("auto", "bf16", "off")
_TOP_KEYS = ("preset", "model", "data", "training")


@dataclass
class DataConfig:
    """The ``data:`` section of a training config (see training/configs/*.yaml)."""

    n_hvg: int = 1000  # panel: top-N by normalised dispersion
    n_mean: int = 250  # panel: plus top-N by mean log-normalised expression
    min_spot_frac: float = 0.01  # panel: gene detected in at least this fraction of training spots
    min_shared_genes: float = 0.5  # a training sample must carry this fraction of the panel
    unlabelled: bool = True  # vision-only tissue patches for the MFM term
    unlabelled_per_sample: int = 1500  # cap on unlabelled tissue patches per sample
    unlabelled_batch: int = 32  # vision-only patches per step
    tissue_frac: float = 0.5  # unlabelled patch must be at least this fraction tissue
    # slides read for their tissue alone (MFM and model.w_image_ssl): every readable sample of each
    # path adds up to unlabelled_per_sample unlabelled patches, spots included; its counts are not read
    tissue_only: list[str] = dataclasses.field(default_factory=list)
    # expression without images (model.w_text_ssl only): data sets whose spots' counts train the gene
    # sentences (a legacy ST folder of counts and spot tables, an .h5ad of counts, or any readable sample)
    expression_only: list[str] = dataclasses.field(default_factory=list)
    expression_only_batch: int = 64  # spots per step of the expression-only term (drawn from all expression)
    # its sentences: "run" (data.sentence_sampler) or "shared" (one gene set per view for the whole batch,
    # so a spot's two views share no gene identity the term could match them by: only values)
    expression_only_sampler: str = "run"
    # augmentation
    flips: bool = True
    rot90: bool = True
    hed_sigma: float = 0.05  # HED stain jitter: per-channel scale ~ 1 + N(0, sigma)
    hed_bias: float = 0.02  # and shift ~ N(0, bias) in optical density
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    # gene sentences (names+values mode); lengths / single-gene share come from model.text
    # "expressed": each spot's genes weighted towards its expressed ones; "shared": one gene set for the
    # whole batch, so its sentences differ only by their values (engine/batches.py); "uniform": the model's sampler
    sentence_sampler: str = "expressed"
    expressed_weight: float = 10.0  # "expressed": sampling weight of an expressed gene (a zero has 1)
    batches: str = "mixed"  # BATCH_MODES: a batch's spots from every section, or from one section

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainingConfig:
    """The ``training:`` section of a config file."""

    epochs: int = 40
    batch_size: int = 64  # per process
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    seed: int = 0
    checkpoint_every: int = 200  # steps
    keep_checkpoints: int = 2
    num_workers: int = 0  # DataLoader workers (0 = in the main process; CUDA: 4 is a good start)
    threads: int = 0  # CPU threads per process (0 = all cores / processes)
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    compile: bool = False  # torch.compile the model (CUDA)
    bank: bool = True  # store the retrieval bank in model.pt
    probe: bool = True  # fit and store the ridge probe in model.pt
    probe_alpha: float = 0.0  # ridge penalty of the stored probe; 0 = choose by leave-one-out on the training spots
    probe_context: str = Default.PROBE_CONTEXT  # the probe's input (engine/context.py): none, section, neighbours
    emb_std_every: int = 1  # compute img_emb_std every N steps (it costs no extra forward pass)
    feature_cache: bool = True  # a fixed ViT (model.vision.freeze: true): its features once per patch view (engine/feature_cache.py)
    feature_views: int = 4  # augmented views per patch with the feature cache; epoch e uses view e mod this
    fp16_final: bool = True  # store model.pt weights in fp16

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    """A whole training config: model preset + overrides, data and training sections."""

    preset: str = "tiny"
    model: Any = None  # ComtipConfig
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    source: str | None = None  # the YAML file it came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "training": self.training.to_dict(),
        }


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: Iterable[str] | None) -> dict:
    """``["training.lr=1e-3", "model.vision.img_size=64"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", hint="e.g. --set training.lr=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or key.split(".")[0] not in _TOP_KEYS:
            raise ConfigError(f"--set key {key!r} must start with one of {', '.join(_TOP_KEYS)}",
                              hint="e.g. --set model.mask_ratio=0.6 or --set training.epochs=5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out = _merge(out, _nest(key, value))
    return out


def _choice(key: str, value: str, allowed: Iterable[str], path) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}", path=path)


def _section(obj, d, name: str, path):
    """Fill one section with the model config's rule, then check its ranges; errors name ``path``."""
    try:
        apply_mapping(obj, d or {}, prefix=f"{name}.")
        check_ranges(obj, prefix=f"{name}.")
    except ConfigError as exc:
        raise ConfigError(str(exc).rstrip("."), path=path) from None
    return obj


def _mapping(d: dict, name: str, path) -> dict:
    sec = d.get(name) or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"section {name!r} must be a mapping", path=path)
    return sec


def run_config_from_dict(d: dict | None, path=None) -> RunConfig:
    """Build a :class:`RunConfig`; unknown keys and bad values raise :class:`ConfigError` naming key and ``path``."""
    d = dict(d or {})
    for k in d:
        if k not in _TOP_KEYS:
            raise ConfigError(f"unknown config key {k!r}", path=path,
                              hint=f"top-level keys are {', '.join(_TOP_KEYS)}")
    preset = str(d.get("preset") or DEFAULT_PRESET)
    try:
        base = preset_sections(preset)  # the preset's model, data and training sections (package data)
    except ConfigError as exc:
        raise ConfigError(str(exc).rstrip("."), path=path) from None
    model_over = d.get("model") or {}
    if not isinstance(model_over, dict):
        raise ConfigError("section 'model' must be a mapping", path=path)
    try:
        model_cfg = ComtipConfig.from_dict(_merge(base["model"], model_over))
    except ConfigError as exc:
        msg = str(exc).rstrip(".")
        msg = re.sub(r"config key '([^']+)'", r"config key 'model.\1'", msg)
        raise ConfigError(msg, path=path) from None
    data = _section(DataConfig(), _merge(base["data"], _mapping(d, "data", path)), "data", path)
    _choice("data.sentence_sampler", data.sentence_sampler, SENTENCE_SAMPLERS, path)
    _choice("data.expression_only_sampler", data.expression_only_sampler, EXPRESSION_ONLY_SAMPLERS, path)
    _choice("data.batches", data.batches, BATCH_MODES, path)
    training = _section(TrainingConfig(), _merge(base["training"], _mapping(d, "training", path)), "training", path)
    _choice("training.probe_context", training.probe_context, CONTEXTS, path)
    _choice("training.amp", training.amp, AMP_MODES, path)
    return RunConfig(preset=preset, model=model_cfg, data=data, training=training,
                     source=None if path is None else str(path))


def load_run_config(path: str | os.PathLike | None, overrides: Iterable[str] | dict | None = None, *,
                    preset: str | None = None) -> RunConfig:
    """Read a YAML training config, or take the named ``preset`` (the ``tiny`` one when neither is given)."""
    import yaml

    d: dict = {}
    if preset is not None:
        if path is not None:
            raise ConfigError("give --preset or --config, not both",
                              hint=f"a config file starts from a preset with a line 'preset: {preset}'")
        d = {"preset": str(preset)}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", path=p, hint="see training/configs/ for examples")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"not valid YAML{where}", path=p, hint="fix the syntax") from None
        if not isinstance(d, dict):
            raise ConfigError("a config file must be a YAML mapping", path=p)
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    # an error names its real source: the file (or preset) when it is bad alone, else --set
    source = path if path is not None else ("--preset" if preset is not None else "the default preset")
    if not over:
        cfg = run_config_from_dict(d, path=source)
    else:
        try:
            cfg = run_config_from_dict(_merge(d, over), path="--set")
        except ConfigError:
            run_config_from_dict(d, path=source)  # raises when the file is the culprit
            raise
    cfg.source = None if path is None else str(path)
    return cfg


def save_run_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically (the run folder's ``config.yaml``)."""
    import yaml

    from .run_folder import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def with_overrides(cfg: RunConfig, over: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with dotted overrides (``{"model.w_mfm": 0.0, "data.unlabelled": False}``)."""
    d = cfg.to_dict()
    for key, value in over.items():
        d = _merge(d, _nest(key, value))
    return run_config_from_dict(d, path=cfg.source)


__all__ = ["DataConfig", "TrainingConfig", "RunConfig", "SENTENCE_SAMPLERS", "AMP_MODES", "parse_overrides",
           "run_config_from_dict", "load_run_config", "save_run_config", "with_overrides"]
