"""File > Open and File > Open Sample through the plugin's npe2 manifest."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_comtip._widgets import _layers as L
from napari_comtip._widgets._reader import get_reader
from napari_comtip.constants import Key

pytestmark = pytest.mark.gui


def _check_aligned(viewer):
    """The spots lie on the image, both in full-resolution pixel (world) coordinates."""
    img = [ly for ly in viewer.layers if ly.metadata.get(Key.LAYER_ROLE) == L.ROLE_TISSUE][0]
    pts = [ly for ly in viewer.layers if ly.metadata.get(Key.LAYER_ROLE) == L.ROLE_SPOTS][0]
    sample = pts.metadata[Key.LAYER_SAMPLE]
    lo, hi = np.asarray(img.extent.world)[:, -2:]
    rc = np.asarray(pts.data)
    assert (rc >= lo).all() and (rc <= hi).all()
    assert hi[0] == pytest.approx(sample.height, rel=0.01) and hi[1] == pytest.approx(sample.width, rel=0.01)
    return img, pts, sample


def test_open_sample_through_the_manifest(make_napari_viewer, demo):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-comtip", "demo")
    assert [ly.name for ly in viewer.layers] == ["C2 tissue", "C2 spots"]
    img, pts, sample = _check_aligned(viewer)
    assert img.rgb and len(pts.data) == demo.n_spots == sample.n_spots
    assert sample.expression is not None and sample.n_genes > 10_000
    assert "total_counts" in pts.features.columns


def test_multi_section_folder_opens_the_first_and_names_the_others(make_napari_viewer, small_her2st, notifications):
    viewer = make_napari_viewer()
    viewer.open(str(small_her2st), plugin="napari-comtip")
    assert [ly.name for ly in viewer.layers] == ["C2 tissue", "C2 spots"]
    _check_aligned(viewer)
    info = [m for sev, m in notifications if "C3" in m]
    assert info and "opened C2" in info[0] and "ST-cnts/<section>.tsv.gz" in info[0]


def test_a_file_of_a_section_opens_that_section(make_napari_viewer, small_her2st):
    viewer = make_napari_viewer()
    viewer.open(str(small_her2st / "ST-cnts" / "C3.tsv.gz"), plugin="napari-comtip")
    assert [ly.name for ly in viewer.layers] == ["C3 tissue", "C3 spots"]
    img = sorted((small_her2st / "ST-imgs" / "C" / "C3").glob("*.jpg"))[0]
    assert get_reader(str(img)) is not None  # the section's H&E image opens the section too


def test_visium_hires_only_folder_aligns_through_scale(make_napari_viewer, visium_tiny_dir):
    viewer = make_napari_viewer()
    viewer.open(str(visium_tiny_dir), plugin="napari-comtip")
    img, pts, sample = _check_aligned(viewer)
    assert img.scale[-1] > 1.0  # a downscaled image stretched to full-resolution pixels
    assert img.scale[-1] == pytest.approx(sample.image.downsamples[0])


def test_foreign_paths_are_left_to_other_readers(tmp_path):
    from PIL import Image

    (tmp_path / "notes.txt").write_text("hello")
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    (tmp_path / "empty").mkdir()
    for p in ("notes.txt", "photo.png", "empty", "does-not-exist.h5ad"):
        assert get_reader(str(tmp_path / p)) is None, p


def test_bad_content_is_a_one_line_notification(make_napari_viewer, small_her2st, tmp_path, notifications):
    broken = tmp_path / "her2st-broken"
    shutil.copytree(small_her2st, broken)
    (broken / "ST-cnts" / "C2.tsv.gz").write_bytes(b"not gzip at all")
    viewer = make_napari_viewer()
    viewer.open(str(broken / "ST-cnts" / "C2.tsv.gz"), plugin="napari-comtip")
    assert len(viewer.layers) == 0
    errors = [m for sev, m in notifications if sev == "error"]
    assert len(errors) == 1 and "C2.tsv.gz" in errors[0] and "\n" not in errors[0]


def test_slide_without_resolution_opens_alone_and_asks_for_it(make_napari_viewer, demo, tmp_path, notifications):
    """A JPEG records no µm/px: the slide opens alone and the user is told where to give it."""
    jpg = tmp_path / "slide.jpg"
    shutil.copyfile(demo.provenance["image"], jpg)
    viewer = make_napari_viewer()
    viewer.open(str(jpg), plugin="napari-comtip")
    assert [ly.name for ly in viewer.layers] == ["slide"]
    assert viewer.layers["slide"].metadata[Key.LAYER_SOURCE] == str(jpg)
    assert any("µm per pixel" in m for _, m in notifications)
    from napari_comtip._widgets.predict import PredictWidget

    widget = PredictWidget(viewer)
    assert widget.slide_box.currentText() == "slide"
    assert widget.run() is None and "resolution of slide.jpg is unknown" in notifications[-1][1]


@pytest.mark.slow
def test_slide_without_resolution_predicts_on_a_grid(make_napari_viewer, qtbot, demo, tiny_checkpoint, tmp_path):
    from napari_comtip._widgets.predict import PredictWidget

    jpg = tmp_path / "slide.jpg"
    shutil.copyfile(demo.provenance["image"], jpg)
    viewer = make_napari_viewer()
    viewer.open(str(jpg), plugin="napari-comtip")
    widget = PredictWidget(viewer)
    widget.mpp_spin.setValue(demo.mpp)
    widget.set_checkpoint(tiny_checkpoint)
    widget.mode_box.setCurrentText("zero-shot")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
    pred = widget.prediction
    assert pred is not None and pred.sample.format == "bare" and pred.adata.n_obs > 100
    # the grid lies on the tissue: most of the demo's measured spots have a grid spot within a pitch
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pred.sample.centers_rc()).query(demo.centers_rc())
    assert np.mean(d < 100.0 / demo.mpp) > 0.9


def test_folder_of_visium_runs_opens_the_first_and_names_the_others(make_napari_viewer, shared_data, notifications):
    brain = shared_data / "visium_mouse_brain"
    viewer = make_napari_viewer()
    viewer.open(str(brain), plugin="napari-comtip")
    assert [ly.name for ly in viewer.layers] == ["A1 tissue", "A1 spots"]
    img, pts, sample = _check_aligned(viewer)
    assert len(pts.data) == 2399 and img.scale[-1] > 1.0  # hires-only: stretched to full-resolution pixels
    info = [m for sev, m in notifications if "B1" in m]
    assert info and "opened A1" in info[0] and str(brain / "B1") in info[0] and "--sample" in info[0]
