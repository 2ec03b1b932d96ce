"""The probe's full-resolution morphology prior (vision.morphology_px, model/morphology.py)."""

import numpy as np
import pytest
import torch

from napari_comtip.errors import ConfigError
from napari_comtip.model.colour import row_quantile
from napari_comtip.model.morphology import N_MORPHOLOGY_FEATURES, morphology_stats, otsu_threshold, rgb_to_hed
from napari_comtip.model.presets import get_preset

GENES = [f"G{i}" for i in range(6)]
UPP = 0.5  # um per px of the synthetic tiles


def _tissue(n_nuclei: int, radius_px: int, side: int = 128, seed: int = 0) -> np.ndarray:
    """A pink (eosin) field with ``n_nuclei`` dark purple (haematoxylin) discs, apart from each other."""
    rng = np.random.default_rng(seed)
    img = np.empty((side, side, 3), np.float32)
    img[:] = (0.93, 0.70, 0.82)
    yy, xx = np.mgrid[:side, :side]
    placed: list[tuple[int, int]] = []
    while len(placed) < n_nuclei:
        c = rng.integers(radius_px + 2, side - radius_px - 2, 2)
        if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > (3 * radius_px) ** 2 for a, b in placed):
            placed.append((int(c[0]), int(c[1])))
            img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= radius_px ** 2] = (0.30, 0.22, 0.55)
    return img


def test_hed_is_skimage_rgb2hed():
    from skimage.color import rgb2hed

    x = np.random.default_rng(0).random((2, 9, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(rgb_to_hed(torch.from_numpy(x)).numpy(), rgb2hed(x), atol=1e-5)


def test_otsu_separates_two_populations_and_agrees_with_skimage():
    from skimage.filters import threshold_otsu

    g = torch.Generator().manual_seed(0)
    low, high = 0.2 * torch.rand(1, 300, generator=g), 0.7 + 0.2 * torch.rand(1, 100, generator=g)
    t = float(otsu_threshold(torch.cat([low, high], 1))[0])
    assert float(low.max()) < t <= float(high.min())
    v = torch.cat([torch.randn(1, 3000, generator=g) * 0.05 + 0.2, torch.randn(1, 1000, generator=g) * 0.08 + 0.6], 1)
    width = float(v.max() - v.min()) / 64
    assert abs(float(otsu_threshold(v)[0]) - threshold_otsu(v.numpy()[0], nbins=64)) < 2 * width


def test_nuclear_statistics_count_and_size_the_nuclei():
    """Density counts the discs, area measures them in um2, and both follow what was drawn."""
    few, many = _tissue(6, 5), _tissue(18, 5, seed=1)
    small, big = _tissue(8, 3, seed=2), _tissue(8, 7, seed=3)
    m = morphology_stats(torch.from_numpy(np.stack([few, many, small, big])), UPP).numpy()
    assert m.shape == (4, N_MORPHOLOGY_FEATURES) and np.isfinite(m).all()
    density, area = m[:, 84], m[:, 85]
    tile_001mm2 = (128 * UPP) ** 2 / 1e4
    np.testing.assert_allclose(density[:2] * tile_001mm2, [6, 18], atol=1.5)  # one maximum per disc
    assert area[3] > 2.5 * area[2]  # (7 / 3)^2 = 5.4 in truth; the smoothed mask is blunter
    disc_um2 = np.pi * (5 * UPP) ** 2
    assert 0.5 * disc_um2 < area[0] < 2.5 * disc_um2
    frac = m[:, 83]
    assert frac[1] > 2 * frac[0]


def test_statistics_are_physical_a_patch_read_at_twice_the_side_agrees():
    """The same tissue at 2x the pixels (half the um per px) gives nearly the same density and area."""
    img = _tissue(10, 4, side=96, seed=4)
    big = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], scale_factor=2,
                                          mode="nearest").permute(0, 2, 3, 1)
    a = morphology_stats(torch.from_numpy(img)[None], UPP).numpy()[0]
    b = morphology_stats(big.contiguous(), UPP / 2).numpy()[0]
    np.testing.assert_allclose(b[84:86], a[84:86], rtol=0.25)


def test_row_quantile_chunks_like_torch_quantile():
    v = torch.rand(7, 1000)
    q = torch.tensor([0.1, 0.9])
    torch.testing.assert_close(row_quantile(v, q), torch.quantile(v, q, dim=1))
    big = torch.rand(340, 50_176)  # 17 M values: over torch.quantile's limit in one call
    out = row_quantile(big, 0.5)
    assert out.shape == (340,)
    torch.testing.assert_close(out[:3], torch.quantile(big[:3], 0.5, dim=1))


def _model(morph: int):
    from _model_common import micro_reading_model

    return micro_reading_model(GENES, colour_features=True, morphology_px=morph)


