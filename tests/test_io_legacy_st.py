"""The legacy ST (her2st) reader on the real data in ../shared/data/her2st and on the bundled demo."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_comtip.constants import Default, Key
from napari_comtip.errors import InputError
from napari_comtip.io import bundled_sample_path, list_samples, load_sample
from napari_comtip.io.patches import read_patch
from napari_comtip.io.legacy_st import estimate_pitch_px, read_counts, read_selection, sample_files

# selected spots, selected spots without a counts row (verified against the files)
EXPECTED = {"B4": (284, 1), "C2": (187, 0), "C3": (182, 2), "C4": (187, 3)}


@pytest.fixture(scope="session")
def b4_loads(her2st_dir, tmp_path_factory):
    """B4 loaded twice: the first load decodes the JPEG and builds the pyramid, the second reopens it.

    Uses a cache folder of its own: another test may already have cached B4 in the session's cache.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("NAPARI_COMTIP_CACHE", str(tmp_path_factory.mktemp("b4-own-cache")))
    try:
        t0 = time.perf_counter()
        with pytest.warns(UserWarning, match="1 selected spot"):
            first = load_sample(her2st_dir, sample="B4")
        t1 = time.perf_counter()
        with pytest.warns(UserWarning):
            second = load_sample(her2st_dir, sample="B4")
        t2 = time.perf_counter()
    finally:
        mp.undo()
    return first, second, t1 - t0, t2 - t1


def test_list_samples(her2st_dir):
    assert list_samples(her2st_dir) == ["B4", "C2", "C3", "C4"]


@pytest.mark.parametrize("section", sorted(EXPECTED))
def test_spot_tables_match_the_files(her2st_dir, section):
    files = sample_files(her2st_dir, section)
    raw = pd.read_csv(files["selection"], sep="\t")
    spots = read_selection(files["selection"])
    n_sel, n_missing = EXPECTED[section]
    assert len(spots) == (raw["selected"] == 1).sum() == n_sel
    counts = read_counts(files["counts"])
    assert len(spots.index.difference(counts.index)) == n_missing
    assert counts.shape[1] > 14000
    # the mpp figure comes from the pitch of the spots: ~290 px per 200 um in every section
    pitch, how = estimate_pitch_px(spots)
    assert "array-neighbour" in how
    assert 280 < pitch < 300


def test_b4_loads_with_exact_numbers(b4_loads, her2st_dir):
    s, _, _, _ = b4_loads
    assert s.format == "legacy-st" and s.name == "B4"
    assert s.n_spots == 283 and s.provenance["dropped_spots"] == 1
    assert (s.width, s.height) == (9272, 9923)
    assert s.image.level_shapes[0] == (9923, 9272, 3)
    # spot 9x13: pixel_x 2307.86, pixel_y 3500.48 in B4_selection.tsv (row = pixel_y, col = pixel_x)
    assert s.spots.loc["9x13", Key.ROW] == pytest.approx(3500.48)
    assert s.spots.loc["9x13", Key.COL] == pytest.approx(2307.86)
    np.testing.assert_allclose(s.centers_rc()[s.spots.index.get_loc("9x13")], [3500.48, 2307.86])
    np.testing.assert_allclose(s.centers_xy()[s.spots.index.get_loc("9x13")], [2307.86, 3500.48])
    # scale from the spot pitch (200 um)
    assert s.mpp_source == "spot pitch (200 um)"
    assert 0.66 < s.mpp < 0.72
    assert s.spot_diameter_px() == pytest.approx(Default.LEGACY_ST_SPOT_UM / s.mpp)
    # pyramid
    assert s.image.kind == "cached pyramid" and s.image.downsamples[:3] == [1.0, 2.0, 4.0]
    assert max(s.image.level_shapes[-1][:2]) >= Default.PYRAMID_SMALLEST


def test_b4_expression(b4_loads, her2st_dir):
    s, _, _, _ = b4_loads
    a = s.expression
    assert list(a.obs_names) == list(s.spots.index)
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    assert Key.LOGNORM in a.layers
    np.testing.assert_allclose(a.obsm[Key.SPATIAL], s.centers_xy())
    assert {Key.ARRAY_ROW, Key.ARRAY_COL} <= set(a.obs.columns)
    assert a.obs.loc["9x13", Key.ARRAY_COL] == 9 and a.obs.loc["9x13", Key.ARRAY_ROW] == 13
    # counts of one spot equal the file's row
    raw = read_counts(sample_files(her2st_dir, "B4")["counts"])
    row = raw.loc["10x14"]
    got = np.asarray(a[["10x14"]].X.todense()).ravel()
    np.testing.assert_array_equal(got, row.to_numpy(dtype=np.float32))
    # lognorm = log1p(count / library size * 1e4)
    lib = row.sum()
    g = raw.columns[np.flatnonzero(row.to_numpy())[0]]
    j = list(a.var_names).index(g)
    assert a.layers[Key.LOGNORM][a.obs_names.get_loc("10x14"), j] == pytest.approx(
        np.log1p(row[g] / lib * Default.TARGET_SUM), rel=1e-5)
    assert "18x20" not in a.obs_names  # the selected spot without counts


