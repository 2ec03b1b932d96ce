"""The bytes of a checkpoint file: its digest (a cache key), the conversion of what is stored
into the primitives ``torch.load(..., weights_only=True)`` accepts, and ``torch.save`` through a
Python file (a full disk raises ``OSError``). Used by :mod:`model.checkpoint`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

_DIGESTS: dict[tuple[str, int, int], str] = {}


def checkpoint_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-256 (a cache key; memoised per path/size/mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def to_primitive(obj: Any, where: str) -> Any:
    """Convert numpy to torch/python and refuse anything weights_only loading would reject."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "OUS":
            return [to_primitive(x, where) for x in obj.tolist()]
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_primitive(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_primitive(v, where) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # e.g. engine.predictors.Probe
        return to_primitive(obj.to_dict(), where)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"checkpoint entry {where} has type {type(obj).__name__}; store tensors, arrays and primitives only")


def torch_save(blob: dict, tmp: str) -> None:
    """``torch.save`` through a Python file: a full disk raises ``OSError(ENOSPC)``, not "unexpected pos"."""
    with open(tmp, "wb") as fh:
        torch.save(blob, fh)


__all__ = ["checkpoint_digest", "to_primitive", "torch_save"]
