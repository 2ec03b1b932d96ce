"""The presets: one packaged list of training recipes that needs no training/ folder."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from napari_comtip.cli import main
from napari_comtip.engine.run_config import load_run_config
from napari_comtip.errors import ConfigError
from napari_comtip.model import PRESETS, describe_presets, get_preset, preset_names
from napari_comtip.model.checkpoint import _flat  # dotted keys, as the checkpoint's config diff uses them
from napari_comtip.model.presets import preset_sections

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "napari_comtip"




def test_one_list_every_preset_resolves_and_says_what_it_is_for():
    names = preset_names()
    assert names[0] == "tiny" and {"tiny", "base", "loso", "micro"} <= set(names)
    assert list(PRESETS) == list(names) == [p["name"] for p in describe_presets()]
    for name in names:
        cfg = load_run_config(None, preset=name)
        assert cfg.preset == name and cfg.model == get_preset(name)
        purpose = next(p["purpose"] for p in describe_presets() if p["name"] == name)
        assert purpose and "\n" not in purpose and len(purpose) < 200
    assert get_preset("base").vision.img_size == 224 and load_run_config(None, preset="base").training.batch_size == 256


def test_tiny_is_the_recipe_of_the_bundled_checkpoint():
    """`comtip pretrain --preset tiny` is the recipe comtip-tiny-her2st.pt was trained with."""
    ck = torch.load(PKG / "checkpoints" / "comtip-tiny-her2st.pt", map_location="cpu", weights_only=True)
    stored = _flat(ck["provenance"]["run_config"])
    now = _flat(load_run_config(None, preset="tiny").to_dict())
    differ = {k: (stored[k], now[k]) for k in stored if k in now and stored[k] != now[k]}
    assert differ == {"training.threads": (1, 0)}, differ  # the bundled run was given --set training.threads=1


def test_loso_preset_is_tiny_with_its_four_switches():
    tiny, loso = _flat(load_run_config(None, preset="tiny").to_dict()), _flat(load_run_config(None, preset="loso").to_dict())
    assert {k for k in tiny if tiny[k] != loso[k]} == {"preset", "model.w_mfm", "model.text.value_transform",
                                                        "model.vision.colour_features",
                                                        "training.threads"}


def test_the_shipped_arm_is_exactly_tiny():
    """comtip-rank-colour (docs/results.md) on the loso base is the tiny preset."""
    from napari_comtip.engine.loso_arms import arm_overrides
    from napari_comtip.engine.run_config import with_overrides

    tiny = _flat(load_run_config(None, preset="tiny").to_dict())
    arm = _flat(with_overrides(load_run_config(None, preset="loso"), arm_overrides("comtip-rank-colour")).to_dict())
    assert {k for k in tiny if tiny[k] != arm[k]} == {"preset", "training.threads"}


def test_training_configs_are_thin_and_do_not_repeat_their_preset():
    for f in sorted((REPO / "training" / "configs").glob("*.yaml")):
        d = yaml.safe_load(f.read_text())
        assert d.get("preset") in preset_names(), f.name
        base = _flat(preset_sections(d["preset"]))
        own = _flat({k: v for k, v in d.items() if k != "preset"})
        repeated = {k for k, v in own.items() if base.get(k) == v}
        assert not repeated, f"{f.name} repeats its preset: {sorted(repeated)}"
        assert len(own) <= 5, f"{f.name} is not thin: {sorted(own)}"
        load_run_config(f)  # and it still loads


def test_presets_ship_in_the_wheel():
    """pyproject's package-data globs cover every preset file (what `pip install .` copies)."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["napari_comtip"]
    files = sorted(p.relative_to(PKG).as_posix() for p in (PKG / "presets").glob("*.yaml"))
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)


def test_presets_command_lists_json_and_shows_one(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert all(f"{n} " in text for n in preset_names()) and "comtip pretrain --preset tiny" in text
    assert main(["presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in listed] == list(preset_names()) and all(p["purpose"] for p in listed)
    assert main(["presets", "base"]) == 0
    text = capsys.readouterr().out
    shown = yaml.safe_load(text)
    assert shown["preset"] == "base" and shown["model"]["vision"]["img_size"] == 224


def test_a_printed_preset_is_a_config_file_of_the_same_run(capsys, tmp_path):
    assert main(["presets", "tiny"]) == 0
    f = tmp_path / "my.yaml"
    f.write_text(capsys.readouterr().out)
    assert load_run_config(f).to_dict() == load_run_config(None, preset="tiny").to_dict()


def test_unknown_preset_is_one_line_naming_the_known_ones(capsys, tmp_path):
    assert main(["pretrain", "--preset", "huge", "--data", "@demo", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown preset 'huge'" in err and "tiny, base" in err
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: huge\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown preset 'huge'; known presets: tiny"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="not both"):
        load_run_config(bad, preset="tiny")


def test_config_file_may_start_from_a_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("preset: base\ntraining:\n  epochs: 3\nmodel:\n  vision:\n    img_size: 96\n")
    cfg = load_run_config(f, ["training.lr=1e-4"])
    assert (cfg.preset, cfg.training.epochs, cfg.training.lr, cfg.model.vision.img_size) == ("base", 3, 1e-4, 96)
    assert cfg.training.batch_size == 256 and cfg.model.vision.name == "vit_base_patch32_224"  # the rest: the preset's


def test_pretrain_with_a_preset_and_no_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "--preset", "micro", "--data", "@demo", "--out", str(out), "--max-steps", "2",
               "--set", "training.threads=1", "--set", "data.unlabelled=false"])
    assert rc == 0, capsys.readouterr().err
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["preset"] == "micro" and stored["model"]["vision"]["img_size"] == 32
    assert (out / "model.pt").is_file()