def test_b4_second_load_reopens_the_cached_pyramid(b4_loads):
    first, second, t_first, t_second = b4_loads
    assert first.provenance["image_decoded"] is True
    assert second.provenance["image_decoded"] is False
    assert second.image.identity == first.image.identity
    assert t_second < t_first / 2, (t_first, t_second)
    c = second.centers_rc()[0]
    np.testing.assert_array_equal(read_patch(second.image, c, 254, 224), read_patch(first.image, c, 254, 224))


def test_b4_patch_shows_tissue(b4_loads):
    s, _, _, _ = b4_loads
    p = read_patch(s.image, s.centers_rc()[10], 175 / s.mpp, 112)
    assert p.shape == (112, 112, 3)
    assert p.std() > 10  # tissue, not blank glass


@pytest.mark.slow
@pytest.mark.parametrize("section,n", [("C2", 187), ("C3", 180), ("C4", 184)])
def test_other_sections_load(her2st_dir, section, n):
    s = load_sample(her2st_dir, sample=section)
    assert s.n_spots == n and s.provenance["dropped_spots"] == EXPECTED[section][1]
    assert 0.66 < s.mpp < 0.72


# --------------------------------------------------------------------------- the demo
def test_demo_alias_resolves_to_bundled_sample():
    root = bundled_sample_path()
    assert root.is_dir() and (root / "README.txt").is_file()
    assert "Nat" in (root / "README.txt").read_text() and "6012" in (root / "README.txt").read_text()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 4e6
    assert list_samples("@demo") == ["C2"]
    s = load_sample("@demo")
    assert s.name == "C2" and s.format == "legacy-st"
    assert s.n_spots == 187 and s.provenance["dropped_spots"] == 0
    assert s.mpp_source == "spot pitch (200 um)"
    assert s.image.kind == "in-memory" and len(s.image.levels) == 1
    assert s.n_genes > 10000


def test_demo_scale_is_twice_the_source_section(her2st_dir):
    """Downsampled by 2: the pitch-derived mpp doubles, every spot stays on the image."""
    demo = load_sample("@demo")
    full = read_selection(sample_files(her2st_dir, "C2")["selection"])
    pitch_full, _ = estimate_pitch_px(full)
    mpp_full = Default.LEGACY_ST_PITCH_UM / pitch_full
    assert demo.mpp == pytest.approx(2 * mpp_full, rel=0.01)
    rc = demo.centers_rc()
    assert (rc >= 0).all() and (rc[:, 0] < demo.height).all() and (rc[:, 1] < demo.width).all()
    # the crop keeps a margin of about one pitch around the spots
    pitch_demo = Default.LEGACY_ST_PITCH_UM / demo.mpp
    assert rc[:, 0].min() >= 0.9 * pitch_demo and rc[:, 1].min() >= 0.9 * pitch_demo


def test_demo_unknown_sample_and_mpp_override():
    with pytest.raises(InputError, match=r"unknown sample 'Z9'.*available samples: C2"):
        load_sample("@demo", sample="Z9")
    s = load_sample("@demo", mpp=2.0)
    assert s.mpp == 2.0 and s.mpp_source.startswith("--mpp override")
    assert s.spot_diameter_px() == pytest.approx(Default.LEGACY_ST_SPOT_UM / 2.0)
    with pytest.raises(InputError, match="unknown alias"):
        load_sample("@nothing")


# --------------------------------------------------------------------------- bad legacy folders
@pytest.fixture(scope="module")
def demo_counts_small():
    """The demo's counts restricted to 300 genes, so the bad-input tests rewrite small files."""
    df = read_counts(bundled_sample_path() / "ST-cnts" / "C2.tsv.gz")
    return df.iloc[:, :300].copy()


