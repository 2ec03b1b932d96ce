"""Choosing the torch device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

:func:`resolve_device` turns a user's choice into a :class:`torch.device` and refuses a device
that does not exist here with a one-line :class:`~napari_comtip.errors.InputError` (instead of
the traceback torch would give at the first ``.to(device)``). :func:`available_devices` lists the
choices a GUI should offer: ``"auto"``, ``"cpu"`` and only the accelerators that exist.
"""

from __future__ import annotations

import re

import torch

from ..errors import InputError

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cuda_hint() -> str:
    build = torch.version.cuda
    if build is None:
        return "this torch build has no CUDA support; use --device cpu (or auto)"
    return f"torch (CUDA {build}) sees no CUDA GPU on this machine; use --device cpu (or auto)"


def resolve_device(device: "str | torch.device | None" = "auto") -> torch.device:
    """Return the :class:`torch.device` for ``device``.

    ``"auto"`` (or ``None``) picks the current CUDA device if there is one, else Apple's MPS,
    else the CPU. An explicit device that is not available raises :class:`InputError`.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = "auto" if device is None else str(device).strip().lower()
    if name in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise InputError("device 'mps' is not available (needs Apple silicon and a torch build with MPS)",
                             hint="use --device cpu (or auto)")
        return torch.device("mps")
    m = _CUDA_RE.match(name)
    if m:
        if not torch.cuda.is_available():
            raise InputError(f"device '{name}' is not available: {_cuda_hint()}")
        index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise InputError(f"device '{name}' does not exist: this machine has {count} CUDA device(s) "
                             f"(cuda:0 .. cuda:{count - 1})", hint="choose one of " + ", ".join(available_devices()))
        return torch.device("cuda", index)
    raise InputError(f"unknown device '{device}'", hint="use one of " + ", ".join(available_devices()) + " (or cuda:N)")


def available_devices() -> list[str]:
    """``["auto", "cpu", "cuda:0", ..., "mps"]``: only the devices that exist on this machine."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def describe_device(device: torch.device) -> str:
    """A human-readable name for provenance and logs, e.g. ``"cuda:0 (NVIDIA H100)"`` or ``"cpu (2 threads)"``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


__all__ = ["resolve_device", "available_devices", "describe_device"]
