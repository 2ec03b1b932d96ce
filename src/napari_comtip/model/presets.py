"""The presets: one list of named, complete training recipes, shipped inside the package.

Each ``napari_comtip/presets/<name>.yaml`` is a whole run config (``model``, ``data`` and
``training`` sections, the format of a ``comtip pretrain --config`` file) plus a one-line
``purpose``. A preset may start from another one with a ``preset:`` line, exactly as a user's
config file does. The folder is the only list: ``comtip presets`` prints it, ``comtip pretrain
--preset NAME`` runs one, a config file's ``preset: NAME`` starts from one, the Pretrain widget
offers them, and ``training/configs/*.yaml`` are thin files over them.

:func:`get_preset` returns the model part of a preset as a :class:`ComtipConfig` (a fresh copy);
:func:`preset_sections` the raw sections a run config is merged onto.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

from ..errors import ConfigError
from .config import ComtipConfig

#: The preset a config without a ``preset:`` line starts from (and the widget's first choice).
DEFAULT_PRESET = "tiny"
SECTIONS = ("model", "data", "training")
_MAX_CHAIN = 8


def _folder():
    return resources.files("napari_comtip") / "presets"


@functools.lru_cache(maxsize=1)
def preset_names() -> tuple[str, ...]:
    """Every preset, the default first, then by name."""
    names = sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))
    return tuple(sorted(names, key=lambda n: (n != DEFAULT_PRESET, n)))


def unknown_preset(name: str) -> ConfigError:
    """The one-line refusal of a name that is not a preset."""
    return ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}",
                       hint="`comtip presets` says what each is for")


@functools.lru_cache(maxsize=None)
def _read(name: str) -> dict[str, Any]:
    import yaml

    if name not in preset_names():
        raise unknown_preset(name)
    d = yaml.safe_load((_folder() / f"{name}.yaml").read_text(encoding="utf-8")) or {}
    bad = [k for k in d if k not in (*SECTIONS, "preset", "purpose")]
    if bad or not isinstance(d.get("purpose"), str):  # a packaging error, caught by the tests
        raise ConfigError(f"preset file {name}.yaml is malformed (keys {sorted(d)})")
    return d


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_sections(name: str) -> dict[str, dict]:
    """``{"model": {...}, "data": {...}, "training": {...}}`` of a preset, its ``preset:`` chain resolved."""
    chain, cur = [], name
    while cur is not None:
        if cur in chain or len(chain) >= _MAX_CHAIN:
            raise ConfigError(f"preset {name!r} starts from itself ({' -> '.join([*chain, cur])})")
        chain.append(cur)
        cur = _read(cur).get("preset")
    out: dict[str, dict] = {s: {} for s in SECTIONS}
    for n in reversed(chain):
        d = _read(n)
        for s in SECTIONS:
            out[s] = _merge(out[s], d.get(s) or {})
    return copy.deepcopy(out)


def preset_purpose(name: str) -> str:
    return _read(name)["purpose"] if name in preset_names() else ""


def get_preset(name: str) -> ComtipConfig:
    """A fresh copy of a preset's model config (``tiny``, ``base``, ...; ``micro`` is for tests)."""
    if name not in preset_names():
        raise unknown_preset(name)
    return ComtipConfig.from_dict(preset_sections(name)["model"])


def describe_presets() -> list[dict[str, Any]]:
    """One plain dict per preset (``comtip presets --json``): name, purpose and the main settings."""
    out = []
    for name in preset_names():
        s = preset_sections(name)
        cfg = ComtipConfig.from_dict(s["model"])
        t = s["training"]
        out.append({
            "name": name, "purpose": preset_purpose(name), "starts_from": _read(name).get("preset"),
            "vision": cfg.vision.name, "img_size": cfg.vision.img_size, "vision_depth": cfg.vision.overrides.get("depth"),
            "embed_dim": cfg.embed_dim, "text_mode": cfg.text.mode, "value_transform": cfg.text.value_transform,
            "w_mfm": cfg.w_mfm, "epochs": t.get("epochs"), "batch_size": t.get("batch_size"), "lr": t.get("lr"),
        })
    return out


class _Presets(Mapping):
    """``PRESETS[name]``: the model config of each preset (read from the package on first use)."""

    def __getitem__(self, name: str) -> ComtipConfig:
        return get_preset(name)

    def __iter__(self) -> Iterator[str]:
        return iter(preset_names())

    def __len__(self) -> int:
        return len(preset_names())


PRESETS: Mapping[str, ComtipConfig] = _Presets()

__all__ = ["DEFAULT_PRESET", "PRESETS", "describe_presets", "get_preset", "preset_names", "preset_purpose",
           "preset_sections", "unknown_preset"]
