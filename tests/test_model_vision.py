"""The masked ViT: the masked branch computes on visible tokens only; MFM targets carry no gradient."""

from __future__ import annotations

import pytest
import torch

from napari_comtip.errors import ConfigError
from napari_comtip.model import get_preset
from napari_comtip.model.vision import MaskedViT, create_vit, load_vision_weights, mfm_distance
from _model_common import one_thread  # noqa: F401  (autouse: one torch thread)



@pytest.fixture
def vit():
    torch.manual_seed(0)
    return MaskedViT(get_preset("micro")).eval()


def test_token_counts(vit):
    assert vit.num_patches == 16 and vit.num_prefix == 1 and vit.width == 64
    x = torch.randn(3, 3, 32, 32)
    assert vit.forward_tokens(x).shape == (3, 17, 64)
    assert vit(x).shape == (3, 64)


def test_masked_branch_blocks_see_only_visible_tokens(vit):
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for blk in vit.vit.blocks]
    x = torch.randn(2, 3, 32, 32)
    ids_keep, ids_mask = vit.random_mask(2, 0.5, x.device)
    assert ids_keep.shape == (2, 8) and ids_mask.shape == (2, 8)
    out = vit.forward_masked(x, ids_keep)
    assert seen == [1 + 8, 1 + 8]  # prefix + visible tokens, in every block
    assert out.shape == (2, 9, 64)
    seen.clear()
    vit.forward_tokens(x)
    assert seen == [17, 17]
    for h in hooks:
        h.remove()
    # keep/mask split is a partition of the 16 positions, different per image
    both = torch.cat([ids_keep, ids_mask], 1).sort(1).values
    assert torch.equal(both, torch.arange(16).expand(2, -1))


def test_masked_branch_output_ignores_hidden_pixels(vit):
    """Changing the pixels of hidden patches must not change the masked branch's output."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32)
    ids_keep, ids_mask = vit.random_mask(1, 0.5, x.device)
    y = x.clone()
    for p in ids_mask[0].tolist():  # 4x4 grid of 8 px patches
        r, c = divmod(p, 4)
        y[..., r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = torch.randn(3, 8, 8) * 5
    a = vit.forward_masked(x, ids_keep)
    b = vit.forward_masked(y, ids_keep)
    assert torch.allclose(a, b, atol=1e-5)
    # ... while the full branch does change (the test can fail)
    assert not torch.allclose(vit.forward_tokens(x), vit.forward_tokens(y), atol=1e-3)


def test_mfm_target_is_detached_and_gradients_reach_the_masked_branch():
    torch.manual_seed(0)
    vit = MaskedViT(get_preset("micro")).train()
    x = torch.randn(4, 3, 32, 32)
    full = vit.forward_tokens(x)
    full.retain_grad()
    ids_keep, ids_mask = vit.random_mask(4, 0.5, x.device)
    target = vit.mfm_target(full, ids_mask)
    assert not target.requires_grad and target.grad_fn is None
    loss = vit.mfm_loss(x, full, 0.5)
    loss.backward()
    assert full.grad is None  # nothing flowed into the full branch's tokens
    for name in ("mask_token",):
        assert getattr(vit, name).grad is not None and getattr(vit, name).grad.abs().sum() > 0
    assert all(p.grad is not None for p in vit.generator.parameters())
    # shared ViT weights learn through the masked branch
    assert vit.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_mask_queries_differ_by_position(vit):
    visible = torch.randn(1, 9, 64)
    pred = vit.predict_masked(visible, torch.tensor([[0, 5, 15]]))
    assert pred.shape == (1, 3, 64)
    assert not torch.allclose(pred[0, 0], pred[0, 1])


def test_mfm_distances():
    a = torch.randn(2, 3, 8)
    assert mfm_distance(a, a, "mse") == 0
    assert mfm_distance(a, a, "cosine").abs() < 1e-6
    assert mfm_distance(a, -a, "cosine") == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        mfm_distance(a, a, "l1")


def test_cls_pool_without_class_token_is_refused():
    cfg = get_preset("micro")
    cfg.vision.overrides["class_token"] = False
    cfg.vision.overrides["global_pool"] = "avg"
    cfg.vision.pool = "cls"
    with pytest.raises(ConfigError, match="class token"):
        MaskedViT(cfg)
    cfg.vision.pool = "mean"
    v = MaskedViT(cfg)
    assert v.num_prefix == 0 and v.forward_masked(torch.randn(1, 3, 32, 32), torch.tensor([[0, 1, 2]])).shape == (1, 3, 64)


def test_unknown_vit_name_is_a_config_error():
    cfg = get_preset("micro")
    cfg.vision.name = "vit_does_not_exist"
    with pytest.raises(ConfigError, match="vit_does_not_exist"):
        create_vit(cfg)
    cfg.vision.name = "resnet18"
    cfg.vision.overrides = {}
    with pytest.raises(ConfigError):
        create_vit(cfg)


def test_local_weights_load_with_prefixes_and_pos_embed_resampling(tmp_path):
    cfg = get_preset("micro")
    torch.manual_seed(3)
    src = create_vit(cfg)
    # a wrapped state dict as training frameworks write it, at another input size (64 px -> 8x8 grid)
    big = cfg.replace(**{"vision.img_size": 64})
    src_big = create_vit(big)
    src_big.load_state_dict({k: v for k, v in src.state_dict().items() if k != "pos_embed"}, strict=False)
    sd = {f"module.backbone.{k}": v for k, v in src_big.state_dict().items()}
    sd["module.head_extra.weight"] = torch.zeros(2)
    f = tmp_path / "w.pth"
    torch.save({"state_dict": sd}, f)
    dst = create_vit(cfg)
    report = load_vision_weights(dst, f)
    assert report["loaded"] == len(dst.state_dict())
    assert report["missing"] == [] and report["prefix"] == "module.backbone."
    assert report["ignored"] == 1 and report["ignored_examples"] == ["module.head_extra.weight"]
    assert torch.equal(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert dst.pos_embed.shape == (1, 17, 64)  # resampled from 65 tokens


def test_local_weights_errors(tmp_path):
    cfg = get_preset("micro")
    vit = create_vit(cfg)
    with pytest.raises(ConfigError, match="not found"):
        load_vision_weights(vit, tmp_path / "missing.pt")
    f = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, f)
    with pytest.raises(ConfigError, match="no tensor"):
        load_vision_weights(vit, f)
    g = tmp_path / "text.pt"
    g.write_text("hello")
    with pytest.raises(ConfigError, match="cannot read"):
        load_vision_weights(vit, g)
