"""The Predict expression widget end to end, with a real (tiny, untrained) checkpoint."""

from __future__ import annotations

from pathlib import Path

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


def _run(qtbot, widget, timeout=180_000):
    """Press Run and wait until the worker has finished and the widget has taken its result.

    (Waiting on ``worker.returned`` could miss a signal emitted before the wait began.)
    """
    worker = widget.run()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def test_predict_switch_genes_and_predictors(make_napari_viewer, qtbot, demo, tiny_checkpoint, monkeypatch,
                                             artefact_dir):
    from napari_comtip._widgets.predict import PredictWidget

    calls = _count_encoder(monkeypatch)
    viewer = make_napari_viewer(show=True)
    _open(viewer, demo)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.slide_box.currentText() == f"{demo.name} tissue"
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("zero-shot")
    _run(qtbot, widget)
    assert widget.prediction is not None, widget.status_label.text()
    assert calls["n"] > 0
    assert widget.session.encoder_runs == 1
    n_after_first = calls["n"]
    pts = widget.display.layer(L.ROLE_PREDICTED)
    assert pts is not None and len(pts.data) == demo.n_spots
    heat = widget.display.layer(L.ROLE_HEAT_PREDICTED)
    assert heat is not None and heat.colorbar.visible

    # type-to-search: part of a symbol, any case, finds it
    completer = widget.gene_box.completer()
    completer.setCompletionPrefix("rbb")
    found = [completer.completionModel().index(i, 0).data() for i in range(completer.completionCount())]
    assert "ERBB2" in found

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


def _dock(make_napari_viewer, demo, show=False):
    from napari_comtip._widgets.predict import PredictWidget

    viewer = make_napari_viewer(show=show)
    _open(viewer, demo)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def test_cancel_stops_the_encoder_early(make_napari_viewer, qtbot, demo, tiny_checkpoint, monkeypatch, notifications):
    """Cancel on a grid that is not cached: the engine stops at the next batch, the GUI recovers."""
    calls = _count_encoder(monkeypatch)
    viewer, widget = _dock(make_napari_viewer, demo)
    # the user's own spots (shifted by 7 px): new coordinates, so no cached embeddings exist
    viewer.add_points(demo.centers_rc() + 7.0, size=demo.spot_diameter_px(), name="my spots")
    widget.spots_box.setCurrentText("my spots")
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("zero-shot")
    widget.batch_spin.setValue(4)
    assert widget.run() is not None
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.prediction is None
    assert widget.status_label.text() == "cancelled"
    assert calls["n"] < demo.n_spots // 4  # stopped long before the last of 47 batches
    assert any("cancel" in msg for _, msg in notifications)
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_error_paths_become_notifications(make_napari_viewer, qtbot, demo, tiny_checkpoint, tmp_path, notifications):
    from napari_comtip._widgets.predict import PredictWidget

    # no slide open
    empty = PredictWidget(make_napari_viewer())
    assert empty.run() is None
    assert "no slide is open" in notifications[-1][1]

    viewer, widget = _dock(make_napari_viewer, demo)
    # a file that is not a checkpoint
    bad = tmp_path / "not-a-checkpoint.pt"
    bad.write_bytes(b"this is not a torch file")
    widget.set_checkpoint(bad)
    _run(qtbot, widget)
    assert widget.prediction is None
    assert notifications and notifications[-1][0] == "error"
    assert "not-a-checkpoint.pt" in notifications[-1][1] and "Traceback" not in notifications[-1][1]
    # a checkpoint path that does not exist
    widget.set_checkpoint(tmp_path / "missing.pt")
    _run(qtbot, widget)
    assert "missing.pt" in notifications[-1][1] and "not found" in notifications[-1][1]
    # the retrieval predictor needs a bank: a good checkpoint and an unknown gene
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("zero-shot")
    _run(qtbot, widget)
    assert widget.prediction is not None
    before = len(notifications)
    assert widget.show_gene("NOT_A_GENE") is None
    assert len(notifications) == before + 1 and "NOT_A_GENE" in notifications[-1][1]
    assert widget.show_gene("erbb2").gene == "ERBB2"  # symbols match case-insensitively


