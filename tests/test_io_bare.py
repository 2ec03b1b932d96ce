"""Bare slides: tissue detection on a thumbnail and a Visium-geometry grid over the tissue."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from napari_comtip.constants import Default, Key
from napari_comtip.errors import InputError
from napari_comtip.io import load_sample
from napari_comtip.io.patches import patch_geometry, read_patch
from napari_comtip.io.bare import hex_grid
from napari_comtip.io.tissue import tissue_mask
from test_io_image import make_blob_rgb, make_ome_tiff

H, W = 2000, 3000
CY, CX, RY, RX = 1000, 1400, 600, 900  # tissue ellipse


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("bare") / "slide.ome.tif"
    return make_ome_tiff(path, make_blob_rgb(H, W, centre=(CY, CX), radii=(RY, RX)), mpp=0.5)


def test_hex_grid_geometry():
    g = hex_grid(1000, 1000, 100.0)
    rows = np.unique(g[Key.ROW].round(6))
    assert np.diff(rows) == pytest.approx(np.full(len(rows) - 1, 100 * math.sqrt(3) / 2))
    # nearest neighbours are one pitch apart (hexagonal: 6 neighbours)
    from scipy.spatial import cKDTree

    pts = g[[Key.ROW, Key.COL]].to_numpy()
    d, _ = cKDTree(pts).query(pts, k=7)
    inner = (pts[:, 0] > 200) & (pts[:, 0] < 800) & (pts[:, 1] > 200) & (pts[:, 1] < 800)
    assert d[inner, 1:] == pytest.approx(np.full((inner.sum(), 6), 100.0))
    # Visium array convention: odd rows take odd columns
    assert ((g[Key.ARRAY_ROW] % 2) == (g[Key.ARRAY_COL] % 2)).all()


def test_detect_tissue_on_blob():
    img = make_blob_rgb(400, 600, centre=(200, 280), radii=(120, 180))
    m = tissue_mask(img)
    yy, xx = np.ogrid[:400, :600]
    truth = ((yy - 200) / 120) ** 2 + ((xx - 280) / 180) ** 2 < 1
    iou = (m & truth).sum() / (m | truth).sum()
    assert iou > 0.95
    assert not tissue_mask(np.full((100, 100, 3), 240, np.uint8)).any()


def test_bare_slide_grid_over_tissue(slide):
    s = load_sample(slide)
    assert s.format == "bare" and s.expression is None and s.n_genes == 0
    assert s.mpp == pytest.approx(0.5) and "tiffslide" in s.mpp_source
    pitch_px = Default.VISIUM_PITCH_UM / 0.5
    assert s.provenance["grid"]["pitch_px"] == pytest.approx(pitch_px)
    assert s.spot_diameter_px() == pytest.approx(Default.VISIUM_SPOT_UM / 0.5)
    rc = s.centers_rc()
    # every spot lies on the tissue ellipse (with the spot radius of slack) ...
    e = ((rc[:, 0] - CY) / RY) ** 2 + ((rc[:, 1] - CX) / RX) ** 2
    assert (e < 1.1).all()
    # ... and the grid fills it: about area / hexagon cell area spots
    expected = math.pi * RY * RX / (pitch_px**2 * math.sqrt(3) / 2)
    assert 0.8 * expected < s.n_spots < 1.15 * expected
    assert s.spots.index.is_unique
    # patches of every grid spot can be read
    side = patch_geometry(s.mpp, 100, 32)
    patches = [read_patch(s.image, c, side, 32) for c in s.centers_rc()]
    assert len(patches) == s.n_spots and all(p.shape == (32, 32, 3) for p in patches)


def test_pitch_option(slide):
    s = load_sample(slide, pitch_um=200)
    assert s.provenance["grid"]["pitch_px"] == pytest.approx(400)
    assert s.spot_diameter_px() == pytest.approx(2 * Default.VISIUM_SPOT_UM / 0.5)
    with pytest.raises(InputError, match="--pitch-um must be positive"):
        load_sample(slide, pitch_um=-1)


def test_bare_image_needs_mpp(tmp_path):
    p = tmp_path / "he.png"
    Image.fromarray(make_blob_rgb(600, 800)).save(p)
    with pytest.raises(InputError, match=r"he\.png.*microns per pixel.*--mpp"):
        load_sample(p)
    s = load_sample(p, mpp=2.0)
    assert s.n_spots > 0 and s.mpp_source == "--mpp override"


def test_blank_slide_has_no_tissue(tmp_path):
    p = tmp_path / "glass.png"
    Image.fromarray(np.full((500, 500, 3), 235, np.uint8)).save(p)
    with pytest.raises(InputError, match=r"glass\.png.*no tissue detected"):
        load_sample(p, mpp=1.0)
