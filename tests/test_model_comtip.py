"""The CoMTIP module: preprocessing, losses, gradient flow through every branch, overfitting one batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_comtip.model import build_model, clip_loss, embed_gene_names, get_preset, sample_gene_subsets

from _model_common import GENES, one_thread  # noqa: F401  (one_thread is autouse)


@pytest.fixture(scope="module")
def names():
    return embed_gene_names(GENES)


def _model(names, **upd):
    cfg = get_preset("micro").replace(**upd) if upd else get_preset("micro")
    torch.manual_seed(0)
    return build_model(cfg, GENES, name_embeddings=names)


def _batch(model, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=g)
    expr = torch.rand(b, len(GENES), generator=g) * 3
    # spots of 2..8 genes, padded to one tensor (every spot has a PAAT negative)
    cfg = model.config.replace(**{"text.subset_sizes": "spot", "text.min_genes": 2, "text.p_single": 0.0})
    return model.preprocess(patches), *sample_gene_subsets(expr, cfg, g)


# ----------------------------------------------------------------------------- preprocessing
def test_preprocess_numpy_and_tensor_resize_and_normalise(names):
    m = _model(names)
    mean, std = np.array(m.config.vision.mean), np.array(m.config.vision.std)
    white = np.full((2, 48, 48, 3), 255, np.uint8)
    x = m.preprocess(white)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0, :, 5, 5], torch.tensor((1 - mean) / std, dtype=torch.float32), atol=1e-4)
    rgb = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    rgb[..., 0] = 255  # red stays in channel 0, no resize
    y = m.preprocess(rgb)
    assert y[0, 0, 0, 0] > y[0, 1, 0, 0]
    assert torch.allclose(m.preprocess(torch.from_numpy(white)), x)
    with pytest.raises(ValueError, match="B, H, W, 3"):
        m.preprocess(np.zeros((1, 3, 32, 32), np.uint8))


def test_normalisation_comes_from_timm_data_config_and_is_recorded(names):
    m = _model(names)
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=m.vision.vit)
    assert m.config.vision.mean == pytest.approx(list(dc["mean"]))
    explicit = _model(names, **{"vision.mean": [0.1, 0.2, 0.3], "vision.std": [0.5, 0.5, 0.5]})
    assert explicit.pixel_mean.flatten().tolist() == pytest.approx([25.5, 51.0, 76.5])


# ----------------------------------------------------------------------------- losses
def test_infonce_is_lower_for_aligned_than_for_shuffled_pairs():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(16, 32), dim=-1)
    scale = torch.tensor(1 / 0.07)
    aligned = clip_loss(img, txt, scale)
    shuffled = clip_loss(img, txt[torch.randperm(16)], scale)
    assert aligned < 0.5 * shuffled
    assert shuffled > math.log(16) * 0.8


def test_forward_returns_every_term_and_gradients_reach_every_branch(names):
    m = _model(names, **{"paat.discriminator": True, "paat.adversarial": True}).train()
    x, gi, v, mk = _batch(m)
    out = m(x, gi, v, mk)
    for key in ("loss", "infonce", "mfm", "paat", "paat_hard", "paat_disc", "paat_adv"):
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    cfg = m.config
    expect = out["infonce"] + cfg.w_mfm * out["mfm"] + cfg.w_paat * out["paat"]
    assert torch.allclose(out["loss"], expect)
    assert out["mfm"] > 0 and out["paat_hard"] > 0 and out["paat_adv"] >= 0
    out["loss"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    for part in ("vision.generator", "vision.mask_token", "text.value_emb", "text.blocks", "pair_disc", "image_proj", "logit_scale"):
        assert any(n.startswith(part) for n, _ in m.named_parameters()), part


def test_switched_off_terms_are_zero_and_their_modules_absent(names):
    m = _model(names, w_mfm=0.0, w_paat=0.0).train()
    assert m.vision.generator is None and m.pair_disc is None
    x, gi, v, mk = _batch(m)
    out = m(x, gi, v, mk)
    assert out["mfm"] == 0 and out["paat"] == 0
    assert torch.allclose(out["loss"], out["infonce"])
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)  # DDP-friendly: no unused params


def test_names_mode_has_no_paat_and_values_mode_has(names):
    for mode, has_paat in (("names", False), ("values", True)):
        m = _model(names, **{"text.mode": mode}).train()
        x, gi, v, mk = _batch(m)
        out = m(x, gi, v, mk)
        assert (out["paat"] > 0) == has_paat, mode
        out["loss"].backward()


def test_paat_prefers_true_pairing_after_training_on_it(names):
    """The PAAT term alone teaches the model to rank the true gene-value pairing above permutations."""
    m = _model(names, w_mfm=0.0, w_paat=1.0).train()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    x, gi, v, mk = _batch(m, b=8, seed=3)
    first = None
    for _ in range(30):
        out = m(x, gi, v, mk)
        first = first if first is not None else float(out["paat_hard"])
        opt.zero_grad()
        out["paat_hard"].backward()
        opt.step()
    assert float(out["paat_hard"]) < 0.5 * first


def test_logit_scale_is_clamped(names):
    m = _model(names)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert float(m.scale()) == pytest.approx(100.0)
    assert m.temperature() == pytest.approx(0.01)
    frozen = _model(names, learn_temperature=False)
    assert not frozen.logit_scale.requires_grad


def test_tiny_model_overfits_one_batch(names):
    """Loss (InfoNCE + MFM + PAAT) on one fixed batch of 8 falls by at least 60% in 40 steps."""
    m = _model(names).train()
    x, gi, v, mk = _batch(m, b=8, seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        torch.manual_seed(step)  # a fresh random mask each step, as in training
        out = m(x, gi, v, mk)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.4 * losses[0], losses[::5]
    m.eval()
    with torch.no_grad():
        img, txt = m.encode_image(x), m.encode_genes(gi, v, mk)
    assert ((img @ txt.t()).argmax(1) == torch.arange(8)).float().mean() >= 0.75


def test_value_range_is_recorded_in_training_and_spans_the_zero_shot_grid(names):
    m = _model(names).train()
    x, gi, v, mk = _batch(m)
    m(x, gi, v, mk)
    seen = torch.unique(gi[mk])
    assert all(torch.isfinite(b).all() for b in m.buffers())  # no inf sentinels in the state
    assert (m.value_count > 0).sum() == len(seen) and int(m.value_count.sum()) == int(mk.sum())
    for g in seen.tolist():
        vals = v[mk & (gi == g)]
        assert m.value_hi[g] == vals.max() and m.value_lo[g] == vals.min()
    grid = m.value_grid(torch.arange(len(GENES)), 5)
    assert grid.shape == (len(GENES), 5)
    unseen = [g for g in range(len(GENES)) if g not in set(seen.tolist())]
    for g in unseen:
        assert grid[g, 0] == 0 and grid[g, -1] == m.config.zero_shot.default_max
    m.train()
    m(x, gi, v * 10, mk)  # a second batch widens the range
    for g in seen.tolist():
        vals = v[mk & (gi == g)]
        assert m.value_hi[g] == 10 * vals.max() and m.value_lo[g] == vals.min()
    m.eval()
    before = m.value_hi.clone()
    m(x, gi, v * 100, mk)
    assert torch.equal(before, m.value_hi)  # not updated in eval mode
    m.set_value_range(0.5, 2.0)
    assert m.value_grid(torch.tensor([0]), 4)[0].tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_gene_index_lookup(names):
    m = _model(names)
    assert m.gene_index(["ERBB2", 0]).tolist() == [5, 0]
    with pytest.raises(KeyError, match="NOPE"):
        m.gene_index(["NOPE"])


@pytest.mark.slow
def test_base_preset_runs_a_training_step(names):
    """The paper's ViT-B/32 at 224 px: one forward/backward at batch 2 (slow on a CPU)."""
    torch.manual_seed(0)
    m = build_model("base", GENES, name_embeddings=names).train()
    assert m.vision.num_patches == 49 and m.vision.width == 768 and m.embed_dim == 512
    x, gi, v, mk = _batch(m, b=2)
    x = m.preprocess(torch.randint(0, 256, (2, 300, 300, 3), dtype=torch.uint8))  # resized to 224
    assert x.shape == (2, 3, 224, 224)
    out = m(x, gi, v, mk)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.vision.vit.patch_embed.proj.weight.grad is not None