def test_engine_warnings_reach_the_status_line_and_notifications(make_napari_viewer, qtbot, demo, tiny_checkpoint,
                                                                   tmp_path, notifications):
    """A checkpoint whose stored held-out evaluation marks zero-shot as unreliable: the widget says so."""
    import shutil

    from napari_comtip.model.checkpoint import update_checkpoint

    ckpt = tmp_path / "evaluated.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    update_checkpoint(ckpt, extras={"evaluation": {"protocol": "test", "predictors": {"zero-shot": {"pcc_hvg50": -0.2}}}})
    viewer, widget = _dock(make_napari_viewer, demo)
    widget.set_checkpoint(ckpt)
    widget.mode_box.setCurrentText("zero-shot")
    _run(qtbot, widget)
    assert widget.prediction is not None and widget.prediction.warnings
    assert "warning: zero-shot predictions of evaluated.pt were not positively correlated" in widget.status_label.text()
    assert any(sev == "warning" and "not positively correlated" in msg for sev, msg in notifications)


def test_export_h5ad_and_csv_roundtrip(make_napari_viewer, qtbot, demo, tiny_checkpoint, tmp_path, notifications):
    import anndata
    import pandas as pd

    viewer, widget = _dock(make_napari_viewer, demo)
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("retrieval")
    _run(qtbot, widget)
    pred = widget.prediction
    out = widget.export_h5ad(tmp_path / "c2-predicted.h5ad")
    back = anndata.read_h5ad(out)
    assert back.shape == pred.adata.shape
    assert np.allclose(back.X, pred.adata.X)
    assert np.allclose(back.obsm[Key.SPATIAL], demo.centers_xy())
    prov = back.uns[Key.PROVENANCE]
    assert prov["predictor"] == "retrieval" and prov["checkpoint"].endswith("tiny-test.pt")
    assert "torch" in prov["versions"] and prov["device"]
    # the same file again without confirmation: refused, the file is kept
    mtime = out.stat().st_mtime_ns
    assert widget.export_h5ad(out) is None
    assert "already exists" in notifications[-1][1] and out.stat().st_mtime_ns == mtime
    # never over an input of the prediction, even when asked to overwrite; never renamed beside it
    counts = [p for p in demo.provenance["inputs"] if str(p).endswith(".tsv.gz")][0]
    listing = sorted(p.name for p in Path(counts).parent.iterdir())
    assert widget.export_csv(counts, overwrite=True) is None
    assert "refusing to write over an input" in notifications[-1][1]
    assert widget.export_h5ad(tmp_path / "c2.txt") is None and "must be a .h5ad" in notifications[-1][1]
    assert sorted(p.name for p in Path(counts).parent.iterdir()) == listing
    table = pd.read_csv(widget.export_csv(tmp_path / "c2-predicted.csv"), comment="#")
    assert list(table.columns[:5]) == ["spot_id", "x_px", "y_px", "x_um", "y_um"]
    # retrieval gives its spread: a second block of <gene>_uncertainty columns after the genes
    assert Key.UNCERTAINTY in pred.adata.layers
    assert table.shape == (demo.n_spots, 5 + 2 * pred.adata.n_vars)
    assert list(table.columns[5 + pred.adata.n_vars:]) == [f"{g}_uncertainty" for g in pred.adata.var_names]
    assert np.allclose(table["ERBB2"], pred.adata[:, "ERBB2"].X.ravel(), atol=5.1e-5)
    unc = np.asarray(pred.adata[:, "ERBB2"].layers[Key.UNCERTAINTY]).ravel()
    assert np.allclose(table["ERBB2_uncertainty"], unc, atol=5.1e-5)


