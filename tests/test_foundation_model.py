"""Bring-your-own foundation model: local weights in real key layouts, freezing, clean refusals.

Weights are random but written in the key layout and shapes timm uses for the published models
(UNI is a timm ``vit_large_patch16_224`` with LayerScale, ``init_values=1e-5``), as safetensors
and as a torch ``.bin`` state dict, with the wrapper prefixes training frameworks add.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_comtip.engine import training as T
from napari_comtip.engine import run_config as RC
from napari_comtip.errors import ConfigError
from napari_comtip.model import build_model
from napari_comtip.model.checkpoint import load_checkpoint, save_checkpoint
from napari_comtip.model.config import ComtipConfig
from napari_comtip.model.presets import get_preset
from napari_comtip.model.foundation import apply_freeze, hub_settings, load_vision_weights
from napari_comtip.model.vision import create_vit

PANEL = ["GA", "GB", "GC"]
#: a small UNI-shaped ViT (LayerScale, patch 16, class token) for the default suite
SMALL = {"name": "vit_small_patch16_224", "img_size": 32,
         "overrides": {"depth": 2, "init_values": 1e-5, "embed_dim": 384, "num_heads": 6, "patch_size": 16}, "pool": "cls"}
#: UNI (MahmoodLab/UNI model card): ViT-L/16, LayerScale 1e-5, 224 px, ImageNet mean/std
UNI = {"name": "vit_large_patch16_224", "img_size": 224, "overrides": {"init_values": 1e-5}, "pool": "cls",
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _cfg(vision: dict, **extra) -> ComtipConfig:
    d = get_preset("micro").to_dict()
    d["vision"] = {**ComtipConfig().vision.__dict__, "mean": None, "std": None, **vision}
    d["w_mfm"] = 0.0
    d.update(extra)
    return ComtipConfig.from_dict(d)


def _random_weights(vision: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    vit = create_vit(_cfg(vision))
    return {k: torch.randn_like(v) * 0.02 for k, v in vit.state_dict().items()}


def _write(sd, path, prefix=""):
    sd = {prefix + k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _predict_roundtrip(vision, weights, tmp_path):
    sd = {k.split(".", 1)[1] if "." in k else k: v for k, v in weights.items()}
    cfg = _cfg({**vision, "weights": str(tmp_path / "w"), "freeze": True})
    return cfg, sd


@pytest.mark.parametrize("suffix,prefix", [(".safetensors", ""), (".bin", "model."), (".pth", "module.backbone.")])
def test_small_vit_weights_load_and_predict(tmp_path, suffix, prefix):
    sd = _random_weights(SMALL)
    f = _write(sd, tmp_path / f"pytorch_model{suffix}", prefix)
    cfg = _cfg({**SMALL, "weights": str(f), "freeze": True, "licence": "CC-BY-NC-ND-4.0 (test)"})
    model = build_model(cfg, PANEL, name_embeddings=torch.randn(3, 384))
    rep = model.weights_report
    assert rep["loaded"] == len(sd) and rep["missing"] == [] and rep["prefix"] == prefix
    for k, v in model.vision.vit.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert model.count_parameters() == model.count_parameters(False) - sum(v.numel() for v in sd.values())
    # a checkpoint of it predicts like any other (the weights travel inside; the file is not read again)
    ck = save_checkpoint(tmp_path / "ck.pt", model)
    f.unlink()
    loaded = load_checkpoint(ck)
    x = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        a = model.eval().encode_image(model.preprocess(x))
        b = loaded.model.encode_image(loaded.model.preprocess(x))
    assert torch.allclose(a, b, atol=1e-6)
    assert loaded.config.vision.licence == "CC-BY-NC-ND-4.0 (test)"


def test_normalisation_from_the_models_config_json(tmp_path):
    f = _write(_random_weights(SMALL), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch16_224",
        "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    assert hub_settings(f)["std"] == [0.229, 0.224, 0.225]
    model = build_model(_cfg({**SMALL, "weights": str(f)}), PANEL, name_embeddings=torch.randn(3, 384))
    assert model.config.vision.mean == [0.485, 0.456, 0.406]
    # an explicit config value wins
    model = build_model(_cfg({**SMALL, "weights": str(f), "mean": [0.5] * 3, "std": [0.5] * 3}), PANEL,
                        name_embeddings=torch.randn(3, 384))
    assert model.config.vision.mean == [0.5] * 3


def test_refusals_are_one_line_config_errors(tmp_path):
    vit = create_vit(_cfg(SMALL))
    sd = _random_weights(SMALL)
    cases = {}
    # another architecture: a ViT-Ti's weights for a ViT-S
    other = _random_weights({**SMALL, "name": "vit_tiny_patch16_224",
                             "overrides": {**SMALL["overrides"], "embed_dim": 192, "num_heads": 3}})
    cases["arch"] = (_write(other, tmp_path / "tiny.safetensors"), r"do not fit vision.name='vit_small_patch16_224': \S+ is \(192,?.*\) in the file but \(384,?.*\) in the model")
    # LayerScale weights for a model built without it
    no_ls = create_vit(_cfg({**SMALL, "overrides": {k: v for k, v in SMALL["overrides"].items() if k != "init_values"}}))
    cases["ls"] = (_write(sd, tmp_path / "ls.bin"), "init_values")
    # fewer blocks in the file than in the model
    cases["depth"] = (_write({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, tmp_path / "d.bin"), "not in the file")
    good = _write(sd, tmp_path / "good.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["trunc"] = (trunc, "truncated")
    (tmp_path / "folder").mkdir()
    _write(sd, tmp_path / "folder" / "model.safetensors")
    cases["folder"] = (tmp_path / "folder", "is a folder.*model.safetensors")
    pickled = tmp_path / "whole_model.pth"
    torch.save(vit, pickled)  # a whole pickled module, not a state dict
    cases["pickle"] = (pickled, "pickled Python objects")
    for name, (path, pattern) in cases.items():
        target = no_ls if name == "ls" else create_vit(_cfg(SMALL))
        with pytest.raises(ConfigError, match=pattern) as exc:
            load_vision_weights(target, path, "vit_small_patch16_224")
        msg = str(exc.value)
        assert "\n" not in msg and str(path) in msg, (name, msg)
    with pytest.raises(ConfigError, match="has 2"):
        apply_freeze(create_vit(_cfg(SMALL)), 3, "vit_small_patch16_224")
    with pytest.raises(ConfigError, match="freeze"):
        _cfg({**SMALL, "freeze": "some"})


def test_freeze_last_blocks():
    vit = create_vit(_cfg(SMALL))
    assert apply_freeze(vit, 1) == 1
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.")) for n in trainable)
    assert _cfg({**SMALL, "freeze": "2"}).vision.freeze == 2
    assert _cfg({**SMALL, "freeze": "true"}).vision.freeze is True


def test_frozen_backbone_is_bit_identical_after_training(tmp_path):
    from napari_comtip.engine.data import build_training_set
    from napari_comtip.io import load_sample

    sd = _random_weights(SMALL)
    f = _write(sd, tmp_path / "model.safetensors", "model.")
    run = {"preset": "micro",
           "model": {"w_mfm": 1.0, "vision": {**SMALL, "weights": str(f), "freeze": True}},
           "data": {"n_hvg": 40, "n_mean": 10, "unlabelled_per_sample": 0},
           "training": {"epochs": 1, "batch_size": 16, "checkpoint_every": 100, "warmup_steps": 1, "threads": 1,
                        "probe_alpha": 0, "fp16_final": False, "bank": False, "probe": False}}
    cfg = RC.run_config_from_dict(run)
    ts = build_training_set([load_sample("@demo")], cfg.data, patch_um=cfg.model.patch_um, img_size=32)
    final = T.pretrain(cfg, [], tmp_path / "run", max_steps=3, training_set=ts, device="cpu")
    state = torch.load(final, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in sd.items():
        assert torch.equal(state[f"vision.vit.{k}"], v), k
    assert not any(k.startswith("vision.generator") for k in state)  # MFM is off with a fixed encoder
    assert not torch.equal(state["image_proj.weight"], torch.zeros_like(state["image_proj.weight"]))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_uni_shaped_vit_large_loads_and_predicts(tmp_path, suffix):
    """~1.2 GB of random weights in UNI's layout (ViT-L/16, 24 blocks, LayerScale)."""
    sd = _random_weights(UNI)
    assert len([k for k in sd if k.endswith("ls1.gamma")]) == 24 and sd["pos_embed"].shape == (1, 197, 1024)
    f = _write(sd, tmp_path / f"pytorch_model{suffix}")
    del sd
    model = build_model(_cfg({**UNI, "weights": str(f), "freeze": True}), PANEL, name_embeddings=torch.randn(3, 384))
    assert model.weights_report["loaded"] == len(model.vision.vit.state_dict()) and model.feature_dim == 1024
    x = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        emb = model.eval().encode_image(model.preprocess(x))
    assert emb.shape == (2, model.embed_dim) and torch.isfinite(emb).all()
