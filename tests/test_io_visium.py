"""The Space Ranger outs/ reader on the real visium_tiny folder and on broken copies of it."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_comtip.constants import Default, Key
from napari_comtip.errors import InputError
from napari_comtip.io import load_sample
from napari_comtip.io.patches import read_patch

BARCODE, ROW, COL = "AAACAAGTATCTCCCA-1", 8513, 9811  # first line of tissue_positions_list.csv
V2 = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@pytest.fixture(scope="module")
def tiny(visium_tiny_dir):
    with pytest.warns(UserWarning, match="blank"):
        return load_sample(visium_tiny_dir)


@pytest.fixture()
def copy(visium_tiny_dir, tmp_path):
    dst = tmp_path / "outs"
    shutil.copytree(visium_tiny_dir, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def _positions(root):
    return pd.read_csv(root / "spatial" / "tissue_positions_list.csv", header=None, names=V2)


def _scalefactors(root):
    return json.loads((root / "spatial" / "scalefactors_json.json").read_text())


def test_counts_in_the_source_files(visium_tiny_dir):
    pos = _positions(visium_tiny_dir)
    assert len(pos) == 100 and (pos["in_tissue"] == 1).sum() == 100
    with h5py.File(visium_tiny_dir / "filtered_feature_bc_matrix.h5") as f:
        bcs = {b.decode() for b in f["matrix/barcodes"][:]}
    assert len(bcs & set(pos["barcode"])) == 100


def test_visium_tiny(tiny, visium_tiny_dir):
    s = tiny
    assert s.format == "visium" and s.n_spots == 100 and s.n_genes == 100
    sf = _scalefactors(visium_tiny_dir)
    # hires PNG is an all-black placeholder: lowres is used and the provenance says so
    assert s.provenance["image"].endswith("tissue_lowres_image.png")
    assert any("blank" in w for w in s.provenance["warnings"])
    # the image is addressed in full-resolution pixels
    d = 1 / sf["tissue_lowres_scalef"]
    assert s.image.downsamples == [pytest.approx(d)]
    assert s.image.level_shapes == [(600, 600, 3)]
    assert (s.width, s.height) == (round(600 * d), round(600 * d))
    # spot centre straight from the file (row = pxl_row_in_fullres, col = pxl_col_in_fullres)
    assert tuple(s.spots.loc[BARCODE, [Key.ROW, Key.COL]]) == (ROW, COL)
    assert s.expression.obsm[Key.SPATIAL][s.expression.obs_names.get_loc(BARCODE)].tolist() == [COL, ROW]
    # mpp and spot size from spot_diameter_fullres
    assert s.mpp == pytest.approx(Default.VISIUM_SCALEFACTOR_SPOT_UM / sf["spot_diameter_fullres"])
    assert s.mpp_source == "scalefactors_json.json spot_diameter_fullres"
    assert s.spot_diameter_px() == pytest.approx(sf["spot_diameter_fullres"] * 55 / 65)  # the 55 um spot
    assert list(s.expression.obs_names) == list(s.spots.index)


def test_visium_patch_comes_from_the_scaled_position(tiny, visium_tiny_dir):
    s = tiny
    low = np.asarray(Image.open(visium_tiny_dir / "spatial" / "tissue_lowres_image.png"))[..., :3]
    scalef = _scalefactors(visium_tiny_dir)["tissue_lowres_scalef"]
    # a patch of 5 lowres pixels around the spot, at lowres resolution, equals the lowres pixels
    side = 5 / scalef
    p = read_patch(s.image, (ROW, COL), side, 5)
    r, c = (ROW + 0.5) * scalef - 0.5, (COL + 0.5) * scalef - 0.5
    ref = low[int(round(r)) - 2:int(round(r)) + 3, int(round(c)) - 2:int(round(c)) + 3].astype(int)
    assert np.abs(p.astype(int) - ref).mean() < 12  # sub-pixel offset: interpolated, not identical
    assert s.image.read_region(0, ROW, COL, 1, 1)[0, 0].tolist() == low[int(ROW * scalef), int(COL * scalef)].tolist()


def test_v2_positions_with_header(copy):
    pos = _positions(copy)
    (copy / "spatial" / "tissue_positions_list.csv").unlink()
    pos.to_csv(copy / "spatial" / "tissue_positions.csv", index=False)
    with pytest.warns(UserWarning):
        s = load_sample(copy)
    assert s.n_spots == 100 and s.provenance["positions_format"] == "v2+ (header)"
    assert tuple(s.spots.loc[BARCODE, [Key.ROW, Key.COL]]) == (ROW, COL)


def test_hires_used_when_not_blank(copy):
    low = Image.open(copy / "spatial" / "tissue_lowres_image.png").convert("RGB")
    sf = _scalefactors(copy)
    side = round(600 * sf["tissue_hires_scalef"] / sf["tissue_lowres_scalef"])
    low.resize((side, side), Image.Resampling.BILINEAR).save(copy / "spatial" / "tissue_hires_image.png")
    s = load_sample(copy)
    assert s.provenance["image"].endswith("tissue_hires_image.png")
    assert s.image.downsamples == [pytest.approx(1 / sf["tissue_hires_scalef"])]
    assert "warnings" not in s.provenance


def test_in_tissue_zero_and_extra_barcodes_are_not_used(copy):
    pos = _positions(copy)
    pos.loc[:9, "in_tissue"] = 0
    pos.to_csv(copy / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.warns(UserWarning, match="no position|blank"):
        s = load_sample(copy)
    assert s.n_spots == 90


def test_full_resolution_slide(copy):
    """Positions /10 and scale factors x10 give a small full-res frame a real slide can match."""
    pos = _positions(copy)
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] = pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] / 10
    pos.to_csv(copy / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    sf = _scalefactors(copy)
    sf = {k: (v * 10 if k.endswith("scalef") else v / 10) for k, v in sf.items()}
    (copy / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    low = Image.open(copy / "spatial" / "tissue_lowres_image.png").convert("RGB")
    full = round(600 / sf["tissue_lowres_scalef"])
    hires_side = round(full * sf["tissue_hires_scalef"])
    low.resize((hires_side, hires_side)).save(copy / "spatial" / "tissue_hires_image.png")
    slide = copy.parent / "slide.png"
    low.resize((full, full), Image.Resampling.BILINEAR).save(slide)
    s = load_sample(copy, slide=slide)
    assert s.image.downsamples == [1.0] and (s.width, s.height) == (full, full)
    assert s.provenance["image"] == str(slide)
    # a slide of the wrong size: the scale factors cannot belong to it
    wrong = copy.parent / "wrong.png"
    low.resize((full // 2, full // 2)).save(wrong)
    with pytest.raises(InputError, match=r"scalefactors_json\.json.*hires image is \d+ px wide"):
        load_sample(copy, slide=wrong)
    # --mpp wins
    s = load_sample(copy, slide=slide, mpp=0.25)
    assert s.mpp == 0.25 and "--mpp override" in s.mpp_source


# --------------------------------------------------------------------------- bad inputs
def test_missing_scalefactors(copy):
    (copy / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InputError, match=r"scalefactors_json\.json: scale factors not found"):
        load_sample(copy)


def test_inconsistent_scalefactors(copy):
    sf = _scalefactors(copy)
    sf["tissue_hires_scalef"] = sf["tissue_lowres_scalef"] * 2  # hires is 2000 px, lowres 600 px
    (copy / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    # hires is blank so lowres is used, but the pair of scale factors contradicts the image sizes
    with pytest.warns(UserWarning, match="blank"), pytest.raises(InputError, match="inconsistent scale factors"):
        load_sample(copy)


def test_nonpositive_scalefactor(copy):
    sf = _scalefactors(copy)
    sf["spot_diameter_fullres"] = 0
    (copy / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    with pytest.raises(InputError, match="spot_diameter_fullres = 0"):
        load_sample(copy)


def test_spots_outside_say_which_scale(copy):
    sf = _scalefactors(copy)
    sf["tissue_lowres_scalef"] *= 3
    sf["tissue_hires_scalef"] *= 3
    (copy / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    with pytest.warns(UserWarning), pytest.raises(InputError, match=r"fall outside.*tissue_lowres_scalef = 0\.135"):
        load_sample(copy)


def test_duplicated_barcodes(copy):
    pos = _positions(copy)
    pos.loc[1, "barcode"] = pos.loc[0, "barcode"]
    pos.to_csv(copy / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.raises(InputError, match=r"tissue_positions_list\.csv.*duplicated barcodes"):
        load_sample(copy)


def test_matrix_and_positions_share_no_barcodes(copy):
    pos = _positions(copy)
    pos["barcode"] = pos["barcode"].str.replace("-1", "-2")
    pos.to_csv(copy / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.warns(UserWarning), pytest.raises(InputError, match=r"filtered_feature_bc_matrix\.h5.*share no barcodes"):
        load_sample(copy)


@pytest.mark.parametrize("bad,match", [(np.nan, "NaN"), (-1.0, "negative")])
def test_nan_or_negative_counts_in_h5(copy, bad, match):
    f5 = copy / "filtered_feature_bc_matrix.h5"
    with h5py.File(f5, "r+") as f:
        data = f["matrix/data"][:].astype(np.float32)
        data[3] = bad
        del f["matrix/data"]
        f["matrix/data"] = data
    with pytest.warns(UserWarning), pytest.raises(InputError, match=rf"filtered_feature_bc_matrix\.h5.*{match}"):
        load_sample(copy)


def test_unknown_sample_name(copy):
    # a Space Ranger run is named after the folder holding outs/
    with pytest.raises(InputError, match=rf"unknown sample 'X'.*available samples: {copy.parent.name}"):
        load_sample(copy, sample="X")


def test_truncated_lowres_png(copy):
    png = copy / "spatial" / "tissue_lowres_image.png"
    png.write_bytes(png.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"tissue_lowres_image\.png"):
        load_sample(copy)


def test_visium_scale_puts_neighbouring_spots_100_um_apart(shared_data):
    """10x's spot_diameter_fullres spans a 65 um spot: with that scale the real mouse-brain grid
    has its 100 um centre-to-centre distance (with 55 um it would be 85 um)."""
    from scipy.spatial import cKDTree

    for name in ("A1", "B1"):
        s = load_sample(shared_data / "visium_mouse_brain", sample=name)
        c = s.centers_rc()
        pitch_px = float(np.median(cKDTree(c).query(c, k=2)[0][:, 1]))
        assert pitch_px * s.mpp == pytest.approx(Default.VISIUM_PITCH_UM, rel=0.01), name
        assert s.spot_diameter_px() * s.mpp == pytest.approx(Default.VISIUM_SPOT_UM, rel=0.01)