def test_the_model_reads_full_resolution_but_its_vit_and_embedding_stay_at_img_size():
    plain, morph = _model(0), _model(96)
    morph.load_state_dict(plain.state_dict())
    s = plain.img_size
    assert plain.input_px == s and morph.input_px == 96
    rng = np.random.default_rng(0)
    p96 = torch.from_numpy(rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8))
    x = morph.preprocess(p96)
    assert x.shape[-1] == 96  # read at the morphology side ...
    assert plain.preprocess(p96).shape[-1] == s
    with torch.no_grad():
        e_m, f_m = morph.encode_image_and_features(x)
        e_p, f_p = plain.encode_image_and_features(plain.preprocess(p96))
        torch.testing.assert_close(e_m, e_p, atol=1e-4, rtol=1e-4)  # ... the ViT sees img_size
        assert f_m.shape[1] == f_p.shape[1] + N_MORPHOLOGY_FEATURES
        # the ViT's features alike; the colour histograms up to a pixel or two that the resize moved across a bin edge
        torch.testing.assert_close(f_m[:, :f_p.shape[1]], f_p, atol=5e-3, rtol=1e-3)
        # a training batch at img_size is not blown up to the reading side
        assert morph.preprocess(torch.from_numpy(rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8))).shape[-1] == s
    assert morph.probe_feature_spec != plain.probe_feature_spec  # separate embedding-cache entries


@pytest.mark.parametrize("bad", [-1, 8, 5000])
def test_a_morphology_side_below_img_size_or_too_large_is_refused(bad):
    cfg = get_preset("micro")
    with pytest.raises(ConfigError, match="vision.morphology_px"):
        cfg.replace(vision__morphology_px=bad)


def test_refit_reads_the_probe_spots_at_the_morphology_side(tmp_path):
    """A checkpoint switched to the prior after training (refit_probe --set, the derived benchmark
    arms) gets a probe over the wider features, fitted on spots read at that side, and predicts."""
    from _model_common import train_on_demo

    from napari_comtip.engine.bank_probe import refit_probe
    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    train_on_demo(tmp_path, {"mode": "names+values"})
    path = tmp_path / "run" / "model.pt"
    rows_before = load_checkpoint(path).probe.weight.shape[0]
    s = load_sample("@demo")
    refit_probe(path, [s], device="cpu", reading={"vision.morphology_px": 64})
    ck = load_checkpoint(path)
    assert ck.model.config.vision.morphology_px == 64 and ck.model.input_px == 64
    assert ck.probe.weight.shape[0] > rows_before  # the probe reads the morphology statistics too
    pred = predict_sample(s, checkpoint=str(path), mode="probe", device="cpu")
    assert pred.uns["comtip"]["read_px"] == 64
    assert np.isfinite(np.asarray(pred.X)).all()


def test_a_run_trained_with_the_reading_fits_its_probe_on_spots_read_at_that_side(tmp_path):
    """pretrain with vision.morphology_px set: training batches stay at img_size, the final probe
    and bank are fitted on the same spots read at the reading side (engine/bank_probe.py reading_set)."""
    from _model_common import train_on_demo

    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.io import load_sample

    model, ts, _ = train_on_demo(tmp_path, {"mode": "names+values"}, model={"vision": {"morphology_px": 48}})
    assert ts.patches.shape[1] == 32 and model.input_px == 48
    pred = predict_sample(load_sample("@demo"), checkpoint=str(tmp_path / "run" / "model.pt"), mode="probe", device="cpu")
    assert pred.uns["comtip"]["read_px"] == 48 and np.isfinite(np.asarray(pred.X)).all()


def test_a_training_set_at_another_side_without_its_samples_is_refused_before_training(tmp_path):
    from napari_comtip.engine import run_config as RC
    from napari_comtip.engine import training as T
    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.run_config import DataConfig
    from napari_comtip.io import load_sample

    ts = build_training_set([load_sample("@demo")], DataConfig(n_hvg=30, n_mean=10, unlabelled=False), patch_um=175.0,
                            img_size=32)
    cfg = RC.run_config_from_dict({"preset": "micro", "model": {"vision": {"morphology_px": 48}},
                                  "data": {"n_hvg": 30, "n_mean": 10, "unlabelled": False},
                                  "training": {"epochs": 1, "batch_size": 16, "threads": 1}})
    with pytest.raises(ConfigError, match="training_samples"):
        T.pretrain(cfg, [], tmp_path / "run", max_steps=3, training_set=ts, device="cpu")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_statistics_stay_float32_inside_autocast():
    x = torch.from_numpy(_tissue(6, 5)[None])
    want = morphology_stats(x, UPP)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = morphology_stats(x, UPP)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_colour_statistics_stay_float32_inside_autocast():
    from napari_comtip.model.colour import colour_texture

    x = torch.from_numpy(_tissue(6, 5)[None])
    want = colour_texture(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = colour_texture(x)
    torch.testing.assert_close(got, want)
