"""``comtip view --screenshot``: the prediction rendered over the tissue, saved as a PNG."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_comtip.cli import _run_view, build_parser

pytestmark = pytest.mark.gui


def _args(*argv):
    """``comtip view ARGV`` as the CLI parses it (handed to ``_run_view``, which maps it onto ``view``)."""
    return build_parser().parse_args(["view", *map(str, argv)])


def _inferno_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that look like the heatmap (saturated warm colours, not H&E pink/purple)."""
    r, g, b = (rgb[..., i].astype(float) for i in range(3))
    return float(((r > 150) & (g > 60) & (b < 90)).mean())


def test_view_screenshot_renders_the_heatmap_on_the_tissue(qtbot, demo, tiny_checkpoint, artefact_dir):
    out = artefact_dir / "view-demo-erbb2.png"
    out.unlink(missing_ok=True)
    assert _run_view(_args("@demo", "--checkpoint", tiny_checkpoint, "--mode", "zero-shot", "--gene", "ERBB2",
                                "--screenshot", out, "--canvas-only", "--size", "1200x800")) == 0
    from PIL import Image

    shot = np.asarray(Image.open(out).convert("RGB"))
    assert shot.shape[0] > 300 and shot.shape[1] > 300
    assert _inferno_fraction(shot) > 0.02  # the heatmap is drawn
    # a second run may not replace it without --overwrite
    from napari_comtip.errors import InputError

    with pytest.raises(InputError, match="already exists"):
        _run_view(_args("@demo", "--checkpoint", tiny_checkpoint, "--screenshot", out))


def test_view_errors_are_one_line(tmp_path, tiny_checkpoint):
    from napari_comtip.errors import ComtipError
    with pytest.raises(ComtipError, match="must be a .png"):
        _run_view(_args("@demo", "--screenshot", tmp_path / "x.jpg"))
    with pytest.raises(ComtipError, match="window size|--size"):
        _run_view(_args("@demo", "--size", "big"))
    with pytest.raises(ComtipError, match="comtip-tiny-brain: checkpoint not found.*comtip-tiny-mouse-brain"):
        _run_view(_args("@demo", "--checkpoint", "comtip-tiny-brain"))


@pytest.mark.slow
def test_comtip_view_cli_unknown_gene_exits_2(tmp_path, tiny_checkpoint):
    """The real command in a subprocess: an unknown gene is one ``error:`` line and exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "napari_comtip", "view", "@demo", "--checkpoint", str(tiny_checkpoint),
                           "--mode", "zero-shot", "--gene", "NOT_A_GENE", "--screenshot", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "NOT_A_GENE" in last
    assert not (tmp_path / "x.png").exists()
