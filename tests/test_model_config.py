"""ComtipConfig: presets, (de)serialisation, refusal of unknown keys and bad values."""

from __future__ import annotations

import json

import pytest
import torch

from napari_comtip.errors import ConfigError
from napari_comtip.model import PRESETS, ComtipConfig, build_model, get_preset
from napari_comtip.model.config import MODEL_VERSION


@pytest.mark.parametrize("name", ["tiny", "base", "micro"])
def test_presets_round_trip_through_dict_and_json(name):
    cfg = get_preset(name)
    d = json.loads(json.dumps(cfg.to_dict()))  # primitives only
    assert ComtipConfig.from_dict(d) == cfg
    assert ComtipConfig.from_dict(d).to_dict() == d


def test_get_preset_returns_independent_copies():
    a = get_preset("tiny")
    a.vision.img_size = 64
    a.vision.overrides["depth"] = 1
    assert get_preset("tiny").vision.img_size == 64  # the bundled checkpoints' recipe (presets/tiny.yaml)
    assert get_preset("tiny").vision.overrides["depth"] == 4
    assert PRESETS["tiny"].vision.img_size == 64


def test_paper_preset_is_vit_b32_at_224():
    base = get_preset("base")
    assert base.vision.name == "vit_base_patch32_224" and base.vision.img_size == 224
    assert base.mask_ratio == 0.5


def test_unknown_preset_and_keys_are_refused_by_name():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="'vision.img_sise'"):
        ComtipConfig.from_dict({"vision": {"img_sise": 64}})
    with pytest.raises(ConfigError, match="'w_mfn'"):
        ComtipConfig.from_dict({"w_mfn": 1.0})


@pytest.mark.parametrize(
    "d, match",
    [
        ({"text": {"mode": "genes"}}, "text.mode"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"vision": {"img_size": "big"}}, "vision.img_size"),
        ({"text": {"width": 100, "heads": 3}}, "divisible"),
        ({"w_paat": -1}, "w_paat"),
        ({"version": MODEL_VERSION + 1}, "model version"),
        ({"vision": "vit"}, "mapping"),
        ({"mask": {"loss": "l1"}}, "mask.loss"),
    ],
)
def test_bad_values_raise_config_error(d, match):
    with pytest.raises(ConfigError, match=match):
        ComtipConfig.from_dict(d)


def test_strings_from_yaml_are_coerced():
    cfg = ComtipConfig.from_dict({"mask_ratio": "0.6", "text": {"depth": "3", "use_gene_embedding": "false"}})
    assert cfg.mask_ratio == 0.6 and cfg.text.depth == 3 and cfg.text.use_gene_embedding is False


def test_replace_with_dotted_keys():
    cfg = get_preset("tiny").replace(**{"vision.img_size": 64, "w_mfm": 0.0})
    assert cfg.vision.img_size == 64 and cfg.w_mfm == 0.0
    with pytest.raises(ConfigError, match="nope"):
        cfg.replace(**{"vision.nope": 1})


def test_tiny_preset_has_at_most_5m_trainable_parameters():
    """Measured with a 1000-gene panel (random name embeddings: no text model needed)."""
    model = build_model("tiny", [f"G{i}" for i in range(1000)], name_embeddings=torch.randn(1000, 384))
    n = model.count_parameters()
    assert 2_000_000 < n <= 5_000_000, n
    # the frozen name embeddings are a buffer, not a parameter
    assert "text.name_emb" in model.state_dict()
    assert all("name_emb" not in k for k, _ in model.named_parameters())
