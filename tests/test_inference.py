"""The batched embedding engine: exact results, cache and its signature, cancel, OOM halving, streaming.

A real tiny CoMTIP model (untrained weights) and a real multiscale image (a textured RGB array with
a pyramid) are used throughout; the reference for every embedding is the model run directly on the
patch that ``io.patches.read_patch`` cuts for that spot.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from napari_comtip.constants import Key
from napari_comtip.engine import embedding_cache, encoder, inference, readers
from napari_comtip.engine.embedding_cache import embeddings_cache_root
from napari_comtip.engine.inference import Embeddings, embed_sample
from napari_comtip.errors import Cancelled, InputError
from napari_comtip.io import tiles
from napari_comtip.io.image import MultiscaleImage
from napari_comtip.io.patches import patch_geometry, read_patch
from napari_comtip.io.record import SpatialSample

PANEL = ["ERBB2", "KRT19", "CD74", "COL1A1", "ACTB", "SCGB2A2"]


@pytest.fixture(scope="session")
def tiny_model():
    from napari_comtip.model import build_model, get_preset

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.text.use_name_embedding = False  # the image path is identical; skips loading the text model
    return build_model(cfg, PANEL).eval()


def _sample(n: int = 40, seed: int = 0, name: str = "synthetic") -> SpatialSample:
    rng = np.random.default_rng(seed)
    side = 1600
    blocks = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)
    image = MultiscaleImage.from_array(img, pyramid=True, identity=f"synthetic-{seed}-{side}")
    rc = rng.uniform(-20, side + 20, size=(n, 2))  # a few patches reach past the edge (padding)
    spots = pd.DataFrame({Key.ROW: rc[:, 0], Key.COL: rc[:, 1], Key.DIAMETER: 50.0},
                         index=[f"spot{i:03d}" for i in range(n)])
    return SpatialSample(name=name, image=image, mpp=1.0, mpp_source="test", spots=spots)


def _direct(model, sample, idx, features=False):
    """The model applied to read_patch's patches one by one: the ground truth."""
    side = patch_geometry(sample.mpp, model.config.patch_um, model.img_size)
    rc = sample.centers_rc()
    patches = np.stack([read_patch(sample.image, rc[i], side, model.img_size) for i in idx])
    with torch.inference_mode():
        x = model.preprocess(torch.from_numpy(patches))
        if features:
            return model.probe_features(x).numpy()
        return model.encode_image(x).numpy()


class _ForwardCounter:
    """Counts how many images went through the ViT (a forward hook on the real module)."""

    def __init__(self, model):
        self.images = 0
        self.handle = model.vision.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.images += int(args[0].shape[0])

    def close(self):
        self.handle.remove()


def _entries():
    root = embeddings_cache_root()
    return sorted(p for p in root.iterdir())


# --------------------------------------------------------------------------- correctness
def test_embeddings_equal_the_model_on_each_patch(tiny_model):
    s = _sample(19)
    emb = embed_sample(s, tiny_model, device="cpu", batch_size=8, cache=False, features=True)
    assert isinstance(emb, Embeddings)
    assert emb.image.shape == (19, tiny_model.embed_dim) and emb.image.dtype == np.float32
    # the probe's features: the pooled ViT features, then the colour statistics (tiny: vision.colour_features)
    n_colour = 70 if tiny_model.config.vision.colour_features else 0
    assert emb.features.shape == (19, tiny_model.feature_dim + n_colour) and emb.features.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb.image, axis=1), 1.0, atol=1e-5)
    idx = [0, 7, 8, 16, 18]  # batch boundaries and the short last batch
    np.testing.assert_allclose(emb.image[idx], _direct(tiny_model, s, idx), atol=2e-5)
    np.testing.assert_allclose(emb.features[idx], _direct(tiny_model, s, idx, features=True), atol=2e-4)
    assert emb.device == "cpu" and emb.precision == "fp32" and emb.batch_size == 8 and not emb.cached
    assert emb.timings["compute"] > 0 and emb.timings["spots_per_s"] > 0
    # different spots really give different embeddings (the patches are read at their centres)
    assert np.abs(emb.image[0] - emb.image[1]).max() > 1e-3


