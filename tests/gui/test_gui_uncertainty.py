"""The prediction's uncertainty as a napari layer beside the predicted one (Predict widget)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_comtip._widgets import _layers as L
from napari_comtip.constants import Default, Key

from test_gui_predict import _dock, _run

pytestmark = pytest.mark.gui


def test_uncertainty_layer_follows_the_gene_and_the_user(make_napari_viewer, qtbot, demo, tiny_checkpoint,
                                                         artefact_dir):
    viewer, widget = _dock(make_napari_viewer, demo, show=True)
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("retrieval")
    _run(qtbot, widget)
    assert widget.prediction is not None, widget.status_label.text()
    ad = widget.prediction.adata
    assert Key.UNCERTAINTY in ad.layers

    view = widget.show_gene("ERBB2")
    unc = widget.display.layer(L.ROLE_UNCERTAINTY)
    assert unc is not None and not unc.visible  # hidden until asked for
    assert unc.name == f"{demo.name} ERBB2 uncertainty (retrieval)"
    assert unc.colormap.name == Default.UNCERTAINTY_COLORMAP != Default.HEATMAP_COLORMAP
    col = ad.layers[Key.UNCERTAINTY][:, list(ad.var_names).index("ERBB2")]
    painted = np.unique(unc.data[np.isfinite(unc.data)])
    assert np.isin(painted, np.unique(col.astype(np.float32))).all() and len(painted) > 1
    assert view.uncertainty == (0.0, pytest.approx(float(np.percentile(col, 99)), rel=1e-5))
    assert tuple(unc.contrast_limits) == pytest.approx(view.uncertainty)
    assert "uncertainty" in viewer.text_overlay.text
    assert viewer.layers.index(unc) == len(viewer.layers) - 1  # above the prediction: switching it on shows it

    # the user switches it on; another gene repaints the same layer and keeps it on
    unc.visible = True
    before = np.array(unc.data, copy=True)
    other = [g for g in widget.prediction.genes if g != "ERBB2"][0]
    widget.show_gene(other)
    assert widget.display.layer(L.ROLE_UNCERTAINTY) is unc and unc.visible and other in unc.name
    assert not np.allclose(np.nan_to_num(before), np.nan_to_num(unc.data))
    viewer.reset_view()
    viewer.screenshot(str(artefact_dir / "predict-c2-uncertainty.png"), canvas_only=True)

    # a prediction without the layer (a probe stored before it existed) shows no stale map
    del ad.layers[Key.UNCERTAINTY]
    view = widget.show_gene("ERBB2")
    assert widget.display.layer(L.ROLE_UNCERTAINTY) is None and view.uncertainty is None
    assert "uncertainty" not in viewer.text_overlay.text
