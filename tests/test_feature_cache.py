"""Frozen-encoder feature cache: cached features are the recomputed ones, a changed signature
recomputes, and training through the cache gives the same losses as running the ViT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_comtip.engine import training as T
from napari_comtip.engine.batches import Augment
from napari_comtip.engine.data import build_training_set
from napari_comtip.engine.run_config import run_config_from_dict
from napari_comtip.engine.run_folder import read_metrics
from napari_comtip.engine.feature_cache import FeatureCache, open_feature_cache, view_images
from napari_comtip.io import load_sample
from napari_comtip.model import build_model

#: a small fixed ViT (random weights, no file needed: ``freeze: true`` works on any init)
VISION = {"name": "vit_small_patch16_224", "img_size": 32, "freeze": True, "pool": "cls",
          "overrides": {"depth": 2, "embed_dim": 96, "num_heads": 2, "patch_size": 8}}
NO_AUG = {"flips": False, "rot90": False, "hed_sigma": 0.0, "hed_bias": 0.0, "brightness": 0.0, "contrast": 0.0,
          "saturation": 0.0}


def _run_cfg(**training):
    return run_config_from_dict({
        "preset": "micro", "model": {"w_mfm": 0.0, "vision": VISION},
        "data": {"n_hvg": 40, "n_mean": 10, "unlabelled": False},
        "training": {"epochs": 2, "batch_size": 16, "checkpoint_every": 1000, "warmup_steps": 1, "threads": 1,
                     "fp16_final": False, "bank": False, "probe": False, **training}})


@pytest.fixture(scope="module")
def setup():
    cfg = _run_cfg()
    ts = build_training_set([load_sample("@demo")], cfg.data, patch_um=cfg.model.patch_um, img_size=32)
    torch.manual_seed(0)
    model = build_model(cfg.model, ts.panel).eval()
    return cfg, ts, model


def test_cached_features_equal_recomputed_ones(setup, tmp_path):
    cfg, ts, model = setup
    fc = FeatureCache(model, ts, cfg, "cpu", root=tmp_path)
    idx = np.array([7, 3, 11, 0, 5])
    first = fc.features(idx, epoch=0)
    assert (fc.computed, fc.reused) == (5, 0)
    again = fc.features(idx[::-1].copy(), epoch=0)
    assert (fc.computed, fc.reused) == (5, 5) and torch.equal(again, first.flip(0))
    with torch.no_grad():  # recomputed from scratch: the view's pixels through preprocess + the ViT
        ref = model.image_features(model.preprocess(view_images(ts.patches, idx, 0, cfg.training.seed,
                                                                Augment(cfg.data))))
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
    # a view depends on (seed, spot, view) only, not on the batch it is drawn in
    alone = view_images(ts.patches, np.array([3]), 0, cfg.training.seed, Augment(cfg.data))
    assert torch.equal(alone[0], view_images(ts.patches, idx, 0, cfg.training.seed, Augment(cfg.data))[1])
    other_view = fc.features(idx, epoch=1)
    assert not torch.allclose(other_view, first)  # another augmented view
    assert torch.equal(fc.features(idx, epoch=cfg.training.feature_views), first)  # views cycle: epoch 4 = view 0
    # a new cache object over the same signature reads the rows from disk
    fc2 = FeatureCache(model, ts, cfg, "cpu", root=tmp_path)
    assert fc2.dir == fc.dir and torch.equal(fc2.features(idx, 0), first) and fc2.computed == 0


def test_a_changed_signature_recomputes(setup, tmp_path):
    cfg, ts, model = setup
    idx = np.arange(6)
    base = FeatureCache(model, ts, cfg, "cpu", root=tmp_path)
    ref = base.features(idx, 0)
    changed_weights = build_model(cfg.model, ts.panel).eval()
    changed_weights.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed_weights.vision.vit.blocks[1].mlp.fc2.bias.add_(1e-3)
    other_patches = dataclasses.replace(ts, patches=np.array(ts.patches, copy=True))
    other_patches.patches[2, 0, 0] ^= 1  # one pixel of one patch
    variants = {
        "weights": (changed_weights, ts, cfg),
        "patches": (model, other_patches, cfg),
        "seed": (model, ts, _run_cfg(seed=1)),
        "views": (model, ts, _run_cfg(feature_views=2)),
        "augmentation": (model, ts, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, hed_sigma=0.1))),
    }
    dirs = {base.dir}
    for what, (m, t, c) in variants.items():
        fc = FeatureCache(m, t, c, "cpu", root=tmp_path)
        assert fc.dir not in dirs, what
        dirs.add(fc.dir)
        fc.features(idx, 0)
        assert fc.computed == len(idx) and fc.reused == 0, what
    assert not torch.equal(FeatureCache(changed_weights, ts, cfg, "cpu", root=tmp_path).features(idx, 0), ref)
    # a damaged store is rebuilt, not trusted
    (base.dir / "done.npy").write_bytes(b"broken")
    fresh = FeatureCache(model, ts, cfg, "cpu", root=tmp_path)
    fresh.features(idx, 0)
    assert fresh.computed == len(idx)


def test_only_a_fully_frozen_vit_is_cached(setup):
    cfg, ts, model = setup
    assert open_feature_cache(model, ts, _run_cfg(feature_cache=False), "cpu") is None
    trained = dataclasses.replace(cfg, model=cfg.model.replace(**{"vision.freeze": 1}))
    assert open_feature_cache(model, ts, trained, "cpu") is None


def test_training_through_the_cache_matches_running_the_vit(setup, tmp_path):
    """Without augmentation both paths see the same images and sentences: same losses, the
    backbone bit-identical, and the second epoch runs no ViT pass."""
    _, ts, _ = setup
    d = {"preset": "micro", "model": {"w_mfm": 1.0, "vision": VISION},
         "data": {"n_hvg": 40, "n_mean": 10, "unlabelled": False, **NO_AUG},
         "training": {"epochs": 2, "batch_size": 16, "checkpoint_every": 1000, "warmup_steps": 1, "threads": 1,
                      "fp16_final": False, "bank": False, "probe": False, "feature_views": 1}}
    runs = {}
    for cached in (True, False):
        cfg = run_config_from_dict({**d, "training": {**d["training"], "feature_cache": cached}})
        final = T.pretrain(cfg, [], tmp_path / f"run-{cached}", training_set=ts, device="cpu")
        ck = torch.load(final, map_location="cpu", weights_only=True)
        runs[cached] = (read_metrics(tmp_path / f"run-{cached}" / "metrics.csv"), ck)
    (m_c, ck_c), (m_v, ck_v) = runs[True], runs[False]
    assert len(m_c) == len(m_v) >= 4
    np.testing.assert_allclose([r["loss"] for r in m_c], [r["loss"] for r in m_v], rtol=1e-4, atol=1e-5)
    sd_c, sd_v = ck_c["state_dict"], ck_v["state_dict"]
    for k, v in sd_c.items():
        if k.startswith("vision.vit."):
            assert torch.equal(v, sd_v[k]), k  # the fixed ViT: the same init, never changed
    stats = ck_c["provenance"]["feature_cache"]
    per_epoch = len(m_c) // 2 * 16
    # epoch 1 computes every spot it draws; epoch 2 only the few the first left out (its last partial batch)
    assert stats["computed"] + stats["reused"] == 2 * per_epoch and per_epoch <= stats["computed"] <= ts.n_spots, stats
    assert ck_v["provenance"]["feature_cache"] is None
