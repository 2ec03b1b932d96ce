"""The napari process survives importing the model stack after the OpenGL canvas exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]  # a fresh napari process: ~17 s

SCRIPT = """
import napari
viewer = napari.Viewer(show=False)        # Mesa's libLLVM is mapped now (software OpenGL)
import napari_comtip._widgets             # what napari imports first when it loads the plugin
from napari_comtip._widgets._compat import preload_model_stack
preload_model_stack()                     # timm -> torchvision -> torch._dynamo
import torch
print("alive", torch.ones(2).sum().item())
"""


def test_model_stack_imports_after_the_canvas(tmp_path):
    """Without the triton guard (COMTIP_ALLOW_TRITON=1) this order dies with SIGSEGV inside
    triton/knobs.py: measured on Xvfb + Mesa llvmpipe."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alive 2.0" in proc.stdout
