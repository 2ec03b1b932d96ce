"""The .h5ad reader (scanpy/squidpy convention) and the HEST-1k sample folder reader."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from napari_comtip.constants import Key
from napari_comtip.errors import InputError
from napari_comtip.io import list_samples, load_sample
from test_io_image import make_blob_rgb, make_ome_tiff


@pytest.fixture(scope="module")
def tiny(visium_tiny_dir):
    with pytest.warns(UserWarning):
        return load_sample(visium_tiny_dir)


def _scanpy_adata(tiny, visium_tiny_dir, lognorm_in_x=False):
    sf = json.loads((visium_tiny_dir / "spatial" / "scalefactors_json.json").read_text())
    low = np.asarray(Image.open(visium_tiny_dir / "spatial" / "tissue_lowres_image.png"))[..., :3]
    e = tiny.expression
    X = e.layers[Key.LOGNORM].copy() if lognorm_in_x else e.X.copy()
    a = anndata.AnnData(X=X, obs=pd.DataFrame(index=e.obs_names.copy()), var=pd.DataFrame(index=e.var_names.copy()))
    if lognorm_in_x:
        a.layers["counts"] = e.X.copy()
    a.obs["array_row"] = e.obs[Key.ARRAY_ROW].to_numpy()
    a.obs["array_col"] = e.obs[Key.ARRAY_COL].to_numpy()
    a.obs["in_tissue"] = 1
    a.obsm["spatial"] = tiny.centers_xy().astype(np.int64)
    a.uns["spatial"] = {"tiny": {"images": {"hires": np.zeros((2000, 2000, 3), np.uint8), "lowres": low},
                                 "scalefactors": sf}}
    return a


def test_h5ad_round_trip(tiny, visium_tiny_dir, tmp_path):
    path = tmp_path / "tiny.h5ad"
    _scanpy_adata(tiny, visium_tiny_dir).write_h5ad(path)
    with pytest.warns(UserWarning, match="blank"):
        s = load_sample(path)
    assert s.format == "h5ad" and s.name == "tiny"
    assert list(s.spots.index) == list(tiny.spots.index)
    np.testing.assert_array_equal(s.centers_rc(), tiny.centers_rc())
    assert s.mpp == pytest.approx(tiny.mpp)
    assert s.image.downsamples == pytest.approx(tiny.image.downsamples)
    assert s.image.shape == tiny.image.shape
    np.testing.assert_array_equal(s.image.levels[0], tiny.image.levels[0])
    assert (s.expression.X != tiny.expression.X).nnz == 0
    assert s.provenance["counts_from"] == "X"
    assert list_samples(path) == ["tiny"]


def test_h5ad_counts_from_layer_and_slide(tiny, visium_tiny_dir, tmp_path):
    path = tmp_path / "ln.h5ad"
    a = _scanpy_adata(tiny, visium_tiny_dir, lognorm_in_x=True)
    a.uns["spatial"]["tiny"]["images"] = {}
    a.obsm["spatial"] = a.obsm["spatial"] / 10  # spots within a 1200 px slide
    a.write_h5ad(path)
    with pytest.raises(InputError, match=r"ln\.h5ad.*no usable image.*--slide"):
        load_sample(path)
    slide = tmp_path / "slide.png"
    Image.fromarray(make_blob_rgb(1200, 1200)).save(slide)
    s = load_sample(path, slide=slide, mpp=10.0)
    assert s.provenance["counts_from"] == "layers['counts']"
    assert (s.expression.X != tiny.expression.X).nnz == 0
    assert s.image.downsamples == [1.0] and s.mpp == 10.0
    assert s.mpp_source.startswith("--mpp override")
    np.testing.assert_allclose(s.centers_rc(), tiny.centers_rc() / 10)
    # a slide too small for the coordinates is refused, naming the scale used
    small = tmp_path / "small.png"
    Image.fromarray(make_blob_rgb(300, 300)).save(small)
    with pytest.raises(InputError, match=r"fall outside the 300 x 300 px image.*scale 1"):
        load_sample(path, slide=small)


def test_h5ad_bad_inputs(tiny, visium_tiny_dir, tmp_path):
    a = _scanpy_adata(tiny, visium_tiny_dir)
    # duplicated barcodes
    dup = a.copy()
    names = list(dup.obs_names)
    names[1] = names[0]
    dup.obs_names = names
    p = tmp_path / "dup.h5ad"
    dup.write_h5ad(p)
    with pytest.raises(InputError, match=r"dup\.h5ad.*duplicated barcodes"):
        load_sample(p)
    # no coordinates
    nocoord = a.copy()
    del nocoord.obsm["spatial"]
    p = tmp_path / "nocoord.h5ad"
    nocoord.write_h5ad(p)
    with pytest.raises(InputError, match=r"nocoord\.h5ad.*obsm\['spatial'\]"):
        load_sample(p)
    # an image without its scale factor
    nosf = a.copy()
    del nosf.uns["spatial"]["tiny"]["scalefactors"]["tissue_hires_scalef"]
    p = tmp_path / "nosf.h5ad"
    nosf.write_h5ad(p)
    with pytest.raises(InputError, match=r"nosf\.h5ad.*no scale factor for the stored 'hires' image"):
        load_sample(p)
    # negative counts
    neg = a.copy()
    neg.X = neg.X.tocsr()
    neg.X.data[0] = -2
    p = tmp_path / "neg.h5ad"
    neg.write_h5ad(p)
    with pytest.warns(UserWarning), pytest.raises(InputError, match=r"neg\.h5ad.*negative"):
        load_sample(p)
    # two libraries: the sample must be named
    two = a.copy()
    two.uns["spatial"]["other"] = two.uns["spatial"]["tiny"]
    p = tmp_path / "two.h5ad"
    two.write_h5ad(p)
    assert list_samples(p) == ["other", "tiny"]
    with pytest.raises(InputError, match=r"2 libraries \(other, tiny\).*--sample"):
        load_sample(p)
    with pytest.raises(InputError, match=r"unknown sample 'x'.*available samples: other, tiny"):
        load_sample(p, sample="x")
    with pytest.warns(UserWarning):
        assert load_sample(p, sample="tiny").n_spots == 100
    # not an h5ad at all
    p = tmp_path / "junk.h5ad"
    p.write_bytes(b"junk" * 100)
    with pytest.raises(InputError, match=r"junk\.h5ad.*cannot read"):
        load_sample(p)


# --------------------------------------------------------------------------- HEST
def _hest_folder(root, sid="TENX99", mpp=0.5, with_lowres_scalef=None):
    """A HEST-1k-style sample: a pyramidal WSI, spots on a Visium-like grid over it, metadata."""
    h, w = 2000, 3000
    (root / "st").mkdir(parents=True)
    (root / "wsis").mkdir()
    (root / "metadata").mkdir()
    make_ome_tiff(root / "wsis" / f"{sid}.tif", make_blob_rgb(h, w), mpp=None)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[400:1600:200, 600:2400:200]
    xy = np.c_[xs.ravel(), ys.ravel()].astype(float)
    n = len(xy)
    X = sp.csr_matrix(rng.poisson(2.0, size=(n, 30)).astype(np.float32))
    a = anndata.AnnData(X=X, obs=pd.DataFrame(index=[f"bc{i}" for i in range(n)]),
                        var=pd.DataFrame(index=[f"G{j}" for j in range(30)]))
    a.obsm["spatial"] = xy
    a.obs["in_tissue"] = 1
    if with_lowres_scalef is not None:
        a.uns["spatial"] = {sid: {"images": {"downscaled_fullres": np.full((100, 150, 3), 200, np.uint8)},
                                  "scalefactors": {"tissue_downscaled_fullres_scalef": with_lowres_scalef,
                                                   "spot_diameter_fullres": 110.0}}}
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(
        {"pixel_size_um_estimated": mpp, "pixel_size_um_embedded": 0.2, "spot_diameter": 55.0,
         "inter_spot_dist": 100.0, "st_technology": "Visium"}))
    return root, xy


def test_hest_folder(tmp_path):
    root, xy = _hest_folder(tmp_path / "hest")
    assert list_samples(root) == ["TENX99"]
    s = load_sample(root)
    assert s.format == "hest" and s.name == "TENX99"
    assert s.mpp == 0.5 and s.mpp_source == "metadata/TENX99.json pixel_size_um_estimated"
    assert s.image.kind == "tiffslide" and (s.width, s.height) == (3000, 2000)
    assert s.spot_diameter_px() == pytest.approx(110.0)
    np.testing.assert_array_equal(s.centers_xy(), xy)
    assert s.n_genes == 30 and s.n_spots == len(xy)
    with pytest.raises(InputError, match=r"unknown sample 'NOPE'.*available samples: TENX99"):
        load_sample(root, sample="NOPE")


def test_hest_inconsistent_scale_factor(tmp_path):
    root, _ = _hest_folder(tmp_path / "hest", with_lowres_scalef=0.1)  # stored image is 150 px = 3000 * 0.05
    with pytest.raises(InputError, match=r"inconsistent scale factors.*downscaled_fullres"):
        load_sample(root)
    root2, _ = _hest_folder(tmp_path / "hest2", with_lowres_scalef=0.05)
    assert load_sample(root2).n_spots > 0


def test_hest_duplicated_genes_and_non_integer_counts_follow_the_rule_of_every_reader(tmp_path):
    """Duplicated var_names are summed under the symbol (ids kept); non-integer counts: one warning."""
    root, _ = _hest_folder(tmp_path / "hest")
    h5 = root / "st" / "TENX99.h5ad"
    a = anndata.read_h5ad(h5)
    raw = a.X.toarray()
    names = list(a.var_names)
    names[5] = names[3]  # G3 twice
    a.var_names = names
    a.var[Key.GENE_IDS] = [f"ENS{j:03d}" for j in range(30)]
    X = raw.copy()
    X[0, 0] = 1.5
    a.X = sp.csr_matrix(X)
    a.write_h5ad(h5)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s = load_sample(root)
    msgs = [str(w.message) for w in seen if "non-integer" in str(w.message)]
    assert len(msgs) == 1 and "TENX99.h5ad: X holds 1 non-integer count(s) (e.g. 1.5)" in msgs[0]
    assert not [w for w in seen if "not unique" in str(w.message)]
    var = s.expression.var
    assert s.n_genes == 29 and "G3" in var.index and "G5" not in var.index and "G3.1" not in var.index
    assert var.loc["G3", Key.GENE_IDS] == "ENS003;ENS005" and var.loc["G3", Key.N_FEATURES] == 2
    col = list(var.index).index("G3")
    np.testing.assert_allclose(s.expression.layers[Key.COUNTS][:, col].toarray().ravel(), raw[:, 3] + raw[:, 5])
    assert s.provenance["duplicate_symbols"] == 1 and any("non-integer" in w for w in s.provenance["warnings"])
