"""``comtip view``: napari with a slide and the Predict expression widget docked.

Without ``--screenshot`` it opens the viewer (and, with ``--gene``, runs the prediction and
shows that gene). With ``--screenshot OUT.png`` it runs the prediction through the widget (the
same code path as pressing Run), shows the gene as a heatmap over the tissue, saves a PNG
(atomically, never over an existing file without ``--overwrite``) and exits; used for reports
and the user guide. It needs a display: on a headless machine run it under ``xvfb-run -a``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..constants import Default
from ..errors import ComtipError, InputError


def _check_display() -> None:
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")
    ):
        raise InputError("no display to open napari on",
                         hint="run it on a desktop, or headless as: xvfb-run -a comtip view ...")


def _screenshot_target(out: str, overwrite: bool, protect: list[str]) -> Path:
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise InputError("the screenshot must be a .png file", path=path, hint="name it e.g. heatmap.png")
    if not path.parent.is_dir():
        raise InputError("the screenshot folder does not exist", path=path.parent, hint="create it first")
    if any(path.resolve() == Path(p).expanduser().resolve() for p in protect):
        raise InputError("refusing to write the screenshot over an input", path=path, hint="choose another name")
    if path.exists() and not overwrite:
        raise InputError("the screenshot file already exists", path=path,
                         hint="choose another name or pass --overwrite")
    return path


def _parse_size(text: str | None) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in (text or "1400x900").lower().split("x"))
        if w < 200 or h < 200:
            raise ValueError
        return w, h
    except ValueError:
        raise InputError(f"--size must look like 1400x900 (width x height in pixels), got {text!r}") from None


def wait_for(widget, timeout_s: float = 3600.0) -> None:
    """Run the Qt event loop until the widget's prediction worker has finished."""
    from qtpy.QtCore import QElapsedTimer
    from qtpy.QtWidgets import QApplication

    clock = QElapsedTimer()
    clock.start()
    while widget.worker is not None:
        QApplication.processEvents()
        if clock.elapsed() > timeout_s * 1000:
            widget.cancel()
        QApplication.instance().thread().msleep(20)


def predict_in_widget(widget, gene: str | None) -> None:
    """Press Run, wait, show ``gene``; a failure raises the one-line error the widget showed."""
    if widget.run() is None:
        raise InputError(widget.last_error or "the prediction could not start")
    wait_for(widget)
    if widget.prediction is None:
        raise ComtipError(widget.last_error or "the prediction failed")
    if gene and widget.show_gene(gene) is None:
        raise InputError(widget.last_error or f"gene '{gene}' cannot be shown")


#: Height of one caption line in canvas pixels per point of font size, and the caption's margin
#: (measured on screenshots: 11 pt lines are 25 px apart, 12 px from the canvas edge).
CAPTION_LINE_PX_PER_PT, CAPTION_MARGIN_PX = 2.4, 16.0


def caption_height_px(viewer) -> float:
    """Canvas pixels the caption (the text overlay at the bottom) takes, 0 when it is hidden."""
    overlays = getattr(viewer.canvas, "overlays", None)  # napari >= 0.9; before: viewer.text_overlay
    overlay = overlays.text if overlays is not None and hasattr(overlays, "text") else viewer.text_overlay
    if not overlay.visible or not overlay.text:
        return 0.0
    return (overlay.text.count("\n") + 1) * float(overlay.font_size) * CAPTION_LINE_PX_PER_PT + CAPTION_MARGIN_PX


def colorbar_width_px(viewer) -> float:
    """Canvas pixels a visible top-right colour bar (with its tick labels) takes, 0 when none shows."""
    widest = 0.0
    for lyr in viewer.layers:
        bar = getattr(lyr, "colorbar", None)
        if lyr.visible and bar is not None and bar.visible and "right" in str(getattr(bar, "position", "")):
            widest = max(widest, float(bar.size[0]) + 4.5 * float(bar.font_size) + CAPTION_MARGIN_PX)
    return widest


