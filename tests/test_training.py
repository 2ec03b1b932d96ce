"""Pretraining engine: config loading, panel rule, resume equivalence, NaN stop, run-folder safety.

Training runs use the ``micro`` preset on the bundled real her2st section (``@demo``) for a few
steps; the training set (patches + panel) is built once per module.
"""

from __future__ import annotations

import argparse
import textwrap

import anndata
import numpy as np
import pytest
import torch

from napari_comtip.constants import Key
from napari_comtip.engine import training as T
from _training_common import CrashAt
from napari_comtip.engine import run_config as RC
from napari_comtip.engine import run_folder as RF
from napari_comtip.engine import bank_probe as BP
from napari_comtip.engine.data import build_training_set, select_gene_panel
from napari_comtip.engine.run_config import DataConfig
from napari_comtip.errors import ConfigError, InputError, TrainingError

MICRO = {
    "preset": "micro",
    "data": {"n_hvg": 40, "n_mean": 10, "unlabelled_per_sample": 48, "unlabelled_batch": 8},
    "training": {"epochs": 1, "batch_size": 16, "checkpoint_every": 3, "warmup_steps": 2, "threads": 1,
                 "probe_alpha": 0},
}


# --------------------------------------------------------------------------- config
def _write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_config_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, """
        preset: micro
        training:
          epochs: 2
          lerning_rate: 0.1
    """)
    with pytest.raises(ConfigError) as e:
        RC.load_run_config(p)
    assert "training.lerning_rate" in str(e.value) and str(p) in str(e.value)
    p2 = _write(tmp_path, "model:\n  vision:\n    imgsize: 64\n", "m.yaml")
    with pytest.raises(ConfigError, match=r"model\.vision\.imgsize") as e2:
        RC.load_run_config(p2)
    assert str(p2) in str(e2.value)
    p3 = _write(tmp_path, "trainign: {}\n", "t.yaml")
    with pytest.raises(ConfigError, match="trainign"):
        RC.load_run_config(p3)