def test_batch_size_and_workers_do_not_change_results(tiny_model):
    s = _sample(11, seed=1)
    a = embed_sample(s, tiny_model, device="cpu", batch_size=3, cache=False, read_workers=1, prefetch=1)
    b = embed_sample(s, tiny_model, device="cpu", batch_size=64, cache=False, read_workers=3, prefetch=4)
    c = embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, read_workers=0)  # in line
    np.testing.assert_allclose(a.image, b.image, atol=2e-5)
    np.testing.assert_allclose(c.image, b.image, atol=2e-5)


def _encode_threads():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("comtip-encode")]


@pytest.mark.parametrize("streams", [2, 3])
def test_cpu_streams_give_the_results_of_one_stream(tiny_model, streams):
    """Batches encoded side by side land in their own rows (spatial order, short last batch)."""
    s = _sample(23, seed=11)
    threads = torch.get_num_threads()
    one = embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, features=True, cpu_streams=1)
    many = embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, features=True, cpu_streams=streams)
    assert one.timings["streams"] == 1 and many.timings["streams"] == streams
    np.testing.assert_allclose(many.image, one.image, atol=2e-5)
    np.testing.assert_allclose(many.features, one.features, atol=2e-4)
    np.testing.assert_allclose(many.image[[0, 22]], _direct(tiny_model, s, [0, 22]), atol=2e-5)
    assert many.timings["read"] > 0 and many.timings["compute"] > 0
    assert torch.get_num_threads() == threads  # the process-wide setting is restored
    assert not _encode_threads()


def test_cpu_streams_split_the_threads_and_restore_them(tiny_model, monkeypatch):
    s = _sample(12, seed=12)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        seen = []
        real = encoder.Encoder.run

        def spy(self, batch):
            seen.append(torch.get_num_threads())
            return real(self, batch)

        monkeypatch.setattr(encoder.Encoder, "run", spy)
        embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, cpu_streams=2)
        assert seen and set(seen) == {2}  # 4 threads over 2 streams
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_default_cpu_streams(tiny_model, monkeypatch):
    from napari_comtip.constants import Default

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert inference.default_cpu_streams(torch.device("cpu")) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert inference.default_cpu_streams(torch.device("cpu")) == 1  # one thread: the single-stream path
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert inference.default_cpu_streams(torch.device("cpu")) == Default.CPU_STREAMS_MAX
    assert inference.default_cpu_streams(torch.device("cuda")) == 1
    with pytest.raises(InputError, match="cpu_streams"):
        embed_sample(_sample(2), tiny_model, device="cpu", cpu_streams=0)


def test_a_failing_stream_stops_the_run_cleanly(tiny_model, monkeypatch):
    """An error while reading in a stream reaches the caller; threads, settings and cache are clean."""
    s = _sample(20, seed=13, name="streamfail")
    before_entries = _entries()
    threads = torch.get_num_threads()
    calls = {"n": 0}
    real = readers.PatchReader._read_into

    def flaky(self, buf, start, stop):
        calls["n"] += 1
        if start >= 8:
            raise InputError("the slide became unreadable", hint="test")
        return real(self, buf, start, stop)

    monkeypatch.setattr(readers.PatchReader, "_read_into", flaky)
    with pytest.raises(InputError, match="unreadable"):
        embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=True, cpu_streams=2)
    assert torch.get_num_threads() == threads
    assert not _encode_threads()
    assert _entries() == before_entries


