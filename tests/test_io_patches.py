"""Patch extraction: exact centring at every pyramid level, orientation, edges."""

from __future__ import annotations

import numpy as np
import pytest

from napari_comtip.errors import InputError
from napari_comtip.io.patches import patch_geometry, read_patch
from napari_comtip.io.image import MultiscaleImage, build_pyramid_levels

H, W = 1024, 1280
SIGMA = 3.0


def _marks_image(marks, h=H, w=W):
    """Black image with green Gaussian marks at sub-pixel (row, col) pixel-index centres."""
    yy, xx = np.ogrid[:h, :w]
    g = np.zeros((h, w), np.float64)
    for r, c in marks:
        g += np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * SIGMA**2))
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = np.clip(g * 255, 0, 255).round().astype(np.uint8)
    return img


def _centroid(patch, near=None, radius=None):
    """Centroid (row, col) of the green marks (G - R, so white padding does not count).

    With ``near`` only the mark within ``radius`` pixels of that point counts (others in the patch
    are ignored).
    """
    m = patch[..., 1].astype(np.float64) - patch[..., 0].astype(np.float64)
    m = np.clip(m, 0, None)
    if near is not None:
        yy, xx = np.mgrid[: m.shape[0], : m.shape[1]]
        m = m * (((yy - near[0]) ** 2 + (xx - near[1]) ** 2) <= radius**2)
    yy, xx = np.mgrid[: m.shape[0], : m.shape[1]]
    s = m.sum()
    assert s > 0, "mark not found in the patch"
    return (yy * m).sum() / s, (xx * m).sum() / s


def _expected(center, mark, side, out):
    """Output pixel index where a full-resolution point lands."""
    k = out / side
    return ((out - 1) / 2 + (mark[0] - center[0]) * k, (out - 1) / 2 + (mark[1] - center[1]) * k)


@pytest.fixture(scope="module")
def pyramid():
    marks = [(400.0, 500.0), (400.3, 700.7), (610.0, 655.0), (10.0, 12.0), (1015.5, 1270.25)]
    img = _marks_image(marks)
    levels = build_pyramid_levels(img, smallest=128)
    return MultiscaleImage(levels, [2.0**i for i in range(len(levels))]), marks


@pytest.mark.parametrize(
    "side,out,level",
    [(64, 64, 0), (100, 64, 0), (128, 64, 1), (200, 64, 1), (256, 64, 2), (480, 48, 3)],
)
@pytest.mark.parametrize("mark_idx", [0, 1])
def test_exact_centring_at_each_level(pyramid, side, out, level, mark_idx):
    image, marks = pyramid
    assert image.best_level(side / out) == level
    centre = marks[mark_idx]
    p = read_patch(image, centre, side, out)
    assert p.shape == (out, out, 3) and p.dtype == np.uint8
    er, ec = _expected(centre, centre, side, out)
    r, c = _centroid(p, near=(er, ec), radius=5 * SIGMA * out / side + 2)
    tol = 0.05 * out / 64 + 0.05
    assert abs(r - er) < tol and abs(c - ec) < tol, (r, c, er, ec)


@pytest.mark.parametrize("side,out", [(64, 64), (150, 64), (256, 64)])
def test_orientation_rows_are_y_cols_are_x(pyramid, side, out):
    """A mark below and to the left of the centre appears below and to the left in the patch."""
    image, _ = pyramid
    centre = (590.0, 675.0)  # mark (610, 655): +20 rows, -20 cols
    p = read_patch(image, centre, side, out)
    r, c = _centroid(p)
    er, ec = _expected(centre, (610.0, 655.0), side, out)
    assert r > (out - 1) / 2 and c < (out - 1) / 2
    assert abs(r - er) < 0.15 and abs(c - ec) < 0.15, (r, c, er, ec)


@pytest.mark.parametrize("side,out", [(64, 64), (128, 64), (256, 64)])
def test_edges_are_padded_white_and_centring_holds(pyramid, side, out):
    image, marks = pyramid
    # top-left corner: centre (4, 6), the mark at (10, 12)
    p = read_patch(image, (4.0, 6.0), side, out)
    assert (p[0, 0] == 255).all()  # off the slide: white glass
    r, c = _centroid(p)
    er, ec = _expected((4.0, 6.0), (10.0, 12.0), side, out)
    assert abs(r - er) < 0.2 and abs(c - ec) < 0.2, (r, c, er, ec)
    # bottom-right corner
    centre = (1020.0, 1275.0)
    p = read_patch(image, centre, side, out)
    assert (p[-1, -1] == 255).all()
    r, c = _centroid(p)
    er, ec = _expected(centre, marks[4], side, out)
    assert abs(r - er) < 0.25 and abs(c - ec) < 0.25, (r, c, er, ec)


def test_patch_entirely_outside_is_white(pyramid):
    image, _ = pyramid
    p = read_patch(image, (-500.0, -500.0), 64, 32)
    assert (p == 255).all()


def test_exact_crop_at_level0_equals_pixels():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    mi = MultiscaleImage([img], [1.0])
    # odd side centred on a pixel: the crop is exactly the pixels around it
    p = read_patch(mi, (100, 150), 33, 33)
    np.testing.assert_array_equal(p, img[84:117, 134:167])


def test_scaled_level_centring():
    """A Visium-hires-like image (downsample 5): patch in full-resolution coordinates."""
    d = 5.0
    hires_mark = (60.3, 80.6)  # hires pixel index
    hires = _marks_image([hires_mark], h=150, w=200)
    mi = MultiscaleImage([hires], [d])
    full = ((hires_mark[0] + 0.5) * d - 0.5, (hires_mark[1] + 0.5) * d - 0.5)
    p = read_patch(mi, full, side_px_full=200, out_px=64)  # upsampled x 1.6
    r, c = _centroid(p)
    assert abs(r - 31.5) < 0.15 and abs(c - 31.5) < 0.15


def test_patch_geometry():
    assert patch_geometry(0.5, 112, 224) == pytest.approx(224.0)
    with pytest.raises(InputError):
        patch_geometry(float("nan"), 112, 224)
    with pytest.raises(InputError):
        patch_geometry(0.5, 0, 224)