def test_config_overrides_and_bad_values(tmp_path):
    p = _write(tmp_path, "preset: micro\ntraining:\n  epochs: 2\n")
    cfg = RC.load_run_config(p, ["training.lr=1e-3", "model.vision.img_size=48", "data.unlabelled=false"])
    assert cfg.training.lr == pytest.approx(1e-3) and cfg.training.epochs == 2
    assert cfg.model.vision.img_size == 48 and cfg.data.unlabelled is False
    assert cfg.model.text.width == 64  # the rest of the micro preset is kept
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        RC.load_run_config(p, ["training.lr"])
    with pytest.raises(ConfigError, match="training.epochs"):
        RC.load_run_config(p, ["training.epochs=abc"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        RC.load_run_config(_write(tmp_path, "training: [1,\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        RC.load_run_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"tiny.yaml", "base.yaml", "multi_gpu.yaml", "loso.yaml"} <= set(names)
    for n in names:
        RC.load_run_config(root / n)


# --------------------------------------------------------------------------- panel rule
def _section(X, genes):
    ad = anndata.AnnData(X=np.asarray(X, np.float32))
    ad.var_names = genes
    tot = ad.X.sum(1, keepdims=True)
    ad.layers[Key.LOGNORM] = np.log1p(ad.X / np.maximum(tot, 1) * 1e4)
    return ad


def test_panel_rule_common_detected_hvg_plus_mean():
    rng = np.random.default_rng(0)
    n_bg = 200
    genes = [f"G{i}" for i in range(n_bg)] + ["ONLY_A", "NEVER"]
    secs = []
    for k in range(3):
        X = rng.poisson(5, size=(60, n_bg + 2)).astype(float)
        X[:, 0] = rng.poisson(200, size=60)  # highest mean
        X[:, 1] = rng.poisson(150, size=60)  # second highest mean
        X[:, 2] = np.where(rng.random(60) < 0.5, 0, 10)  # same mean as the background, far more variable
        X[:, n_bg + 1] = 0  # NEVER detected
        g = list(genes)
        if k == 1:  # ONLY_A is missing from this section
            X = np.delete(X, n_bg, axis=1)
            g = [x for x in genes if x != "ONLY_A"]
        secs.append(_section(X, g))
    panel = select_gene_panel(secs, n_hvg=3, n_mean=2)
    assert "ONLY_A" not in panel and "NEVER" not in panel  # not in all sections / never detected
    assert panel[0] == "G2"  # the over-dispersed gene leads the HVG part
    assert panel[3:] == ["G0", "G1"] or {"G0", "G1"} <= set(panel)  # top-mean genes are added
    assert 3 <= len(panel) <= 5 and len(set(panel)) == len(panel)
    assert select_gene_panel(secs, n_hvg=3, n_mean=2) == panel  # deterministic


# --------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def demo_set():
    from napari_comtip.io import load_sample

    sample = load_sample("@demo")
    cfg = RC.run_config_from_dict(MICRO)
    ts = build_training_set([sample], cfg.data, patch_um=cfg.model.patch_um, img_size=cfg.model.vision.img_size)
    return ts


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_after_kill_gives_the_same_weights(demo_set, tmp_path):
    cfg = RC.run_config_from_dict(MICRO)
    full = T.pretrain(cfg, [], tmp_path / "full", max_steps=6, training_set=demo_set, device="cpu")
    with pytest.raises(RuntimeError, match="killed"):
        T.pretrain(cfg, [], tmp_path / "cut", max_steps=6, training_set=demo_set, device="cpu", callbacks=[CrashAt(5)])
    assert [s for s, _ in RF.list_checkpoints(tmp_path / "cut")] == [3]
    resumed = T.pretrain(cfg, [], tmp_path / "cut", max_steps=6, training_set=demo_set, device="cpu", resume=True)
    a = _state(tmp_path / "full" / "checkpoints" / "step-0000006.pt")
    b = _state(tmp_path / "cut" / "checkpoints" / "step-0000006.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in _state(full)["state_dict"].items():
        assert torch.equal(v, _state(resumed)["state_dict"][k]), k
    # metrics.csv of the resumed run has each step once, in order, with the stable columns
    rows = RF.read_metrics(tmp_path / "cut" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0])[: len(RF.METRIC_COLUMNS)] == list(RF.METRIC_COLUMNS)
    full_rows = RF.read_metrics(tmp_path / "full" / "metrics.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
    assert all(np.isfinite(r["img_emb_std"]) and r["img_emb_std"] > 0 for r in rows)
    # the final model carries its bank and a fitted probe, and loads through the model layer
    from napari_comtip.model.checkpoint import load_checkpoint

    ck = load_checkpoint(resumed)
    assert ck.bank is not None and ck.bank.emb.shape[0] == demo_set.n_spots
    assert ck.probe is not None and ck.probe.weight.shape[1] == len(demo_set.panel)
    assert ck.gene_panel == demo_set.panel


def test_refit_probe_replaces_only_the_probe(demo_set, tmp_path):
    """refit_probe: a new leave-one-out probe on the given sections, weights and bank untouched,
    the change logged in the checkpoint; the stored probe is what predict uses."""
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    cfg = RC.run_config_from_dict({**MICRO, "training": {**MICRO["training"], "probe_alpha": 5000.0}})
    path = T.pretrain(cfg, [], tmp_path / "run", max_steps=2, training_set=demo_set, device="cpu")
    before = _state(path)
    assert before["probe"]["alpha"] == 5000.0 and before["probe"]["alpha_rule"] == "given"
    res = BP.refit_probe(path, [load_sample("@demo")], device="cpu", note={"why": "test"})
    after = _state(path)
    # the default context (neighbours) chooses the penalty over spatial blocks; "none" by leave-one-out
    assert after["probe"]["alpha_rule"] == "4 spatial blocks per section" and after["probe"]["alpha"] == res["alpha"]
    assert after["probe"]["context"] == "neighbours"
    assert set(map(float, after["probe"]["alpha_scores"])) == {0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0}
    assert res["n_spots"] == demo_set.n_spots
    for k, v in before["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k]), k
    # the bank holds these very spots, so it is re-embedded: the same model reads them the same way
    assert after["bank"]["ids"] == before["bank"]["ids"]
    torch.testing.assert_close(before["bank"]["emb"].float(), after["bank"]["emb"].float(), atol=2e-3, rtol=0)
    assert torch.equal(before["bank"]["expr"], after["bank"]["expr"])
    upd = after["provenance"]["updates"][-1]
    assert upd["what"] == "probe re-fitted, bank re-embedded, zero-shot spread fitted"
    assert upd["why"] == "test" and upd["samples"] == ["C2"]
    assert res["bank_reembedded"] and res["zero_shot_spread"]
    spread = after["extras"]["zero_shot_spread"]
    assert spread["b"].shape == (len(demo_set.panel),) and spread["samples"] == ["C2"]
    assert load_checkpoint(path).probe.alpha == res["alpha"]
    BP.refit_probe(path, [load_sample("@demo")], device="cpu", context="none")
    assert _state(path)["probe"]["alpha_rule"] == "leave-one-out" and _state(path)["probe"]["context"] == "none"


def test_nan_loss_stops_with_training_error_and_keeps_last_checkpoint(demo_set, tmp_path):
    cfg = RC.run_config_from_dict({**MICRO, "training": {**MICRO["training"], "lr": 1e9, "warmup_steps": 0,
                                                       "checkpoint_every": 1, "grad_clip": 0}})
    with pytest.raises(TrainingError, match="loss became") as e:
        T.pretrain(cfg, [], tmp_path / "nan", max_steps=11, training_set=demo_set, device="cpu")
    ckpts = RF.list_checkpoints(tmp_path / "nan")
    assert ckpts, "the last good checkpoint must be kept"
    assert str(ckpts[-1][1]) in str(e.value)
    state = _state(ckpts[-1][1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_refuses_existing_run_folder_and_bad_resume(demo_set, tmp_path):
    cfg = RC.run_config_from_dict(MICRO)
    out = tmp_path / "run"
    T.pretrain(cfg, [], out, max_steps=1, training_set=demo_set, device="cpu")
    (out / "notes.txt").write_text("user file")
    with pytest.raises(InputError, match="already holds a training run"):
        T.pretrain(cfg, [], out, max_steps=1, training_set=demo_set, device="cpu")
    with pytest.raises(InputError, match="nothing to resume"):
        T.pretrain(cfg, [], tmp_path / "empty", resume=True, training_set=demo_set, device="cpu")
    T.pretrain(cfg, [], out, max_steps=1, training_set=demo_set, device="cpu", overwrite=True)
    assert (out / "notes.txt").read_text() == "user file"  # --overwrite removes only run files
    assert len(RF.read_metrics(out / "metrics.csv")) == 1


def test_cli_refuses_existing_run_folder_before_loading_data(tmp_path, capsys):
    from napari_comtip.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("preset: micro\n")
    cfg = _write(tmp_path, "preset: micro\n")
    rc = main(["pretrain", "--config", str(cfg), "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds a training run" in err and err.count("\n") == 1


def test_sample_without_expression_or_shared_genes_is_refused(demo_set, tmp_path):
    from napari_comtip.engine.data import panel_matrix
    from napari_comtip.io import load_sample

    sample = load_sample("@demo")
    ad = sample.expression
    with pytest.raises(InputError, match="shares only 0 of the 3 panel genes"):
        panel_matrix(ad, ["NOT_A_GENE1", "NOT_A_GENE2", "NOT_A_GENE3"], "C2")
    sample.expression = None
    with pytest.raises(InputError, match="no expression"):
        build_training_set([sample], DataConfig(), patch_um=175.0, img_size=32)


@pytest.mark.slow
def test_end_to_end_pretrain_and_evaluate_on_real_her2st(her2st_dir, tmp_path, capsys):
    """CLI pretrain on two real her2st sections for a few steps, then CLI evaluate on a third."""
    import json

    from napari_comtip.cli import main

    cfg = _write(tmp_path, """
        preset: micro
        data: {n_hvg: 200, n_mean: 50, unlabelled_per_sample: 64, unlabelled_batch: 8}
        training: {epochs: 1, batch_size: 32, checkpoint_every: 4, warmup_steps: 2, threads: 1}
    """)
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", str(cfg), "--data", str(her2st_dir), "--sample", "C3", "--sample", "C4",
               "--out", str(out), "--max-steps", "6", "--device", "cpu"])
    assert rc == 0
    saved = RC.load_run_config(out / "config.yaml")
    assert saved.data.n_hvg == 200 and saved.training.batch_size == 32
    assert len(RF.read_metrics(out / "metrics.csv")) == 6
    capsys.readouterr()
    for mode in ("retrieval", "probe", "zero-shot"):
        rc = main(["evaluate", "--checkpoint", str(out / "model.pt"), "--data", str(her2st_dir), "--sample", "C2",
                   "--mode", mode, "--device", "cpu", "--json"])
        assert rc == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        for k in ("pcc_all", "pcc_heg50", "pcc_hvg50", "mse", "mae", "n_spots", "n_genes", "mode"):
            assert k in res
        assert res["mode"] == mode and res["n_spots"] == 187 and res["n_genes"] > 200
        assert -1 <= res["pcc_all"] <= 1 and res["mse"] > 0
