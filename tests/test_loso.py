"""LOSO benchmark pieces: the colour-texture ridge floor and the results table."""

from __future__ import annotations

import numpy as np
import pytest

from napari_comtip.engine.baselines import RidgeFloor, colour_texture_features
from napari_comtip.engine.loso_arms import ARMS, arm_overrides
from napari_comtip.engine.loso_table import BEGIN, END, markers, results_markdown, write_results_md
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
    from napari_comtip.engine.patch_cache import read_patches
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


def _result(arm, held, mode, pcc, t=60.0, seed=0):
    m = {"pcc_all": pcc, "pcc_heg50": pcc + 0.1, "pcc_hvg50": pcc + 0.2, "mse": 0.2, "mae": 0.3}
    return {"arm": arm, "held_out": held, "train_seconds": t, "modes": {mode: m}, "seed": seed}


def test_results_table_means_per_section_and_marks_missing(tmp_path):
    res = [_result("ridge", "B4", "ridge", 0.0, None), _result("ridge", "C2", "ridge", 0.1, None),
           _result("comtip", "B4", "probe", 0.2), _result("comtip", "C2", "probe", 0.4)]
    md = results_markdown(res)
    assert "| ridge | ridge | 1 | 2 | 0.050 | 0.150 | 0.250 | 0.200 | 0.300 |" in md
    assert "| comtip | probe | 1 | 2 | 0.300 | 0.400 | 0.500 |" in md
    assert "0.200 / 0.300 / 0.400; 1.0 min" in md
    assert md.index("| ridge |") < md.index("| comtip |")
    assert "Per seed" not in md  # one seed: no per-seed table
    # the generated block replaces only itself inside an existing document
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nintro\n\n{BEGIN}\nstale table\n{END}\n\nnotes after\n")
    write_results_md(res[:1], doc)
    text = doc.read_text()
    assert "intro" in text and "notes after" in text and "stale table" not in text and text.count(BEGIN) == 1
    md2 = results_markdown(res[:3])
    assert "not run" in md2  # comtip/probe has no C2 result


def test_results_table_over_seeds_and_data_sets(tmp_path):
    res = [_result("comtip", "B4", "probe", 0.2, seed=0), _result("comtip", "B4", "probe", 0.4, seed=1),
           _result("untrained", "B4", "probe", 0.1, seed=0)]
    md = results_markdown(res)
    assert "| comtip | probe | 2 | 1 | 0.300 | 0.400 | 0.500 |" in md  # mean over the two seeds
    assert "| comtip | probe | 0 | 0.300 / 0.400 |" in md and "| comtip | probe | 1 | 0.500 / 0.600 |" in md
    assert md.index("| untrained |") < md.index("| comtip |")
    doc = tmp_path / "results.md"
    write_results_md(res, doc, key="her2st")
    write_results_md(res[:1], doc, key="mouse-brain")
    write_results_md(res[:2], doc, key="her2st")
    text = doc.read_text()
    for key in ("her2st", "mouse-brain"):
        b, e = markers(key)
        assert text.count(b) == 1 and text.count(e) == 1
    b, e = markers("her2st")
    assert "| untrained |" not in text[text.index(b):text.index(e)]


def test_arms_cover_the_ablation_grid():
    assert {"ridge", "comtip", "names", "values"} <= set(ARMS)
    for a in ("comtip-nomfm", "comtip-nopaat", "values-nomfm", "values-nopaat", "names-nomfm"):
        assert a in ARMS
    assert arm_overrides("values-nomfm-nopaat") == {"model.text.mode": "values", "model.w_mfm": 0.0, "model.w_paat": 0.0}
    with pytest.raises(ConfigError, match="unknown arm"):
        arm_overrides("bogus")


def test_benchmark_scores_every_user_predictor():
    """The benchmark's predictors include each one a user can choose (one list: constants.PREDICT_MODES)."""
    from napari_comtip.constants import PREDICT_MODES
    from napari_comtip.engine.loso_arms import LEARNED_MODES, MODE_ORDER

    assert set(PREDICT_MODES) <= set(LEARNED_MODES) <= set(MODE_ORDER)