def fit_above_caption(viewer, margin: float = 0.05) -> None:
    """Fit the layers into the canvas less the caption (bottom) and the colour bar (right strip).

    ``reset_view`` fits them to the whole canvas, under the caption and the colour bar; here the
    zoom is chosen for the free rectangle and the view shifted so the data sit in its middle.
    """
    viewer.reset_view(margin=margin)
    cap, bar = caption_height_px(viewer), colorbar_width_px(viewer)
    if cap <= 0 and bar <= 0:
        return
    import numpy as np

    extent = np.asarray(viewer.layers.extent.world, dtype=float)[:, -2:]
    size = np.maximum(extent[1] - extent[0], 1e-9)
    h, w = (float(v) for v in viewer.canvas.size)
    avail_h, avail_w = max(h - cap, h * 0.25), max(w - bar, w * 0.25)
    zoom = (1 - margin) * min(avail_w / size[1], avail_h / size[0])
    cy, cx = (extent[0] + extent[1]) / 2
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom = zoom
    camera.center = (*tuple(camera.center)[:-2], cy + (h - avail_h) / 2 / zoom, cx + (w - avail_w) / 2 / zoom)


def sync_status(viewer) -> None:
    """Make the status bar describe what is shown now (napari refreshes it only when the mouse moves)."""
    viewer.update_status_from_cursor()
    active = viewer.layers.selection.active
    status = viewer.status
    said = str(status.get("layer_name", "")) if isinstance(status, dict) else str(status)
    if active is not None and active.name not in said:
        viewer.status = f"{active.name}: hover a spot for its value"


def view(path: str | os.PathLike | None = None, *, sample: str | None = None, slide: str | None = None,
         pitch_um: float | None = None, mpp: float | None = None, gene: str | None = None,
         checkpoint: str | None = None, mode: str = Default.PREDICT_MODE, device: str = "auto",
         screenshot: str | os.PathLike | None = None, batch_size: int | None = None, canvas_only: bool = False,
         size: str | None = "1400x900", overwrite: bool = False) -> int:
    """``comtip view`` (see the module docstring): napari with ``path`` (default: the demo) and the
    Predict widget; with ``screenshot``, predict ``gene``, save the PNG and close. Exit status 0."""
    from ..io import DEMO_ALIAS, load_sample

    from ..model.bundled import resolve_checkpoint

    win = _parse_size(size)
    resolve_checkpoint(checkpoint)  # an unknown name or missing file: one line, before any window opens
    loaded = load_sample(path or DEMO_ALIAS, sample=sample, slide=slide, pitch_um=pitch_um, mpp=mpp)
    shot = None
    if screenshot:
        shot = _screenshot_target(screenshot, overwrite, [str(p) for p in loaded.provenance.get("inputs", [])])
    _check_display()
    from ._compat import preload_model_stack

    preload_model_stack()  # before the OpenGL canvas exists (see _compat.py)
    import napari

    from ._layers import sample_layers

    viewer = napari.Viewer(show=True, title=f"napari-comtip: {loaded.name}")
    viewer.window.resize(*win)
    for data, kwargs, kind in sample_layers(loaded):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-comtip", "Predict expression")
    widget.set_checkpoint(checkpoint)
    widget.mode_box.setCurrentText(mode)
    if device not in [widget.device_box.itemText(i) for i in range(widget.device_box.count())]:
        from ..engine.device import resolve_device

        resolve_device(device)  # raises the one-line error for a device that does not exist
        widget.device_box.addItem(device)
    widget.device_box.setCurrentText(device)
    if batch_size:
        widget.batch_spin.setValue(int(batch_size))

    # a gene chosen later in the widget: the status bar follows (slots run in connection order)
    widget.gene_box.currentTextChanged.connect(lambda _text: sync_status(viewer))
    if shot is None:
        if gene:
            predict_in_widget(widget, gene)
            fit_above_caption(viewer)
            sync_status(viewer)
        napari.run()
        return 0
    try:
        predict_in_widget(widget, gene)
        fit_above_caption(viewer)
        sync_status(viewer)
        from qtpy.QtWidgets import QApplication

        for _ in range(5):  # let the canvas draw the new layers
            QApplication.processEvents()
        from ..io.writers import atomic_replace

        atomic_replace(shot, lambda tmp: viewer.screenshot(tmp, canvas_only=bool(canvas_only)), suffix=".png")
    finally:
        viewer.close()
    shown = widget.last_view
    r = "" if shown is None or not shown.measured else f", Pearson r {shown.pearson_r:.3f} vs measured"
    print(f"wrote {shot} ({loaded.name}, {shown.gene if shown else '?'}, {widget.prediction.mode}, "
          f"ran on {widget.prediction.device}{r})")
    return 0


__all__ = ["view", "predict_in_widget", "wait_for", "fit_above_caption", "sync_status", "caption_height_px",
           "colorbar_width_px"]