def test_training_mode_is_restored(tiny_model):
    s = _sample(4, seed=2)
    tiny_model.train()
    try:
        embed_sample(s, tiny_model, device="cpu", cache=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_empty_sample_and_bad_batch_size(tiny_model):
    s = _sample(3)
    empty = SpatialSample(name="empty", image=s.image, mpp=1.0, mpp_source="test", spots=s.spots.iloc[:0])
    with pytest.raises(InputError, match="no spots"):
        embed_sample(empty, tiny_model, device="cpu")
    with pytest.raises(InputError, match="batch size"):
        embed_sample(s, tiny_model, device="cpu", batch_size=-1)


# --------------------------------------------------------------------------- cache
def test_cache_hit_skips_the_encoder(tiny_model):
    s = _sample(14, seed=3, name="cachehit")
    first = embed_sample(s, tiny_model, device="cpu", batch_size=16, cache=True)
    assert not first.cached and first.cache_path is not None and first.cache_path.is_dir()
    counter = _ForwardCounter(tiny_model)
    try:
        again = embed_sample(s, tiny_model, device="cpu", batch_size=16, cache=True)
    finally:
        counter.close()
    assert again.cached and counter.images == 0
    np.testing.assert_array_equal(again.image, first.image)
    sig = json.loads((first.cache_path / "signature.json").read_text())
    assert sig["coords_sha256"] == embedding_cache.coords_digest(s)
    assert sig["weights_digest"] == embedding_cache.weights_digest(tiny_model)
    assert sig["patch_um"] == tiny_model.config.patch_um and sig["img_size"] == tiny_model.img_size
    # features were not cached: asking for them recomputes (once), then they are cached too
    counter = _ForwardCounter(tiny_model)
    try:
        f1 = embed_sample(s, tiny_model, device="cpu", cache=True, features=True)
        n_after_first = counter.images
        f2 = embed_sample(s, tiny_model, device="cpu", cache=True, features=True)
    finally:
        counter.close()
    assert not f1.cached and n_after_first == 14 and f2.cached and counter.images == 14
    np.testing.assert_array_equal(f1.features, f2.features)


@pytest.mark.parametrize("field,value", [("weights_digest", "0" * 16), ("patch_um", 55.0), ("img_size", 224),
                                         ("sample_identity", "another slide"), ("format", -1)])
def test_mismatched_signature_is_recomputed_not_reused(tiny_model, field, value):
    s = _sample(6, seed=4, name=f"sig-{field}")
    first = embed_sample(s, tiny_model, device="cpu", cache=True)
    sig_file = first.cache_path / "signature.json"
    sig = json.loads(sig_file.read_text())
    sig[field] = value
    sig_file.write_text(json.dumps(sig))
    # poison the stored arrays: a wrongly reused entry would return these zeros
    np.save(first.cache_path / "image.npy", np.zeros_like(first.image))
    counter = _ForwardCounter(tiny_model)
    try:
        again = embed_sample(s, tiny_model, device="cpu", cache=True)
    finally:
        counter.close()
    assert not again.cached and counter.images == 6
    np.testing.assert_allclose(again.image, first.image, atol=1e-6)
    # the entry was replaced by a good one
    assert json.loads(sig_file.read_text())[field] != value
    assert embed_sample(s, tiny_model, device="cpu", cache=True).cached


def test_wrong_shaped_cached_array_is_recomputed(tiny_model):
    s = _sample(6, seed=5, name="shape")
    first = embed_sample(s, tiny_model, device="cpu", cache=True)
    np.save(first.cache_path / "image.npy", np.zeros((5, first.image.shape[1]), np.float32))
    again = embed_sample(s, tiny_model, device="cpu", cache=True)
    assert not again.cached
    np.testing.assert_allclose(again.image, first.image, atol=1e-6)


def test_moved_spots_or_changed_weights_use_another_entry(tiny_model):
    s = _sample(10, seed=6, name="keys")
    first = embed_sample(s, tiny_model, device="cpu", cache=True)
    moved = _sample(10, seed=6, name="keys")
    moved.spots.iloc[3, moved.spots.columns.get_loc(Key.ROW)] += 40.0
    m = embed_sample(moved, tiny_model, device="cpu", cache=True)
    assert not m.cached and m.cache_path != first.cache_path
    assert np.abs(m.image[3] - first.image[3]).max() > 1e-4
    np.testing.assert_allclose(m.image[[0, 1, 2, 4]], first.image[[0, 1, 2, 4]], atol=1e-6)
    # fine-tuning the weights in place (an optimizer step) changes the digest
    p = tiny_model.image_proj.bias
    saved = p.detach().clone()
    old_digest = embedding_cache.weights_digest(tiny_model)
    with torch.no_grad():
        p.add_(0.01)
    try:
        assert embedding_cache.weights_digest(tiny_model) != old_digest
        assert not embed_sample(s, tiny_model, device="cpu", cache=True).cached
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert embed_sample(s, tiny_model, device="cpu", cache=True).cached


# --------------------------------------------------------------------------- progress, cancel
def test_progress_and_cancel_between_batches(tiny_model):
    s = _sample(20, seed=7, name="cancel")
    calls = []
    embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False,
                 progress=lambda d, t, m: calls.append((d, t)))
    assert [d for d, _ in calls] == [4, 8, 12, 16, 20] and all(t == 20 for _, t in calls)

    before = _entries()
    seen = []

    def cancel():
        return len(seen) >= 2

    threads = torch.get_num_threads()
    # in line, with reader threads (which must stop too), and in two encoder streams
    for workers, streams in ((0, 1), (2, 1), (0, 2)):
        seen.clear()
        with pytest.raises(Cancelled, match="cancelled after 8 of 20"):
            embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=True, read_workers=workers,
                         cpu_streams=streams, progress=lambda d, t, m: seen.append(d), cancel=cancel)
        assert seen == [4, 8]
        assert _entries() == before  # no entry and no temporary folder left behind
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith(("comtip-read", "comtip-encode"))]
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------- out of memory
def test_cuda_oom_halves_the_batch_and_continues(tiny_model, monkeypatch, caplog):
    s = _sample(13, seed=8)
    ref = embed_sample(s, tiny_model, device="cpu", batch_size=16, cache=False)
    real = tiny_model.encode_image
    sizes = []

    def fails_above_4(x):  # what a GPU with room for 4 patches does
        sizes.append(int(x.shape[0]))
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    monkeypatch.setattr(tiny_model, "encode_image", fails_above_4)
    with caplog.at_level("WARNING"):
        emb = embed_sample(s, tiny_model, device="cpu", batch_size=16, cache=False)
    assert emb.batch_size == 4 and emb.timings["halvings"] == 2
    assert sizes[:3] == [13, 8, 4] and max(sizes[3:]) <= 4
    assert "batch halved to 4" in caplog.text
    np.testing.assert_allclose(emb.image, ref.image, atol=2e-5)

    def always_fails(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(tiny_model, "encode_image", always_fails)
    with pytest.raises(InputError, match="out of GPU memory even one patch at a time"):
        embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False)