@pytest.mark.slow
def test_loso_runs_every_control_on_real_sections_and_reevaluates(her2st_dir, tmp_path):
    """Two real her2st sections, the micro preset for 2 steps: the floor (own features and in
    context), the untrained control and a learned arm with every predictor; a re-evaluation scores
    the stored checkpoints again without training."""
    from napari_comtip.engine.loso import run_loso
    from napari_comtip.engine.loso_arms import LEARNED_MODES
    from napari_comtip.engine.run_config import run_config_from_dict

    cfg = run_config_from_dict({"preset": "micro", "data": {"n_hvg": 40, "n_mean": 10, "unlabelled": False},
                                "training": {"epochs": 1, "batch_size": 16, "threads": 1}})
    md = tmp_path / "results.md"
    res = run_loso(str(her2st_dir), tmp_path / "s0", samples=["C2", "C3"], config=cfg,
                   arms=["ridge", "untrained", "comtip-nomfm"], max_steps=2, device="cpu", results_md=md,
                   table_key="her2st")
    by = {(r["arm"], r["held_out"]): r for r in res["results"]}
    assert len(by) == 6
    assert set(by[("ridge", "C2")]["modes"]) == {"ridge", "ridge-ctx"}
    assert set(by[("untrained", "C3")]["modes"]) == set(LEARNED_MODES)  # zero-shot too: its readout is set
    assert set(by[("comtip-nomfm", "C3")]["modes"]) == set(LEARNED_MODES)
    assert by[("untrained", "C2")]["train_seconds"] < 60
    for r in res["results"]:
        for m in r["modes"].values():
            assert -1 <= m["pcc_heg50"] <= 1
            assert -1 <= m["unc_spearman"] <= 1 and -1 <= m["unc_spearman_pooled"] <= 1, (r["arm"], m["mode"])
    text = md.read_text()
    assert "<!-- loso-table:her2st:begin -->" in text and "| untrained | probe |" in text
    ck = tmp_path / "s0" / "comtip-nomfm" / "C2" / "run" / "model.pt"
    mtime = ck.stat().st_mtime_ns
    again = run_loso(str(her2st_dir), tmp_path / "s0", samples=["C2", "C3"], config=cfg, arms=["comtip-nomfm"],
                     max_steps=2, device="cpu", reevaluate=True)
    r2 = {(r["arm"], r["held_out"]): r for r in again["results"]}
    assert r2[("comtip-nomfm", "C2")]["previous_modes"]["probe"]["pcc_heg50"] == pytest.approx(
        by[("comtip-nomfm", "C2")]["modes"]["probe"]["pcc_heg50"], abs=1e-6)
    assert ck.stat().st_mtime_ns != mtime  # the probe was re-fitted in place, the encoder not retrained
    assert all(-1 <= m["unc_spearman"] <= 1 for m in r2[("comtip-nomfm", "C2")]["modes"].values())  # --reevaluate fills it


def test_the_untrained_control_gets_zero_shot_readout_from_its_training_spots(tmp_path):
    """save_untrained: no training step, but each gene's value range and calibration line come from
    the training spots (as training leaves them), so its zero-shot is a control; a control saved
    without them (before) is not scored by zero-shot."""
    import torch

    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.loso import _has_zero_shot_readout, save_untrained
    from napari_comtip.engine.predictors import zero_shot
    from napari_comtip.engine.run_config import DataConfig, run_config_from_dict
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    s = load_sample("@demo")
    ts = build_training_set([s], DataConfig(n_hvg=30, n_mean=10, unlabelled=False), patch_um=175.0, img_size=32)
    cfg = run_config_from_dict({"preset": "micro", "model": {"text": {"value_transform": "spot_rank"}},
                                "data": {"n_hvg": 30, "n_mean": 10, "unlabelled": False}})
    path = save_untrained(cfg, ts, tmp_path / "u" / "model.pt", device="cpu", samples=[s])
    assert _has_zero_shot_readout(path)
    m = load_checkpoint(path).model
    assert bool((m.value_count > 0).all())
    ranks = m.text_values(torch.from_numpy(ts.expr))
    torch.testing.assert_close(m.value_hi.float(), ranks.max(0).values, atol=2e-3, rtol=0)  # fp16 storage
    a, b = m.value_cal.float().numpy()
    np.testing.assert_allclose((a + b * ranks.numpy()).mean(0), ts.expr.mean(0), atol=2e-2)
    pred = zero_shot(m, torch.randn(5, m.embed_dim))
    assert pred.shape == (5, len(ts.panel)) and np.isfinite(pred).all()
    ck = torch.load(path, weights_only=True, map_location="cpu")
    del ck["provenance"]["zero_shot_readout"]
    torch.save(ck, tmp_path / "old.pt")
    assert not _has_zero_shot_readout(tmp_path / "old.pt")
