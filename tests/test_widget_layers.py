"""SpatialSample -> napari layer data, without Qt (``_widgets/_layers.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_comtip._widgets import _layers as L
from napari_comtip.constants import Default, Key


@pytest.fixture(scope="module")
def demo():
    from napari_comtip.io import DEMO_ALIAS, bundled_sample_path, load_sample

    if not bundled_sample_path().is_dir():
        pytest.skip("bundled sample not present")
    return load_sample(DEMO_ALIAS)


def test_sample_layers_align_in_full_res_pixels(demo):
    (img, ikw, itype), (pts, pkw, ptype) = L.sample_layers(demo)
    assert (itype, ptype) == ("image", "points")
    levels = img if ikw["multiscale"] else [img]
    assert tuple(levels[0].shape[:2]) == tuple(np.round(np.array(demo.image.level_shapes[0][:2])).astype(int))
    s = ikw["scale"][0]
    # the image covers the full-resolution extent the spots live in
    assert levels[0].shape[0] * s == pytest.approx(demo.height, rel=0.01)
    rc = np.asarray(pts)
    assert rc.shape == (demo.n_spots, 2)
    assert (rc[:, 0] > 0).all() and (rc[:, 0] < demo.height).all() and (rc[:, 1] < demo.width).all()
    assert np.allclose(pkw["size"], demo.spots[Key.DIAMETER])
    feats = pkw["features"]
    assert list(feats["spot"]) == demo.spot_ids
    assert "total_counts" in feats and feats["total_counts"].gt(0).all()
    assert len(feats.columns) < 10  # the expression matrix stays on the layer's metadata
    assert pkw["metadata"][Key.LAYER_SAMPLE] is demo


def test_image_scale_maps_hires_level_to_full_res():
    from napari_comtip.io.image import MultiscaleImage
    from napari_comtip.io.record import SpatialSample

    hires = np.zeros((200, 300, 3), np.uint8)
    img = MultiscaleImage.from_array(hires, downsample=1 / 0.08, full_shape=(2500, 3750))
    spots = pd.DataFrame({Key.ROW: [1250.0], Key.COL: [1875.0], Key.DIAMETER: [90.0]}, index=["a"])
    s = SpatialSample(name="v", image=img, mpp=1.0, mpp_source="test", spots=spots)
    assert L.image_scale(s) == pytest.approx(12.5)
    assert L.side_offset(s)[1] > 3750


def test_raster_paints_nearest_spot_and_leaves_background_empty():
    centers = np.array([[100.0, 100.0], [100.0, 300.0], [300.0, 100.0], [300.0, 300.0]])
    values = np.array([1.0, 2.0, 3.0, 4.0])
    idx = L.raster_index(centers, diameter_px=100.0)
    r = idx.paint(values)
    def at(row, col):
        i = int(round((row - r.translate[0]) / r.step))
        j = int(round((col - r.translate[1]) / r.step))
        return r.data[i, j]
    assert at(100, 100) == 1.0 and at(100, 300) == 2.0 and at(300, 100) == 3.0 and at(300, 300) == 4.0
    assert at(120, 280) == 2.0  # nearest spot wins
    assert np.isnan(r.data[0, 0])  # beyond the fill radius of every spot: transparent
    assert np.isfinite(r.data).mean() > 0.5
    assert r.step == pytest.approx(100.0 / 8)


def test_raster_size_is_capped():
    rng = np.random.default_rng(0)
    centers = rng.uniform(0, 200_000, size=(500, 2))
    idx = L.raster_index(centers, diameter_px=4.0)
    assert max(idx.index.shape) <= Default.HEATMAP_MAX_SIDE
    painted = idx.index[idx.index >= 0]
    assert len(np.unique(painted)) == 500  # every spot still shows up


def test_shared_limits_and_pearson():
    from napari_comtip.engine.evaluation import pearson_r

    a = np.array([0.0, 1.0, 2.0, np.nan, 4.0])
    b = np.array([10.0, 11.0, 12.0, 13.0, 14.0])
    lo, hi = L.shared_limits(a, b, percentiles=(0, 100))
    assert (lo, hi) == (0.0, 14.0)
    assert pearson_r(a, b) == pytest.approx(1.0)  # the spot without a value is left out
    assert np.isnan(pearson_r(np.ones(5), b))
    assert L.shared_limits(np.ones(3)) == (1.0, 2.0)


def test_gene_values_align_by_spot_id():
    import anndata

    ad = anndata.AnnData(X=np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
                         obs=pd.DataFrame(index=["s1", "s2"]), var=pd.DataFrame(index=["A", "B"]))
    assert list(L.gene_values(ad, "B", ["s2", "s1", "s3"])[:2]) == [4.0, 2.0]
    assert np.isnan(L.gene_values(ad, "B", ["s3"])[0])


def test_spots_sit_on_tissue_in_layer_coordinates(demo):
    """Orientation check at the data level: the pixels under the spot centres (as napari draws
    them) are tissue, darker than the glass around it; swapping rows and columns would not be."""
    (img, ikw, _), (pts, _, _) = L.sample_layers(demo)
    level = np.asarray((img[-1] if ikw["multiscale"] else img))
    f = level.shape[0] / (demo.height / ikw["scale"][0])  # level px per world px

    def brightness(rc):
        ij = np.clip(np.rint(rc * f).astype(int), 0, np.array(level.shape[:2]) - 1)
        return level[ij[:, 0], ij[:, 1]].mean(axis=1)

    rc = np.asarray(pts)
    glass = np.median(np.concatenate([level[:5].reshape(-1, 3), level[-5:].reshape(-1, 3)]).mean(axis=1))
    on_spots = brightness(rc)
    assert np.mean(on_spots < glass - 25) > 0.8
    assert np.mean(brightness(rc[:, ::-1]) < glass - 25) < np.mean(on_spots < glass - 25)