# --------------------------------------------------------------------------- streaming to disk
def test_streamed_embeddings_are_memory_maps_and_identical(tiny_model):
    s = _sample(11, seed=9, name="stream")
    mem = embed_sample(s, tiny_model, device="cpu", batch_size=8, cache=False, stream=False)
    before = _entries()
    st = embed_sample(s, tiny_model, device="cpu", batch_size=8, cache=False, stream=True, features=True)
    assert isinstance(st.image, np.memmap) and not st.image.flags.writeable
    np.testing.assert_array_equal(np.asarray(st.image), mem.image)
    assert _entries() == before  # uncached streaming leaves no files behind
    cached = embed_sample(s, tiny_model, device="cpu", batch_size=8, cache=True, stream=True, features=True)
    assert isinstance(cached.image, np.memmap) and cached.cache_path is not None
    np.testing.assert_array_equal(np.asarray(cached.features), np.asarray(st.features))
    again = embed_sample(s, tiny_model, device="cpu", cache=True, stream=True, features=True)
    assert again.cached and isinstance(again.image, np.memmap)


def test_stream_threshold_is_automatic(tiny_model, monkeypatch):
    s = _sample(4, seed=10, name="auto-stream")
    monkeypatch.setattr(inference.Default, "EMBED_STREAM_BYTES", 1024)
    emb = embed_sample(s, tiny_model, device="cpu", cache=False)
    assert isinstance(emb.image, np.memmap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_in_bf16(tiny_model):
    s = _sample(64, seed=11)
    cpu = embed_sample(s, tiny_model, device="cpu", cache=False)
    gpu = embed_sample(s, tiny_model, device="cuda", cache=False)
    tiny_model.to("cpu")
    assert gpu.device.startswith("cuda") and gpu.precision in ("bf16", "fp16")
    cos = (cpu.image * gpu.image).sum(axis=1)
    assert cos.min() > 0.98, cos.min()


# --------------------------------------------------------------------------- tile-cached reading
def _write_tiled_tiff(path, rng, side=(1000, 1300), tile=256):
    import tifffile

    img = np.repeat(np.repeat(rng.integers(0, 256, (side[0] // 8, side[1] // 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    opts = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(img, subifds=1, resolution=(2e4, 2e4), metadata={"axes": "YXS"}, **opts)
        tif.write(img[::2, ::2], subfiletype=1, resolution=(1e4, 1e4), **opts)
    return path


def _random_windows(image, rng, n=40):
    for _ in range(n):
        lvl = int(rng.integers(0, image.n_levels))
        H, W = image.level_shapes[lvl][:2]
        r, c = rng.integers(-200, H, 1)[0], rng.integers(-200, W, 1)[0]
        h, w = rng.integers(1, 600, 2)
        yield lvl, int(r), int(c), int(h), int(w)


@pytest.mark.parametrize("max_bytes", [None, 300_000])  # default, and a cache that must evict
def test_tile_cache_gives_the_pixels_of_a_tiled_tiff(tmp_path, max_bytes):
    from napari_comtip.io.slide import open_image

    rng = np.random.default_rng(0)
    image, mpp = open_image(_write_tiled_tiff(tmp_path / "slide.ome.tif", rng))
    assert image.kind == "tiffslide" and image.n_levels == 2 and mpp == pytest.approx(0.5)
    view = tiles.TileCachedImage(image, max_bytes=max_bytes)
    assert [type(view.source(i)).__name__ for i in range(2)] == ["_TiffTiles", "_TiffTiles"]  # no zarr per read
    for lvl, r, c, h, w in _random_windows(image, rng):
        np.testing.assert_array_equal(view.read_level_window(lvl, r, c, h, w, pad_value=7),
                                      image.read_level_window(lvl, r, c, h, w, pad_value=7))
    for c in rng.uniform(-50, 1300, size=(20, 2)):
        np.testing.assert_array_equal(read_patch(view, c, 175.0, 64), read_patch(image, c, 175.0, 64))
    assert view.hits > 0
    if max_bytes:
        assert view._bytes <= max_bytes
    view.close()


def test_tile_cache_slab_slots_are_reused_safely_across_threads(tmp_path):
    """Cached tiles live in a slab of a few slots that are reused on eviction: reads from several
    threads at once still give exactly the image's pixels (hits are copied under the lock)."""
    from napari_comtip.io.slide import open_image

    rng = np.random.default_rng(3)
    image, _ = open_image(_write_tiled_tiff(tmp_path / "slide.ome.tif", rng))
    view = tiles.TileCachedImage(image, max_bytes=4 * 256 * 256 * 3)  # 4 slots, many evictions
    wins = list(_random_windows(image, rng, n=120))

    def check(chunk):
        for lvl, r, c, h, w in chunk:
            np.testing.assert_array_equal(view.read_level_window(lvl, r, c, h, w),
                                          image.read_level_window(lvl, r, c, h, w))
        return len(chunk)

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(check, [wins[i::4] for i in range(4)])) == len(wins)
    assert view._slab is not None and view._slab.shape[0] == 4
    assert len(view._cache) <= 4 and view._bytes <= 4 * 256 * 256 * 3
    assert sorted(view._free + list(view._slot_of.values())) == [0, 1, 2, 3]  # no slot lost or shared
    view.close()


def test_tile_cache_slots_have_the_full_tile_shape_even_if_an_edge_tile_comes_first(tmp_path):
    from napari_comtip.io.slide import open_image

    rng = np.random.default_rng(4)
    image, _ = open_image(_write_tiled_tiff(tmp_path / "slide.ome.tif", rng, side=(1000, 1300)))
    view = tiles.TileCachedImage(image)
    H, W = image.level_shapes[0][:2]
    edge = view.read_level_window(0, H - 10, W - 10, 10, 10)  # the bottom-right (partial) tile first
    np.testing.assert_array_equal(edge, image.read_level_window(0, H - 10, W - 10, 10, 10))
    assert view._slab is not None and view._slab.shape[1:] == (256, 256, 3)
    view.read_level_window(0, 0, 0, 10, 10)  # a full interior tile then goes into a slot too
    assert len(view._slot_of) == 2
    view.close()


def test_heap_trimmer_calls_malloc_trim_at_most_every_interval(monkeypatch):
    calls = []
    t = readers.HeapTrimmer(every_s=0.05)
    if t._trim is None:
        pytest.skip("not glibc")
    monkeypatch.setattr(t, "_trim", lambda pad: calls.append(pad) or 1)
    for _ in range(3):
        t.maybe()  # too soon after creation
    assert calls == []
    time.sleep(0.06)
    t.maybe()
    t.maybe()
    assert calls == [0] and t.calls == 1
    assert readers.HeapTrimmer(every_s=0)._trim is None  # 0 switches it off


def test_tile_cache_on_chunked_zarr_levels(tmp_path):
    import zarr

    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    levels = []
    for i, a in enumerate([base, base[::2, ::2]]):
        z = zarr.open_array(str(tmp_path / f"l{i}.zarr"), mode="w", shape=a.shape, chunks=(128, 128, 3), dtype="uint8")
        z[:] = a
        levels.append(z)
    image = MultiscaleImage(levels, [1.0, 2.0], identity="zarr-test")
    view = tiles.TileCachedImage(image)
    assert [type(view.source(i)).__name__ for i in range(2)] == ["_ArrayChunks", "_ArrayChunks"]
    for lvl, r, c, h, w in _random_windows(image, rng):
        np.testing.assert_array_equal(view.read_level_window(lvl, r, c, h, w),
                                      image.read_level_window(lvl, r, c, h, w))
    # in-memory levels are sliced directly
    assert tiles.TileCachedImage(MultiscaleImage([base], [1.0])).source(0) is None


def test_embedding_a_tiff_slide_equals_direct_reading(tmp_path, tiny_model):
    from napari_comtip.io.slide import open_image

    rng = np.random.default_rng(2)
    image, _ = open_image(_write_tiled_tiff(tmp_path / "slide.ome.tif", rng))
    rc = rng.uniform(0, 1000, size=(9, 2))
    spots = pd.DataFrame({Key.ROW: rc[:, 0], Key.COL: rc[:, 1], Key.DIAMETER: 50.0}, index=[f"b{i}" for i in range(9)])
    s = SpatialSample(name="tiff", image=image, mpp=0.5, mpp_source="test", spots=spots)
    order = tiles.spatial_order(rc, 350.0)
    assert sorted(order.tolist()) == list(range(9)) and order.tolist() != list(range(9))  # really reordered
    emb = embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False)
    np.testing.assert_allclose(emb.image, _direct(tiny_model, s, range(9)), atol=2e-5)
    assert emb.timings["tile_misses"] > 0


# --------------------------------------------------------------------------- reader processes (GPU path)
def _tiff_sample(tmp_path, n=30, seed=5):
    from napari_comtip.io.slide import open_image

    rng = np.random.default_rng(seed)
    image, _ = open_image(_write_tiled_tiff(tmp_path / "slide.ome.tif", rng))
    rc = rng.uniform(-10, 1010, size=(n, 2))
    spots = pd.DataFrame({Key.ROW: rc[:, 0], Key.COL: rc[:, 1], Key.DIAMETER: 50.0},
                         index=[f"p{i}" for i in range(n)])
    return SpatialSample(name="procs", image=image, mpp=0.5, mpp_source="test", spots=spots)


def test_reader_processes_give_the_pixels_of_the_thread_reader(tmp_path, tiny_model):
    """Worker processes reopen the slide and cut the same patches; batches arrive in order."""
    s = _tiff_sample(tmp_path)
    assert s.image.reopen_spec()[0] == "tiffslide"
    threads = embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, cpu_streams=1,
                           read_processes=0, features=True)
    procs = embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, cpu_streams=1,
                         read_processes=2, features=True)
    assert procs.timings["read_processes"] == 2 and threads.timings["read_processes"] == 0
    np.testing.assert_array_equal(procs.image, threads.image)
    np.testing.assert_array_equal(procs.features, threads.features)
    assert procs.timings["read"] > 0


def test_reader_processes_only_for_file_backed_slides_and_never_by_default_on_cpu(tiny_model):
    from napari_comtip.constants import Default

    s = _sample(6, seed=21)  # in memory: nothing for a worker to reopen
    assert s.image.reopen_spec() is None
    emb = embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, cpu_streams=1, read_processes=2)
    assert emb.timings["read_processes"] == 0  # read by threads instead
    assert readers.default_read_processes(torch.device("cpu"), 10**7) == 0
    assert readers.default_read_processes(torch.device("cuda"), Default.READ_PROCESS_MIN_SPOTS - 1) == 0
    with pytest.raises(InputError, match="read_processes"):
        embed_sample(s, tiny_model, device="cpu", read_processes=-1)


