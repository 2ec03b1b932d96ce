"""The provenance of a prediction: package versions, the words for its uncertainty layer, and
the conversion of the record into what ``uns`` of an ``.h5ad`` can store."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import Key


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("napari-comtip", "torch", "timm", "anndata", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "not installed"
    return out


def h5ad_safe(obj: Any, depth: int = 0) -> Any:
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
        return {str(k): h5ad_safe(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(isinstance(v, str) for v in obj):
            return [str(v) for v in obj] if obj else np.array([], dtype=str)
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in obj):
            return np.asarray(obj)
        return json.dumps(obj, default=str)
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf" and obj.size <= 4096:
        return obj
    return str(obj)


def uncertainty_note(mode: str, params: dict[str, Any], probe, available: bool) -> dict[str, Any]:
    """What ``layers[Key.UNCERTAINTY]`` holds (the provenance's words for it)."""
    note: dict[str, Any] = {"layer": Key.UNCERTAINTY if available else "",
                            "units": "standard deviation, log-normalised expression (log1p of counts per 1e4)"}
    if mode == "retrieval":
        note["what"] = f"spread (standard deviation) of the {params.get('k')} retrieved neighbours' values around their mean"
    elif mode == "zero-shot":
        note["what"] = (f"spread (standard deviation) of the zero-shot softmax over the {params.get('grid')}-value grid "
                        "(through the model's per-gene calibration line, when it has one)")
        if params.get("residual_spread"):
            note["what"] = (f"sqrt(v_softmax + r_g(mu)): v_softmax the variance of the zero-shot softmax over the "
                            f"{params.get('grid')}-value grid (through the per-gene calibration line), r_g(mu) the gene's "
                            f"residual variance at the predicted value mu, a per-gene log-linear fit on labelled spots "
                            f"({params['residual_spread']})")
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


__all__ = ["versions", "h5ad_safe", "uncertainty_note"]
