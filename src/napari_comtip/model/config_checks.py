"""Range checks of every numeric configuration value: one table, checked at load time.

Type checking (``'abc'`` for an int) happens while a config is parsed (``config.apply_mapping``,
for the model and for the run config's sections); this table says which *values* can work, e.g. a batch size of -8
(which made pretraining loop forever) or a learning rate of -1. Each row is
``dotted key -> Range``; a new config key gets a row here and is checked everywhere a config is
loaded (model section in :meth:`ComtipConfig.validate`, the ``data`` and ``training`` sections in
``engine.run_config.run_config_from_dict``). Keys whose value may be ``None`` are skipped when None.

The error names the key, the allowed range and, through ``source``, where the value came from
(``--set``, the YAML file, or a preset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Range:
    """``lo <= value <= hi`` (``lo_open``/``hi_open`` make that end strict); None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "finite"


def _ge(x: float) -> Range:
    return Range(lo=x)


def _gt(x: float) -> Range:
    return Range(lo=x, lo_open=True)


_UNIT = Range(0.0, 1.0)  # a fraction, both ends allowed
_UNIT_OPEN_TOP = Range(0.0, 1.0, hi_open=True)

#: Every numeric config value and the values it may take (model keys are relative to ``model.``).
RANGES: dict[str, Range] = {
    # ---- model (ComtipConfig)
    "embed_dim": _ge(1),
    "mask_ratio": Range(0.0, 1.0, lo_open=True, hi_open=True),
    "w_mfm": _ge(0),
    "w_paat": _ge(0),
    "w_profile": _ge(0),
    "w_grid": _ge(0),
    "w_text_ssl": _ge(0),
    "w_image_ssl": _ge(0),
    "image_ssl.momentum": _UNIT_OPEN_TOP,
    "image_ssl.dim": _ge(1),
    "image_ssl.crop_scale": Range(0.0, 1.0, lo_open=True),
    "init_temperature": _gt(0),
    "max_logit_scale": _gt(0),
    "patch_um": _gt(0),
    "target_sum": _gt(0),
    "n_genes_hint": _ge(1),
    "vision.img_size": _ge(8),
    "vision.drop_path_rate": _UNIT_OPEN_TOP,
    "vision.morphology_px": _ge(0),
    "text.fourier_features": _ge(1),
    "text.fourier_max_freq": _gt(0),
    "text.value_bins": _ge(2),
    "text.value_max": _gt(0),
    "text.width": _ge(1),
    "text.depth": _ge(1),
    "text.heads": _ge(1),
    "text.mlp_ratio": _gt(0),
    "text.dropout": _UNIT_OPEN_TOP,
    "text.top_k": _ge(1),
    "text.min_genes": _ge(1),
    "text.max_genes": _ge(1),
    "text.p_single": _UNIT,
    "text.expressed_weight": _gt(0),
    "text.values_mlp_layers": _ge(1),
    "mask.generator_heads": _ge(0),
    "mask.generator_mlp_ratio": _gt(0),
    "paat.n_negatives": _ge(1),
    "paat.w_discriminator": _ge(0),
    "paat.adv_epsilon": _ge(0),
    "paat.w_adversarial": _ge(0),
    "zero_shot.grid": _ge(2),
    "zero_shot.temperature": _gt(0),
    "zero_shot.default_max": _gt(0),
    "zero_shot.chunk": _ge(1),
    "zero_shot.train_genes": _ge(1),
    "zero_shot.train_sigma": _ge(0),
    # ---- data (engine.run_config.DataConfig)
    "data.n_hvg": _ge(0),
    "data.n_mean": _ge(0),
    "data.min_spot_frac": _UNIT,
    "data.min_shared_genes": _UNIT,
    "data.unlabelled_per_sample": _ge(0),
    "data.unlabelled_batch": _ge(0),
    "data.expression_only_batch": _ge(1),
    "data.tissue_frac": _UNIT,
    "data.hed_sigma": _ge(0),
    "data.hed_bias": _ge(0),
    "data.brightness": _UNIT,
    "data.contrast": _UNIT,
    "data.saturation": _UNIT,
    "data.expressed_weight": _gt(0),
    # ---- training (engine.run_config.TrainingConfig)
    "training.epochs": _ge(1),
    "training.batch_size": _ge(2),  # InfoNCE needs at least one negative in the batch
    "training.lr": _gt(0),
    "training.weight_decay": _ge(0),
    "training.warmup_steps": _ge(0),
    "training.min_lr_ratio": _UNIT,
    "training.grad_clip": _ge(0),
    "training.seed": _ge(0),
    "training.checkpoint_every": _ge(1),
    "training.keep_checkpoints": _ge(1),
    "training.num_workers": _ge(0),
    "training.threads": _ge(0),
    "training.probe_alpha": _ge(0),
    "training.emb_std_every": _ge(1),
    "training.feature_views": _ge(1),
}


def _lookup(obj: Any, dotted: str) -> tuple[bool, Any]:
    cur = obj
    for part in dotted.split("."):
        if not hasattr(cur, part):
            return False, None
        cur = getattr(cur, part)
    return True, cur


def check_ranges(obj: Any, *, prefix: str = "", source: str | None = None,
                 label: str = "") -> None:
    """Check the table's rows under ``prefix`` against the (dataclass) ``obj``; ConfigError on the first bad one.

    ``prefix`` selects the rows (``""`` = model rows without a section, ``"training."``...);
    ``label`` is prepended to the key
    in the message (``"model."``); ``source`` says where the value came from.
    """
    for key, rng in RANGES.items():
        if prefix:
            if not key.startswith(prefix):
                continue
            rel = key[len(prefix):]
        else:
            if key.split(".")[0] in ("data", "training"):
                continue
            rel = key
        found, value = _lookup(obj, rel)
        if not found or value is None or isinstance(value, bool):
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if not rng.ok(v):
            where = f" (from {source})" if source else ""
            raise ConfigError(f"config key '{label}{key}' must be {rng.text()}, got {value!r}{where}",
                              hint="fix the value in the config file or in --set")


def fully_frozen(freeze) -> bool:
    """True for ``vision.freeze: true`` and ``freeze: 0`` (no block trains): what the config's
    checks, the model and the feature cache all mean by a frozen ViT."""
    if isinstance(freeze, bool):
        return freeze
    return int(freeze) == 0


__all__ = ["Range", "RANGES", "check_ranges", "fully_frozen"]
