"""The Predict widget's checkpoint chooser: the bundled checkpoints by name, or a file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_comtip._widgets import _layers as L

pytestmark = pytest.mark.gui

#: spots of the crop of mouse-brain section A1 the test predicts (a training section of the checkpoint)
CROP_SPOTS = 300


@pytest.fixture(scope="module")
def mouse_crop(shared_data):
    """Section A1 of the real Visium mouse brain, its spots in one block of CROP_SPOTS (keeps it fast)."""
    from napari_comtip.io import load_sample

    a1 = load_sample(shared_data / "visium_mouse_brain", sample="A1")
    rc = a1.centers_rc()
    order = np.lexsort((rc[:, 1], rc[:, 0]))  # row-major: a band across the section
    start = len(order) // 2 - CROP_SPOTS // 2
    keep = np.sort(order[start:start + CROP_SPOTS])
    spots = a1.spots.iloc[keep]
    return dataclasses.replace(a1, name="A1-band", spots=spots, expression=a1.expression[list(spots.index)].copy())


def test_dropdown_lists_the_bundled_names_and_predicts_with_the_mouse_one(make_napari_viewer, qtbot, mouse_crop,
                                                                         tmp_path, notifications):
    import shutil

    from napari_comtip.model.bundled import default_checkpoint_path

    from napari_comtip._widgets.predict import PredictWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in L.sample_layers(mouse_crop):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = PredictWidget(viewer)
    box = widget.checkpoint_box
    names = [box.itemText(i) for i in range(box.count())]
    assert names == ["comtip-tiny-her2st", "comtip-tiny-mouse-brain"]
    assert widget.checkpoint() == "comtip-tiny-her2st"  # the default is chosen at start
    from qtpy.QtCore import Qt

    tip = box.itemData(1, Qt.ItemDataRole.ToolTipRole)
    assert "mouse" in tip and "1237 genes" in tip and "A1, B1" in tip

    box.setCurrentIndex(names.index("comtip-tiny-mouse-brain"))  # what a click in the dropdown does
    widget.mode_box.setCurrentText("probe")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    pred = widget.prediction
    assert pred is not None, (widget.status_label.text(), notifications)
    assert pred.provenance["checkpoint_name"] == "comtip-tiny-mouse-brain" and pred.adata.n_vars == 1237
    view = widget.show_gene("Nrgn")  # a neuronal marker with a strong pattern across the band
    assert view.measured and view.pearson_r > 0.2, view.pearson_r
    # a human gene: the notification names the bundled checkpoint that has it
    assert widget.show_gene("ERBB2") is None
    assert "not in the checkpoint's panel (1237 genes)" in widget.last_error
    assert "comtip-tiny-her2st has it as ERBB2" in widget.last_error and "under Checkpoint" in widget.last_error

    # a file still works: Browse… (here set_checkpoint, what it calls) adds it to the list and chooses it
    own = tmp_path / "my-model.pt"
    shutil.copyfile(default_checkpoint_path(), own)
    widget.set_checkpoint(own)
    assert widget.checkpoint() == str(own) and box.count() == 3
    widget.set_checkpoint(None)
    assert widget.checkpoint() == "comtip-tiny-her2st"
    # an unknown name typed in: one notification listing the names
    box.setEditText("comtip-tiny-brain")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "comtip-tiny-brain: checkpoint not found" in widget.last_error and "comtip-tiny-mouse-brain" in widget.last_error
