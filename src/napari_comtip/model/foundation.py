"""Bring your own pathology foundation model: local weights, their settings, freezing.

* :func:`load_vision_weights` reads a local ``.safetensors`` (``safetensors`` package), ``.bin``
  or ``.pth``/``.pt`` file (``torch.load(weights_only=True)``: a pickled object is refused),
  finds the wrapper prefix (``model.``, ``module.``, ``backbone.``, ``visual.trunk.``, ...) under
  which the file's keys are the ViT's, loads it and reports matched / missing / unexpected keys.
  An architecture that does not fit is one :class:`ConfigError` line naming the first tensor that
  does not fit and both shapes.
* :func:`hub_settings` reads the timm ``config.json`` that Hugging Face model folders ship next
  to the weights (``pretrained_cfg.mean/std``), so the input normalisation is the model's own.
* :func:`apply_freeze` implements ``vision.freeze`` (true / false / the number of last blocks to
  train).

Users' guide: docs/foundation-models.md.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config_checks import fully_frozen  # noqa: F401  (defined beside the config checks, which need it without torch)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_HINT_ARCH = "set vision.name and vision.overrides to the weights' architecture (docs/foundation-models.md has the settings of common models)"


# ---------------------------------------------------------------------------- freezing
def apply_freeze(vit: nn.Module, freeze, name: str = "") -> int:
    """Set ``requires_grad`` of the ViT's parameters; returns the number of trainable blocks.

    ``False``: everything trains. ``True`` / ``0``: nothing of the ViT trains. ``N``: the last N
    transformer blocks and the final norm train; patch/position embedding and earlier blocks stay.
    """
    depth = len(vit.blocks)
    if freeze is False:
        return depth
    n = 0 if freeze is True else int(freeze)
    if n > depth:
        raise ConfigError(
            f"vision.freeze={n} asks to train the last {n} blocks, but {name or 'the ViT'} has {depth}",
            hint=f"use a number from 0 to {depth}, true (fixed encoder) or false (train it all)",
        )
    for p in vit.parameters():
        p.requires_grad_(False)
    if n:
        for blk in list(vit.blocks)[depth - n:]:
            for p in blk.parameters():
                p.requires_grad_(True)
        for mod in (getattr(vit, "norm", None), getattr(vit, "fc_norm", None)):
            if isinstance(mod, nn.Module):
                for p in mod.parameters():
                    p.requires_grad_(True)
    return n


# ---------------------------------------------------------------------------- settings next to the weights
def hub_settings(weights: str | os.PathLike | None) -> dict:
    """``{"architecture", "mean", "std", "input_size", "model_args"}`` from a timm ``config.json``
    beside the weight file (a Hugging Face model folder), or ``{}`` when there is none."""
    if not weights:
        return {}
    cfg_file = Path(weights).expanduser().parent / "config.json"
    if not cfg_file.is_file():
        return {}
    try:
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict):
        return {}
    pc = d.get("pretrained_cfg") if isinstance(d.get("pretrained_cfg"), dict) else {}
    out = {"file": str(cfg_file)}
    for key in ("architecture", "model_args"):
        if key in d:
            out[key] = d[key]
    for key in ("mean", "std", "input_size"):
        val = pc.get(key, d.get(key))
        if isinstance(val, (list, tuple)) and all(isinstance(x, (int, float)) for x in val):
            out[key] = [float(x) for x in val]
    if len(out.get("mean", [])) != 3 or len(out.get("std", [])) != 3:
        out.pop("mean", None)
        out.pop("std", None)
    return out


# ---------------------------------------------------------------------------- reading
def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local weight file (no code is run: safetensors or ``weights_only``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        raise ConfigError(
            "vision.weights is a folder, not a weight file",
            path=path,
            hint=f"give the weight file inside it ({', '.join(inside[:3])})" if inside
            else "give a .safetensors, .bin or .pth file",
        )
    if not path.is_file():
        raise ConfigError("vision weights file not found", path=path, hint="fix vision.weights or set it to null")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot read the safetensors file, it is truncated or damaged ({str(exc).splitlines()[0][:120]})",
                path=path,
                hint="download it again (compare its size with the model card's)",
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            "the weight file holds pickled Python objects (e.g. a whole saved model), which are not loaded for safety",
            path=path,
            hint="use the model's .safetensors file, or save only its state dict (torch.save(model.state_dict(), path))",
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise ConfigError(
            f"cannot read vision weights ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'damaged'})",
            path=path,
            hint="give a PyTorch state dict (.bin/.pth/.pt) or a .safetensors file; download it again if it is truncated",
        ) from None
    for key in ("state_dict", "model", "teacher", "student", "module", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"vision weights file holds a {type(obj).__name__}, not a state dict", path=path,
                          hint="save the encoder's state dict (a mapping of names to tensors)")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConfigError("vision weights file holds no tensors", path=path, hint="give the encoder's state dict")
    return sd


def _best_prefix(keys, own: set[str]) -> tuple[str, int]:
    """The wrapper prefix under which most of ``keys`` are ViT keys ("" if none is needed)."""
    counts: dict[str, int] = {}
    for k in keys:
        starts = [0] + [i + 1 for i, c in enumerate(k) if c == "."]
        for s in starts:
            if k[s:] in own:
                counts[k[:s]] = counts.get(k[:s], 0) + 1
                break
    if not counts:
        return "", 0
    prefix = max(counts, key=lambda p: (counts[p], -len(p)))
    return prefix, counts[prefix]


def _resample_pos_embed(vit: nn.Module, v: torch.Tensor) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    npt = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    old = int(math.isqrt(v.shape[1] - npt))
    if old * old != v.shape[1] - npt:
        return v
    return resample_abs_pos_embed(v, new_size=list(vit.patch_embed.grid_size), old_size=[old, old], num_prefix_tokens=npt)


def _unexpected_hint(key: str) -> str:
    if ".ls1." in key or ".ls2." in key:
        return "these weights use LayerScale: add init_values: 1.0e-5 to vision.overrides"
    if key.startswith("reg_token"):
        return "these weights have register tokens: add reg_tokens: N to vision.overrides (see the model card)"
    if key.startswith("blocks."):
        return "the weights have more or other blocks: check vision.name and overrides.depth"
    return _HINT_ARCH


def load_vision_weights(vit: nn.Module, path: str | os.PathLike, name: str = "") -> dict:
    """Load a local weight file into ``vit`` and report what matched.

    Keys outside the found prefix (a text tower, a classification head) are ignored and counted.
    Under it, every ViT tensor must be present with its shape (a position embedding of another
    grid is resampled); otherwise one ConfigError line names the first tensor that does not fit.
    """
    path = Path(path).expanduser()
    sd = read_state_dict(path)
    own = vit.state_dict()
    prefix, n_matched = _best_prefix(sd, set(own))
    what = f"vision.name={name!r}" if name else "the ViT"
    if n_matched == 0:
        raise ConfigError(
            f"no tensor in the vision weights matches {what} ({len(sd)} tensors read, e.g. {', '.join(list(sd)[:3])})",
            path=path, hint=_HINT_ARCH,
        )
    inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    ignored = sorted(k for k in sd if not k.startswith(prefix))
    top_level = {k.split(".")[0] for k in own}
    loadable, unexpected_other = {}, []
    for k, v in inside.items():
        if k not in own:
            if k.split(".")[0] in top_level:
                raise ConfigError(
                    f"the weights do not fit {what}: they hold {prefix}{k} {tuple(v.shape)}, which the model does not have",
                    path=path, hint=_unexpected_hint(k),
                )
            unexpected_other.append(prefix + k)
            continue
        target = own[k]
        if v.shape != target.shape and k == "pos_embed" and v.ndim == 3 and v.shape[-1] == target.shape[-1]:
            v = _resample_pos_embed(vit, v)
        if v.shape != target.shape:
            raise ConfigError(
                f"the weights do not fit {what}: {prefix}{k} is {tuple(v.shape)} in the file but {tuple(target.shape)} in the model",
                path=path, hint=_HINT_ARCH,
            )
        loadable[k] = v.to(target.dtype)
    missing = [k for k in own if k not in loadable]
    if missing:
        raise ConfigError(
            f"the weights do not fit {what}: {len(missing)} of its {len(own)} tensors are not in the file "
            f"(first: {missing[0]} {tuple(own[missing[0]].shape)})",
            path=path, hint=_HINT_ARCH,
        )
    vit.load_state_dict(loadable, strict=True)
    return {
        "path": str(path),
        "prefix": prefix,
        "loaded": len(loadable),
        "missing": missing,
        "unexpected": sorted(unexpected_other),
        "ignored": len(ignored),
        "ignored_examples": ignored[:5],
        "shape_mismatch": [],
    }


def describe_report(report: dict) -> str:
    """One line for logs: ``loaded 294 tensors (prefix 'model.'), 0 missing, 2 unexpected ignored``."""
    pre = f" (prefix {report['prefix']!r} stripped)" if report.get("prefix") else ""
    extra = len(report.get("unexpected", [])) + int(report.get("ignored", 0))
    return (f"vision weights {Path(report['path']).name}: {report['loaded']} tensors matched{pre}, "
            f"{len(report.get('missing', []))} missing, {extra} outside the ViT ignored")