def test_plain_image_and_points_layers(make_napari_viewer, qtbot, demo, tiny_checkpoint, notifications):
    """A slide opened by napari's own reader plus spots drawn by hand: the user gives µm/px."""
    from napari_comtip._widgets.predict import PredictWidget

    viewer = make_napari_viewer()
    rgb = np.asarray(demo.image.levels[0])
    viewer.add_image(rgb, rgb=True, name="my slide", translate=(100.0, 50.0))
    rc = demo.centers_rc()[:20]
    viewer.add_points(rc + (100.0, 50.0), size=demo.spot_diameter_px(), name="my spots")
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.slide_box.currentText() == "my slide"
    widget.spots_box.setCurrentText("my spots")
    assert widget.run() is None and "µm per pixel" in notifications[-1][1]
    widget.mpp_spin.setValue(demo.mpp)
    sample = widget.current_sample()
    assert np.allclose(sample.centers_rc(), rc) and sample.width == demo.width  # translation removed
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("zero-shot")
    _run(qtbot, widget)
    assert widget.prediction is not None and widget.prediction.adata.n_obs == 20
    assert widget.last_view is not None and not widget.last_view.measured
    assert "not measured" in widget.pcc_label.text()


def test_bundled_checkpoint_end_to_end_through_the_manifest(make_napari_viewer, qtbot, demo, monkeypatch, artefact_dir):
    """What a pathologist does: Open Sample, Plugins > Predict expression, Run (bundled model), pick genes."""
    from napari_comtip.model.bundled import default_checkpoint_path

    if not default_checkpoint_path().is_file():
        pytest.skip("the bundled checkpoint is not in this checkout yet")
    calls = _count_encoder(monkeypatch)
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-comtip", "demo")
    _, widget = viewer.window.add_plugin_dock_widget("napari-comtip", "Predict expression")
    assert widget.checkpoint() == "comtip-tiny-her2st"  # the default bundled checkpoint, chosen at start
    _run(qtbot, widget, timeout=600_000)
    pred = widget.prediction
    assert pred is not None, widget.last_error
    assert pred.mode == "probe" and pred.checkpoint.endswith(default_checkpoint_path().name)
    n = calls["n"]
    genes = [g for g in ("ERBB2", "KRT19", "CD74") if g in pred.genes] or pred.genes[:2]
    colours = []
    for g in genes:
        view = widget.show_gene(g)
        assert view.measured and np.isfinite(view.pearson_r)
        colours.append(np.array(widget.display.layer(L.ROLE_PREDICTED).face_color, copy=True))
    assert calls["n"] == n
    if len(colours) > 1:
        assert not np.allclose(colours[0], colours[1])
    viewer.reset_view()
    viewer.screenshot(str(artefact_dir / f"bundled-{genes[-1]}.png"), canvas_only=True)


def test_predict_all_samples_of_the_data_set(make_napari_viewer, qtbot, demo, tiny_checkpoint, tmp_path,
                                             notifications):
    """The widget's cohort button: the same engine and files as `comtip predict --out FOLDER`."""
    import anndata

    from napari_comtip.constants import Cohort
    from napari_comtip.engine.cohort import read_summary
    from napari_comtip.engine.predict import predict_sample

    viewer, widget = _dock(make_napari_viewer, demo)
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("zero-shot")
    # cancelled before the first sample: nothing written, the row stays pending, the GUI recovers
    assert widget.predict_all(tmp_path / "c") is not None
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    assert widget.cohort_result is not None and widget.cohort_result.cancelled
    assert [r["status"] for r in read_summary(tmp_path / "c" / Cohort.SUMMARY)] == [Cohort.PENDING]
    assert widget.run_button.isEnabled() and widget.predict_all_button.isEnabled()

    out = tmp_path / "all"
    assert widget.predict_all(out) is not None
    assert not widget.predict_all_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    res = widget.cohort_result
    assert res is not None and res.counts[Cohort.OK] == 1, widget.status_label.text()
    assert "1 predicted" in widget.status_label.text()
    got = anndata.read_h5ad(out / f"{demo.name}.h5ad")
    want = predict_sample(demo, tiny_checkpoint, mode="zero-shot", device=widget.device_box.currentText())
    assert np.array_equal(got.X, want.X)
    assert any("1 predicted" in msg for _, msg in notifications)
