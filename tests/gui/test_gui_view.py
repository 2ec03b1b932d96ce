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
    assert _inferno_fraction(shot) > 0.01  # the heatmap is drawn
    from napari_comtip._widgets._view import CAPTION_LINE_PX_PER_PT, CAPTION_MARGIN_PX

    band = int(3 * 11 * CAPTION_LINE_PX_PER_PT + CAPTION_MARGIN_PX)  # the 3-line caption at 11 pt
    assert _inferno_fraction(shot[-band:]) < 0.001  # no heatmap under the caption
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


def test_layers_fit_above_the_caption_and_left_of_the_colour_bar(make_napari_viewer):
    """A wide short canvas: ``reset_view`` would put the data under the caption; the fit keeps it clear."""
    from napari_comtip._widgets._view import caption_height_px, colorbar_width_px, fit_above_caption

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1700, 420)
    img = viewer.add_image(np.random.default_rng(0).random((300, 700)), colormap="inferno")
    img.colorbar.visible = True
    overlay = viewer.canvas.overlays.text
    overlay.text, overlay.font_size, overlay.visible = "line one\nline two\nline three", 11, True
    overlay.position = "bottom_left"
    fit_above_caption(viewer)
    cap, bar = caption_height_px(viewer), colorbar_width_px(viewer)
    assert cap > 60 and bar > 25
    h, w = (float(v) for v in viewer.canvas.size)
    cam = viewer.scene.camera
    (y0, x0), (y1, x1) = np.asarray(viewer.layers.extent.world)[:, -2:]
    cy, cx = cam.center[-2:]
    top, bottom = (y0 - cy) * cam.zoom + h / 2, (y1 - cy) * cam.zoom + h / 2
    left, right = (x0 - cx) * cam.zoom + w / 2, (x1 - cx) * cam.zoom + w / 2
    assert top >= 0 and left >= 0
    assert bottom <= h - cap + 1, (bottom, h, cap)
    assert right <= w - bar + 1, (right, w, bar)
    viewer.reset_view()  # what napari alone does: the data reach under the caption
    cy, z = viewer.scene.camera.center[-2], viewer.scene.camera.zoom
    assert (y1 - cy) * z + h / 2 > h - cap


def test_status_bar_names_the_gene_shown(make_napari_viewer):
    from napari_comtip._widgets._view import sync_status

    viewer = make_napari_viewer()
    viewer.add_points(np.zeros((1, 2)), name="C2 predicted SCGB2A2 (probe)")
    viewer.status = "C2 predicted SCGB2A2 (probe) [1, 1]:"  # what the first gene left there
    pts = viewer.layers[-1]
    pts.name = "C2 predicted ERBB2 (probe)"  # the widget renames the layer for the new gene
    viewer.layers.selection.active = pts
    sync_status(viewer)
    status = viewer.status
    said = status.get("layer_name", "") if isinstance(status, dict) else status
    assert "ERBB2" in said and "SCGB2A2" not in said