@pytest.fixture()
def demo_copy(tmp_path, demo_counts_small):
    dst = tmp_path / "her2st"
    shutil.copytree(bundled_sample_path(), dst)
    (dst / "ST-cnts" / "C2.tsv.gz").unlink()
    demo_counts_small.to_csv(dst / "ST-cnts" / "C2.tsv", sep="\t")
    return dst


def _counts_path(root):
    return root / "ST-cnts" / "C2.tsv"


def test_counts_sharing_no_ids(demo_copy):
    df = pd.read_csv(_counts_path(demo_copy), sep="\t", index_col=0)
    df.index = [f"spot{i}" for i in range(len(df))]
    df.to_csv(_counts_path(demo_copy), sep="\t")
    with pytest.raises(InputError, match=r"C2\.tsv.*share no spot ids"):
        load_sample(demo_copy)


def test_partial_mismatch_keeps_common_spots_and_warns(demo_copy):
    df = pd.read_csv(_counts_path(demo_copy), sep="\t", index_col=0)
    df.iloc[5:].to_csv(_counts_path(demo_copy), sep="\t")
    with pytest.warns(UserWarning, match="5 selected spot"):
        s = load_sample(demo_copy)
    assert s.n_spots == 182 and s.provenance["dropped_spots"] == 5
    assert s.summary()["dropped_spots"] == 5


@pytest.mark.parametrize("bad,match", [(np.nan, "NaN"), (-3, "negative")])
def test_nan_or_negative_counts(demo_copy, bad, match):
    df = pd.read_csv(_counts_path(demo_copy), sep="\t", index_col=0).astype(float)
    df.iloc[2, 7] = bad
    df.to_csv(_counts_path(demo_copy), sep="\t")
    with pytest.raises(InputError, match=rf"C2\.tsv.*{match}"):
        load_sample(demo_copy)


def test_duplicated_spot_ids(demo_copy):
    df = pd.read_csv(_counts_path(demo_copy), sep="\t", index_col=0)
    pd.concat([df, df.iloc[:1]]).to_csv(_counts_path(demo_copy), sep="\t")
    with pytest.raises(InputError, match=r"C2\.tsv.*duplicated"):
        load_sample(demo_copy)


def test_spots_outside_the_image(demo_copy):
    sel = demo_copy / "ST-spotfiles" / "C2_selection.tsv"
    df = pd.read_csv(sel, sep="\t")
    df["pixel_x"] *= 2  # as if the coordinates were for the full-resolution image
    df["pixel_y"] *= 2
    df.to_csv(sel, sep="\t", index=False)
    with pytest.raises(InputError, match=r"C2_selection\.tsv.*fall outside.*scale 1"):
        load_sample(demo_copy)


def test_a_few_spots_outside_are_dropped(demo_copy):
    sel = demo_copy / "ST-spotfiles" / "C2_selection.tsv"
    df = pd.read_csv(sel, sep="\t")
    sel_idx = df.index[df["selected"] == 1][:3]
    df.loc[sel_idx, "pixel_x"] = -500
    df.to_csv(sel, sep="\t", index=False)
    with pytest.warns(UserWarning, match="outside the image"):
        s = load_sample(demo_copy)
    assert s.n_spots == 184 and s.provenance["spots_outside_image"] == 3


def test_truncated_image(demo_copy):
    img = next((demo_copy / "ST-imgs").rglob("*.jpg"))
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"5714_HE_BT_C2\.jpg.*truncated"):
        load_sample(demo_copy)


def test_missing_image_and_multi_sample_needs_a_name(demo_copy):
    shutil.copy(demo_copy / "ST-cnts" / "C2.tsv", demo_copy / "ST-cnts" / "C9.tsv")
    shutil.copy(demo_copy / "ST-spotfiles" / "C2_selection.tsv", demo_copy / "ST-spotfiles" / "C9_selection.tsv")
    with pytest.raises(InputError, match=r"2 sections \(C2, C9\).*--sample"):
        load_sample(demo_copy)
    with pytest.raises(InputError, match=r"no H&E image found for section C9"):
        load_sample(demo_copy, sample="C9")


def test_truncated_real_her2st_jpeg_with_exif_thumbnail(her2st_dir, tmp_path):
    """The her2st JPEGs carry an EXIF thumbnail (its own end marker): a cut file is still refused."""
    from napari_comtip.io.decode import decode_image

    src = sample_files(her2st_dir, "C2")["image"]
    data = src.read_bytes()
    assert data.find(b"\xff\xd9") < len(data) // 2  # the thumbnail's end-of-image marker
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.jpg.*truncated"):
        decode_image(bad)
