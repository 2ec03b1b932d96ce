"""The Predict expression widget end to end, with a real (tiny, untrained) checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from napari_comtip.constants import Key
from napari_comtip._widgets import _layers as L

pytestmark = pytest.mark.gui


def _count_encoder(monkeypatch):
    """Count forward passes of the image encoder (every batch goes through ``preprocess``)."""
    from napari_comtip.model.comtip import CoMTIP

    calls = {"n": 0}
    orig = CoMTIP.preprocess

    def counted(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(CoMTIP, "preprocess", counted)
    return calls


def _open(viewer, sample):
    for data, kwargs, kind in L.sample_layers(sample):
        getattr(viewer, f"add_{kind}")(data, **kwargs)


def _run(qtbot, widget, timeout=60_000):
    worker = widget.run()
    assert worker is not None
    with qtbot.waitSignal(worker.returned, timeout=timeout):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def test_predict_switch_genes_and_predictors(make_napari_viewer, qtbot, small_c2, tiny_checkpoint, monkeypatch,
                                             artefact_dir):
    from napari_comtip._widgets.predict import PredictWidget

    calls = _count_encoder(monkeypatch)
    viewer = make_napari_viewer(show=True)
    _open(viewer, small_c2)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.slide_box.currentText() == "C2 tissue"
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("zero-shot")
    _run(qtbot, widget)
    assert widget.prediction is not None, widget.status_label.text()
    assert calls["n"] > 0
    assert widget.session.encoder_runs == 1
    n_after_first = calls["n"]
    pts = widget.display.layer(L.ROLE_PREDICTED)
    assert pts is not None and len(pts.data) == small_c2.n_spots
    heat = widget.display.layer(L.ROLE_HEAT_PREDICTED)
    assert heat is not None and heat.colorbar.visible

    # switch gene: colours change, the encoder does not run
    genes = widget.prediction.genes
    a, b = "ERBB2", [g for g in genes if g != "ERBB2"][0]
    widget.show_gene(a)
    col_a = np.array(pts.face_color, copy=True)
    heat_a = np.array(heat.data, copy=True)
    widget.show_gene(b)
    col_b = np.array(pts.face_color, copy=True)
    assert not np.allclose(col_a, col_b)
    assert not np.allclose(np.nan_to_num(heat_a), np.nan_to_num(heat.data))
    assert pts.features.columns[-1] == b
    assert calls["n"] == n_after_first

    # measured expression beside, on the same scale, with a Pearson r
    meas = widget.display.layer(L.ROLE_MEASURED)
    assert meas is not None
    assert tuple(meas.face_contrast_limits) == tuple(pts.face_contrast_limits)
    assert np.isfinite(widget.last_view.pearson_r)
    assert "Pearson r" in widget.pcc_label.text()

    # switch predictor: only the predictor runs again
    for mode in ("retrieval", "probe"):
        widget.mode_box.setCurrentText(mode)
        _run(qtbot, widget)
        assert widget.prediction.mode == mode
        assert calls["n"] == n_after_first
        assert not widget.prediction.encoder_ran
    assert widget.session.encoder_runs == 1
    widget.show_gene("ERBB2")
    viewer.reset_view()
    viewer.screenshot(str(artefact_dir / "predict-c2-erbb2.png"), canvas_only=True)
