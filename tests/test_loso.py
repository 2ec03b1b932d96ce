"""LOSO benchmark pieces: the colour-texture ridge floor and the results table."""

from __future__ import annotations

import numpy as np
import pytest

from napari_comtip.engine.baselines import RidgeFloor, colour_texture_features
from napari_comtip.engine.loso import ARMS, BEGIN, END, arm_overrides, results_markdown, write_results_md
from napari_comtip.errors import ConfigError


def test_ridge_floor_recovers_a_linear_map_and_picks_alpha_by_loo():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6)) * np.array([1, 10, 0.1, 1, 1, 1])
    W = rng.standard_normal((6, 3))
    Y = X @ W + 0.01 * rng.standard_normal((200, 3)) + 5.0
    m = RidgeFloor().fit(X, Y)
    assert m.alpha_ == pytest.approx(0.1)  # nearly noiseless: the smallest penalty wins
    Xt = rng.standard_normal((50, 6))
    np.testing.assert_allclose(m.predict(Xt), Xt @ W + 5.0, atol=0.05)
    noisy = RidgeFloor().fit(X, rng.standard_normal((200, 3)))  # pure noise: heavy penalty
    assert noisy.alpha_ >= 1000


def test_colour_texture_features_on_real_patches():
    from napari_comtip.engine.data import read_patches
    from napari_comtip.io import load_sample

    s = load_sample("@demo")
    p = read_patches(s, s.centers_rc()[:6], 175.0, 64)
    white = np.full((1, 64, 64, 3), 250, np.uint8)
    dark = np.full((1, 64, 64, 3), 40, np.uint8)
    f = colour_texture_features(np.concatenate([p, white, dark]))
    assert f.shape == (8, 70) and np.isfinite(f).all()
    # columns: 0-2 RGB means, ... 60-62 darkness (v < .3, .45, .6), 63 near-white, 64.. gradients
    assert f[6, 63] == 1.0 and f[7, 60] == 1.0 and f[6, 60] == 0.0
    assert f[6, 64] == 0.0 and f[:6, 64].min() > 0  # flat patches have no gradient, tissue has
    assert np.all(np.abs(f[:6, 0:3].mean(0) - p.reshape(-1, 3).mean(0) / 255) < 1e-5)


def _result(arm, held, mode, pcc, t=60.0):
    m = {"pcc_all": pcc, "pcc_heg50": pcc + 0.1, "pcc_hvg50": pcc + 0.2, "mse": 0.2, "mae": 0.3}
    return {"arm": arm, "held_out": held, "train_seconds": t, "modes": {mode: m}}


def test_results_table_means_per_section_and_marks_missing(tmp_path):
    res = [_result("ridge", "B4", "ridge", 0.0, None), _result("ridge", "C2", "ridge", 0.1, None),
           _result("comtip", "B4", "probe", 0.2), _result("comtip", "C2", "probe", 0.4)]
    md = results_markdown(res)
    assert "| ridge | ridge | 2 | 0.050 | 0.150 | 0.250 | 0.200 | 0.300 |" in md
    assert "| comtip | probe | 2 | 0.300 | 0.400 | 0.500 |" in md
    assert "0.200 / 0.300 / 0.400; 1.0 min" in md
    assert md.index("| ridge |") < md.index("| comtip |")
    # the generated block replaces only itself inside an existing document
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nintro\n\n{BEGIN}\nstale table\n{END}\n\nnotes after\n")
    write_results_md(res[:1], doc)
    text = doc.read_text()
    assert "intro" in text and "notes after" in text and "stale table" not in text and text.count(BEGIN) == 1
    md2 = results_markdown(res[:3])
    assert "not run" in md2  # comtip/probe has no C2 result


def test_arms_cover_the_ablation_grid():
    assert {"ridge", "comtip", "names", "values"} <= set(ARMS)
    for a in ("comtip-nomfm", "comtip-nopaat", "values-nomfm", "values-nopaat", "names-nomfm"):
        assert a in ARMS
    assert arm_overrides("values-nomfm-nopaat") == {"model.text.mode": "values", "model.w_mfm": 0.0, "model.w_paat": 0.0}
    with pytest.raises(ConfigError, match="unknown arm"):
        arm_overrides("bogus")
