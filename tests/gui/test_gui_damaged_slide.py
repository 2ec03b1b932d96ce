"""File > Open of a damaged slide: one error notification naming the file, nothing opened, the
viewer usable (issue 14, item 2)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module", autouse=True)
def _model_stack_first():
    """The model stack (and triton) is imported before this module's viewers map Mesa's LLVM, as the
    widgets do (``_compat.py``): the GUI tests after this one import it, which would crash otherwise."""
    from napari_comtip._widgets._compat import preload_model_stack

    preload_model_stack()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    from _damaged_slides import make_damaged_slides

    return make_damaged_slides(tmp_path_factory.mktemp("slides"))


@pytest.mark.parametrize("which,words", [("truncated", "the slide is truncated: tile"),
                                         ("corrupt", "cannot decode tile (2, 3) (row, col) of level 0")])
def test_damaged_slide_is_one_notification_and_the_viewer_stays_usable(make_napari_viewer, damaged, notifications,
                                                                       which, words):
    viewer = make_napari_viewer()
    viewer.open(str(damaged[which]), plugin="napari-comtip")
    assert len(viewer.layers) == 0
    errors = [m for sev, m in notifications if sev == "error"]
    assert len(errors) == 1 and damaged[which].name in errors[0] and words in errors[0] and "\n" not in errors[0]
    viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True)  # the viewer goes on working
    viewer.open(str(damaged["full"]), plugin="napari-comtip")  # and opens a good slide next
    assert len(viewer.layers) >= 2
