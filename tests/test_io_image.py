"""MultiscaleImage: pyramids, the zarr pyramid cache, tiffslide slides, scaled (Visium) levels.

The helpers at the top (``make_ome_tiff``, ``make_blob_rgb``) build small real inputs and are
imported by the other ``test_io_*`` files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_comtip.constants import Default
from napari_comtip.errors import InputError
from napari_comtip.io.image import MultiscaleImage, build_pyramid_levels, is_blank, to_rgb_uint8
from napari_comtip.io.pyramid import pyramid_cache_path
from napari_comtip.io.slide import open_image


# --------------------------------------------------------------------------- helpers (shared)
def make_blob_rgb(h: int, w: int, centre=None, radii=None, seed: int = 0) -> np.ndarray:
    """A white slide with a pink/purple elliptical 'tissue' blob with some texture."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.uint8)
    cy, cx = centre if centre is not None else (h / 2, w / 2)
    ry, rx = radii if radii is not None else (h / 3, w / 3)
    yy, xx = np.ogrid[:h, :w]
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    n = int(blob.sum())
    tex = rng.integers(-20, 20, size=(n, 1), dtype=np.int16)
    img[blob] = (np.array([190, 90, 170], np.int16)[None, :] + tex).astype(np.uint8)
    return img


def make_ome_tiff(path: Path, img: np.ndarray, mpp: float | None = 0.5, compression: str = "zlib") -> Path:
    """A pyramidal OME-TIFF (SubIFD levels, tiled) with the physical pixel size, via tifffile."""
    import tifffile

    levels = build_pyramid_levels(img, smallest=256)
    meta = {"axes": "YXS"}
    res = {}
    if mpp:
        meta.update({"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
        res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    opts = dict(tile=(256, 256), compression=compression, photometric="rgb")
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **res, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    return path


# --------------------------------------------------------------------------- pixel helpers
def test_to_rgb_uint8_variants():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_uint8(g).shape == (3, 4, 3)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white
    assert (to_rgb_uint8(rgba) == 255).all()
    rgba[..., 3] = 255
    assert (to_rgb_uint8(rgba) == 0).all()
    u16 = np.full((2, 2, 3), 65535, np.uint16)
    assert (to_rgb_uint8(u16) == 255).all()
    f = np.full((2, 2, 3), 0.5, np.float32)
    assert (to_rgb_uint8(f) == 127).all()


def test_is_blank():
    assert is_blank(np.zeros((100, 100, 4), np.uint8))
    assert not is_blank(make_blob_rgb(100, 120))


# --------------------------------------------------------------------------- pyramid + geometry
def test_pyramid_levels_and_downsamples():
    img = make_blob_rgb(1100, 1300)
    levels = build_pyramid_levels(img, smallest=256)
    assert [lv.shape[:2] for lv in levels] == [(1100, 1300), (550, 650), (275, 325)]
    # box average of 2x2 blocks
    np.testing.assert_allclose(levels[1][10, 20].astype(float),
                               img[20:22, 40:42].reshape(-1, 3).mean(0), atol=1)
    mi = MultiscaleImage(levels, [1.0, 2.0, 4.0])
    assert mi.shape == (1100, 1300, 3)
    assert mi.best_level(1.0) == 0 and mi.best_level(1.9) == 0 and mi.best_level(2.0) == 1
    assert mi.best_level(100) == 2 and mi.best_level(0.5) == 0
    # read_region: full-resolution corner, level pixels, padded outside
    r = mi.read_region(1, 100, 200, 30, 40)
    np.testing.assert_array_equal(r, levels[1][50:80, 100:140])
    edge = mi.read_region(0, -10, -5, 20, 20, pad_value=7)
    assert (edge[:10] == 7).all() and (edge[:, :5] == 7).all()
    np.testing.assert_array_equal(edge[10:, 5:], img[:10, :15])
    d = mi.as_dask()
    assert [tuple(x.shape) for x in d] == mi.level_shapes
    np.testing.assert_array_equal(np.asarray(d[2][5:9, 5:9]), levels[2][5:9, 5:9])
    th = mi.thumbnail(130)
    assert th.shape == (110, 130, 3)


def test_scaled_single_level_is_addressed_in_full_resolution():
    """A Visium-style hires image: level 0 downsample 1/scalef, shape = full-resolution extent."""
    scalef = 0.2
    hires = make_blob_rgb(200, 300)
    mi = MultiscaleImage([hires], [1 / scalef])
    assert mi.shape == (1000, 1500, 3)
    assert mi.level_shapes == [(200, 300, 3)]
    assert mi.base_scale == pytest.approx(5.0)
    # full-res (row 500, col 750) -> hires (100, 150)
    np.testing.assert_array_equal(mi.read_region(0, 500, 750, 4, 4), hires[100:104, 150:154])
    assert mi.best_level(1.0) == 0  # nothing finer exists: upsample from level 0


# --------------------------------------------------------------------------- cached pyramid
@pytest.fixture()
def small_min_side(monkeypatch):
    monkeypatch.setattr(Default, "PYRAMID_MIN_SIDE", 512)
    monkeypatch.setattr(Default, "PYRAMID_SMALLEST", 128)


def test_large_jpeg_gets_cached_pyramid_and_reopens_without_decoding(tmp_path, small_min_side):
    src = tmp_path / "slide.jpg"
    img = make_blob_rgb(700, 900)
    Image.fromarray(img).save(src, quality=95)
    first, mpp = open_image(src)
    assert mpp is None
    assert first.kind == "cached pyramid" and first.info["decoded"] is True
    assert first.level_shapes[0] == (700, 900, 3) and len(first.levels) >= 3
    folder = pyramid_cache_path(src)
    assert (folder / "meta.json").is_file()
    assert folder.parent.parent == Path(os.environ["NAPARI_COMTIP_CACHE"])
    # no temp folders left behind, nothing written next to the data
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.jpg"]

    second, _ = open_image(src)
    assert second.info["decoded"] is False and second.kind == "cached pyramid"
    np.testing.assert_array_equal(np.asarray(second.levels[1][:, :]), np.asarray(first.levels[1][:, :]))
    dec = np.asarray(Image.open(src))
    np.testing.assert_array_equal(np.asarray(second.levels[0][:, :]), dec)

    # the file changes -> another key, rebuilt
    time.sleep(0.01)
    Image.fromarray(img[::-1].copy()).save(src, quality=95)
    third, _ = open_image(src)
    assert third.info["decoded"] is True
    assert pyramid_cache_path(src) != folder


def test_broken_cache_entry_is_rebuilt(tmp_path, small_min_side):
    src = tmp_path / "slide.png"
    Image.fromarray(make_blob_rgb(600, 700)).save(src)
    folder = pyramid_cache_path(src)
    folder.mkdir(parents=True)
    (folder / "0").mkdir()  # a killed build without meta.json
    img, _ = open_image(src)
    assert img.info["decoded"] is True
    assert (folder / "meta.json").is_file()


def test_small_image_stays_in_memory(tmp_path):
    src = tmp_path / "small.png"
    arr = make_blob_rgb(300, 400)
    Image.fromarray(arr).save(src)
    img, _ = open_image(src)
    assert img.kind == "in-memory" and len(img.levels) == 1
    assert isinstance(img.levels[0], np.ndarray)
    np.testing.assert_array_equal(img.levels[0], arr)


# --------------------------------------------------------------------------- tiffslide
def test_pyramidal_ome_tiff_is_read_lazily_through_tiffslide(tmp_path):
    arr = make_blob_rgb(2000, 3000)
    path = make_ome_tiff(tmp_path / "slide.ome.tif", arr, mpp=0.5, compression="jpeg")
    img, mpp = open_image(path)
    assert img.kind == "tiffslide"
    assert mpp == pytest.approx(0.5)
    assert img.shape == (2000, 3000, 3)
    assert len(img.levels) >= 3 and img.downsamples[:3] == [1.0, 2.0, 4.0]
    assert not any(isinstance(lv, np.ndarray) for lv in img.levels)  # zarr arrays, not decoded
    assert not img.info.get("decoded")
    reg = img.read_region(0, 900, 1400, 64, 64)
    assert np.abs(reg.astype(int) - arr[900:964, 1400:1464].astype(int)).mean() < 6  # JPEG tiles
    reg1 = img.read_region(1, 900, 1400, 32, 32)
    ref1 = build_pyramid_levels(arr, smallest=256)[1][450:482, 700:732]
    assert np.abs(reg1.astype(int) - ref1.astype(int)).mean() < 6
    assert len(img.as_dask()) == len(img.levels)


def test_tiff_without_mpp(tmp_path):
    path = make_ome_tiff(tmp_path / "nompp.ome.tif", make_blob_rgb(600, 800), mpp=None)
    img, mpp = open_image(path)
    assert mpp is None and img.shape == (600, 800, 3)


# --------------------------------------------------------------------------- bad images
def test_truncated_jpeg_is_refused(tmp_path, small_min_side):
    good = tmp_path / "good.jpg"
    Image.fromarray(make_blob_rgb(700, 900)).save(good, quality=90)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match=r"bad\.jpg.*truncated"):
        open_image(bad)
    assert not [p for p in pyramid_cache_path(bad).parent.iterdir() if p.name.startswith(".")]


def test_truncated_png_and_garbage_are_refused(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(make_blob_rgb(300, 300)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(InputError, match=r"bad\.png"):
        open_image(bad)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff" * 10)
    with pytest.raises(InputError, match=r"junk\.tif"):
        open_image(junk)
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------- reopening in another process
def test_file_backed_images_reopen_from_their_spec(tmp_path, small_min_side):
    import pickle

    from napari_comtip.io.slide import reopen_image

    src = tmp_path / "slide.jpg"
    Image.fromarray(make_blob_rgb(700, 900)).save(src, quality=95)
    tiff = make_ome_tiff(tmp_path / "slide.ome.tif", make_blob_rgb(2000, 3000), mpp=0.5, compression="jpeg")
    for path, kind in ((src, "cached pyramid"), (tiff, "tiffslide")):
        img, _ = open_image(path)
        spec = img.reopen_spec()
        assert spec[0] == kind
        again = reopen_image(pickle.loads(pickle.dumps(spec)))  # what a reader process receives
        assert again.identity == img.identity and again.kind == kind
        assert again.downsamples == img.downsamples and again.level_shapes == img.level_shapes
        for lvl in (0, len(img.levels) - 1):
            np.testing.assert_array_equal(again.read_level_window(lvl, 5, 7, 40, 30),
                                          img.read_level_window(lvl, 5, 7, 40, 30))
    # in-memory images have no spec (their pixels would have to be copied)
    assert MultiscaleImage.from_array(make_blob_rgb(64, 64)).reopen_spec() is None
    # the file changed since: refused with the file's name
    time.sleep(0.01)
    make_ome_tiff(tiff, make_blob_rgb(1000, 1000), mpp=0.5, compression="jpeg")
    with pytest.raises(InputError, match="changed or disappeared"):
        reopen_image(spec)
