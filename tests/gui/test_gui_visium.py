"""Real Visium in the widgets: the mouse-brain folder of Space Ranger runs opened through the
plugin's reader (File > Open), predicted in the Predict widget with the bundled mouse checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_comtip._widgets import _layers as L
from napari_comtip.constants import Key

pytestmark = pytest.mark.gui

MOUSE_CKPT = Path(__file__).resolve().parents[2] / "src" / "napari_comtip" / "checkpoints" / "comtip-tiny-mouse-brain.pt"
N_SUBSET = 200


def _wait(qtbot, widget, timeout=300_000):
    assert widget.run() is not None, widget.last_error
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)
    assert widget.prediction is not None, widget.last_error


@pytest.fixture
def brain_viewer(make_napari_viewer, shared_data):
    if not MOUSE_CKPT.is_file():
        pytest.skip("the bundled mouse-brain checkpoint is not in this checkout")
    viewer = make_napari_viewer()
    viewer.open(str(shared_data / "visium_mouse_brain"), plugin="napari-comtip")  # File > Open of the folder
    assert [ly.name for ly in viewer.layers] == ["A1 tissue", "A1 spots"]
    _, widget = viewer.window.add_plugin_dock_widget("napari-comtip", "Predict expression")
    assert widget.slide_box.currentText() == "A1 tissue"
    widget.set_checkpoint(MOUSE_CKPT)
    widget.mode_box.setCurrentText("probe")
    return viewer, widget


def test_some_visium_spots_predicted_with_the_mouse_checkpoint(brain_viewer, qtbot):
    """A subset of the reader's spots (a Points layer of its own, as a user would draw) on the real
    hires-only image: the widget finds the scale from the tissue layer and predicts every panel gene."""
    viewer, widget = brain_viewer
    spots = viewer.layers["A1 spots"]
    sample = spots.metadata[Key.LAYER_SAMPLE]
    rc = np.asarray(spots.data)[:N_SUBSET]
    viewer.add_points(rc, size=sample.spot_diameter_px(), name="my spots")
    widget.spots_box.setCurrentText("my spots")
    chosen = widget.current_sample()
    assert chosen.n_spots == N_SUBSET and chosen.mpp == pytest.approx(sample.mpp)
    _wait(qtbot, widget)
    pred = widget.prediction
    assert pred.adata.n_obs == N_SUBSET and pred.adata.n_vars == 1237 and pred.mode == "probe"
    assert np.isfinite(np.asarray(pred.adata.X)).all()
    view = widget.show_gene("Nrgn")
    assert view is not None and view.gene == "Nrgn"
    values = np.asarray(widget.display.layer(L.ROLE_PREDICTED).features["Nrgn"])
    assert values.std() > 0  # a pattern, not one colour


@pytest.mark.slow
def test_whole_visium_section_predicted_and_compared_with_measured(brain_viewer, qtbot):
    """All 2,399 spots of A1: Nrgn's predicted map follows the measured one (A1 is one of the
    checkpoint's training sections, in-sample r about 0.6), and a feature id names the same gene."""
    viewer, widget = brain_viewer
    _wait(qtbot, widget, timeout=600_000)
    pred = widget.prediction
    assert pred.adata.n_obs == 2399 and pred.adata.n_vars == 1237
    pts = widget.display.layer(L.ROLE_PREDICTED)
    assert np.allclose(np.asarray(pts.data), np.asarray(viewer.layers["A1 spots"].data))  # on the reader's spots
    view = widget.show_gene("Nrgn")
    assert view.measured and view.pearson_r > 0.4, view.pearson_r
    var = pred.sample.expression.var
    nrgn_id = str(var.loc["Nrgn", "gene_ids"])
    assert nrgn_id.startswith("ENSMUSG") and widget.show_gene(nrgn_id).gene == "Nrgn"