def test_reader_process_errors_reach_the_caller_as_themselves(tmp_path, tiny_model):
    """A slide replaced on disk after it was opened: the worker's InputError, not a worker traceback."""
    s = _tiff_sample(tmp_path, n=8)
    path = tmp_path / "slide.ome.tif"
    time.sleep(0.01)
    _write_tiled_tiff(path, np.random.default_rng(99))  # same name, other content and mtime
    with pytest.raises(InputError, match="changed or disappeared") as info:
        embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, cpu_streams=1, read_processes=2)
    assert "Traceback" not in str(info.value)


def test_reader_processes_that_cannot_start_fall_back_to_threads(tmp_path, tiny_model, caplog):
    import functools

    from napari_comtip.engine._process_reader import ProcessPatchReader

    s = _tiff_sample(tmp_path, n=10)
    side = patch_geometry(s.mpp, tiny_model.config.patch_um, tiny_model.img_size)
    centres = s.centers_rc()
    broken = functools.partial(int, "not a number")  # picklable; raises in every worker at start
    reader = ProcessPatchReader(s.image.reopen_spec(), centres, side, tiny_model.img_size, 4, workers=2, pin=False,
                                worker_init_fn=broken)
    got = []
    with caplog.at_level("WARNING"):
        for a, b, p in reader:
            got.append((a, b, p.clone()))
            reader.release(p)  # the fallback's ring buffer goes back, as the engine does
    assert reader.fell_back and "ValueError" in reader.fell_back
    assert "reading with threads" in caplog.text
    assert [(a, b) for a, b, _ in got] == [(0, 4), (4, 8), (8, 10)]
    for a, b, p in got:
        ref = np.stack([read_patch(s.image, centres[i], side, tiny_model.img_size) for i in range(a, b)])
        np.testing.assert_array_equal(np.asarray(p[: b - a]), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_with_reader_processes_and_pinned_batches(tmp_path, tiny_model):
    """The GPU path as a Visium HD-sized run takes it: worker processes, pinned batches, bf16."""
    s = _tiff_sample(tmp_path, n=300, seed=6)
    cpu = embed_sample(s, tiny_model, device="cpu", batch_size=64, cache=False, cpu_streams=1, read_processes=0)
    gpu = embed_sample(s, tiny_model, device="cuda", batch_size=64, cache=False, read_processes=2)
    tiny_model.to("cpu")
    assert gpu.timings["read_processes"] == 2 and gpu.device.startswith("cuda")
    cos = (cpu.image * gpu.image).sum(axis=1)
    assert cos.min() > 0.98, cos.min()


def test_cancel_stops_the_reader_processes(tmp_path, tiny_model):
    import multiprocessing

    s = _tiff_sample(tmp_path, n=40, seed=7)
    seen = []
    with pytest.raises(Cancelled, match="cancelled after 8 of 40"):
        embed_sample(s, tiny_model, device="cpu", batch_size=4, cache=False, cpu_streams=1, read_processes=2,
                     progress=lambda d, t, m: seen.append(d), cancel=lambda: len(seen) >= 2)
    assert seen == [4, 8]
    assert not multiprocessing.active_children()  # the workers were shut down, not left to the collector
