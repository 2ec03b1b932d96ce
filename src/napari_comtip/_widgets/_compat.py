"""Workarounds for crashes of the GUI process measured on our machines (each one documented).

``guard_triton``: torch imports ``triton`` (through ``torch._dynamo``, which timm/torchvision
import). ``libtriton`` carries its own statically linked LLVM; loading it into a process that
already mapped Mesa's ``libLLVM`` (napari's OpenGL canvas on software rendering: Xvfb, VMs,
remote desktops; also LLVM-based Mesa GPU drivers) crashes with a segmentation fault inside
``triton/knobs.py`` (measured: ``napari.Viewer(); import triton`` -> SIGSEGV; the reverse order
works). The napari process never needs triton (it only powers ``torch.compile`` and custom
GPU kernels; inference here uses neither, and training runs in a subprocess), so when Mesa's
LLVM is already loaded and triton is not, triton is marked unavailable for this process only:
torch then behaves as on a machine without triton. ``COMTIP_ALLOW_TRITON=1`` turns this off.
"""

from __future__ import annotations

import os
import sys


def _mesa_llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libLLVM" in f.read()
    except OSError:  # not Linux
        return False


def guard_triton() -> bool:
    """Make ``import triton`` fail in this process when loading it would crash; True if guarded."""
    if "triton" in sys.modules or os.environ.get("COMTIP_ALLOW_TRITON") == "1":
        return False
    if not sys.platform.startswith("linux") or not _mesa_llvm_loaded():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # -> ImportError, torch: "no triton"
    return True


def preload_model_stack() -> None:
    """Import the model stack on the GUI thread, after :func:`guard_triton`, before a worker uses it.

    Imports inside a Qt worker thread would otherwise be the first ones (timm -> torchvision ->
    torch._dynamo -> triton), hitting the crash above from a thread where it is harder to see.
    """
    guard_triton()
    import timm  # noqa: F401

    import napari_comtip.engine.inference  # noqa: F401
    import napari_comtip.engine.predict  # noqa: F401
    import napari_comtip.engine.predict_inputs  # noqa: F401
    import napari_comtip.engine.provenance  # noqa: F401
    import napari_comtip.model.comtip  # noqa: F401
    import napari_comtip.model.factory  # noqa: F401


__all__ = ["guard_triton", "preload_model_stack"]
