"""Test-time views (vision.test_views): the pooled features averaged over flips and quarter turns."""

import numpy as np
import pytest
import torch

from napari_comtip.errors import ConfigError
from napari_comtip.model.config import TEST_VIEWS
from napari_comtip.model.presets import get_preset
from napari_comtip.model.vision import dihedral_view, mean_over_views

GENES = [f"G{i}" for i in range(6)]


def _model(views: int, colour: bool = False):
    from _model_common import micro_reading_model

    return micro_reading_model(GENES, colour_features=colour, test_views=views)


def _patches(n=4, side=None, seed=0):
    side = side or get_preset("micro").vision.img_size
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))


def test_the_eight_views_are_the_symmetries_of_the_square():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = [dihedral_view(x, k) for k in range(8)]
    assert torch.equal(views[0], x)
    assert torch.equal(views[1], torch.flip(x, dims=[3]))
    assert torch.equal(views[3], torch.rot90(x, 2, dims=(2, 3)))
    # all distinct, and the set is closed under a further mirror (a group, not 8 arbitrary images)
    flat = {tuple(v.flatten().tolist()) for v in views}
    assert len(flat) == 8
    assert {tuple(torch.flip(v, dims=[2]).flatten().tolist()) for v in views} == flat
    with pytest.raises(ValueError):
        dihedral_view(x, 8)


def test_mean_over_views_is_the_mean_and_one_view_is_the_input():
    x = torch.randn(3, 2, 5, 5)

    def fn(t):
        return t[:, :, :2, :3].flatten(1)  # an orientation-sensitive "encoder"

    assert torch.equal(mean_over_views(fn, x, 1), fn(x))
    want = torch.stack([fn(dihedral_view(x, k)) for k in range(4)]).mean(0)
    torch.testing.assert_close(mean_over_views(fn, x, 4), want)


def test_eight_views_make_the_embedding_and_probe_features_orientation_free():
    """With 8 views, the embedding and the probe's features of a patch turned or mirrored are the
    patch's own (what the average is for); with 1 view they differ (the ViT sees orientation)."""
    m8, m1 = _model(8, colour=True), _model(1, colour=True)
    m8.load_state_dict(m1.state_dict())
    p = _patches()
    turned = torch.rot90(p, 1, dims=(1, 2)).contiguous()
    mirrored = torch.flip(p, dims=[2]).contiguous()
    with torch.no_grad():
        e, f = m8.encode_image_and_features(m8.preprocess(p))
        for q in (turned, mirrored):
            e2, f2 = m8.encode_image_and_features(m8.preprocess(q))
            torch.testing.assert_close(e2, e, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(f2, f, atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(m8.encode_image(m8.preprocess(q)), e, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(m8.probe_features(m8.preprocess(q)), f, atol=1e-4, rtol=1e-3)
        e1 = m1.encode_image(m1.preprocess(p))
        e1t = m1.encode_image(m1.preprocess(turned))
    assert (e1 - e1t).abs().max() > 1e-3
    assert (e1 - e).abs().max() > 1e-4  # the 8-view embedding is not the one-view one
    assert m8.probe_feature_spec != m1.probe_feature_spec  # separate embedding-cache entries


def test_training_reads_one_view():
    """Training is unchanged: in train mode the features are those of the patch as given."""
    m8, m1 = _model(8), _model(1)
    m8.load_state_dict(m1.state_dict())
    x = m1.preprocess(_patches())
    m8.train()
    m1.train()
    torch.manual_seed(1)
    a = m8.encode_image(x)
    torch.manual_seed(1)
    b = m1.encode_image(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [0, 3, 16, -1])
def test_a_view_count_outside_the_list_is_refused(bad):
    cfg = get_preset("micro")
    assert cfg.vision.test_views in TEST_VIEWS
    with pytest.raises(ConfigError, match="vision.test_views must be one of 1, 2, 4, 8"):
        cfg.replace(vision__test_views=bad)


def test_refit_reads_the_bank_with_the_views_of_the_checkpoint(tmp_path):
    """A checkpoint switched to 8 views after training (scripts/derive_fold_arm.py, the bundled
    checkpoints) gets its bank re-embedded and its probe re-fitted on the same reading."""
    from _model_common import train_on_demo

    from napari_comtip.engine.bank_probe import embed_patches, refit_probe
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    train_on_demo(tmp_path, {"mode": "names+values"})
    path = tmp_path / "run" / "model.pt"
    blob = torch.load(path, weights_only=True)
    before = blob["bank"]["emb"].float()
    blob["config"]["vision"]["test_views"] = 8
    torch.save(blob, path)
    res = refit_probe(path, [load_sample("@demo")], device="cpu")
    assert res["bank_reembedded"]
    ck = load_checkpoint(path)
    assert ck.model.config.vision.test_views == 8
    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.run_config import DataConfig

    cfg = ck.model.config
    same = build_training_set([load_sample("@demo")], DataConfig(unlabelled=False), patch_um=cfg.patch_um,
                              img_size=cfg.vision.img_size, panel=ck.gene_panel)  # the spots refit reads
    want, _ = embed_patches(ck.model, same.patches, torch.device("cpu"), features=False)
    torch.testing.assert_close(ck.bank.emb, torch.from_numpy(want).half().float())
    assert (ck.bank.emb - before).abs().max() > 1e-3


def test_only_reading_keys_can_be_switched_after_training(tmp_path):
    from _model_common import train_on_demo

    from napari_comtip.model.checkpoint import load_checkpoint, update_checkpoint

    train_on_demo(tmp_path, {"mode": "names+values"})
    path = tmp_path / "run" / "model.pt"
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="change\\(s\\) what the model learned"):
        update_checkpoint(path, reading={"embed_dim": 64})
    with pytest.raises(ConfigError, match="vision.test_views must be one of"):
        update_checkpoint(path, reading={"vision.test_views": 3})
    assert path.read_bytes() == before  # nothing written on a refusal
    update_checkpoint(path, reading={"vision.test_views": 4}, note={"what": "reading switched"})
    ck = load_checkpoint(path)
    assert ck.model.config.vision.test_views == 4
    assert ck.provenance["updates"][-1]["what"] == "reading switched"


def test_refit_switches_the_reading_and_fits_on_it_in_one_write(tmp_path):
    """refit_probe(reading=...) (training/refit_probe.py --set): a refused key costs nothing and
    writes nothing; an accepted one is stored with the probe, bank and spread fitted on it."""
    from _model_common import train_on_demo

    from napari_comtip.engine.bank_probe import refit_probe
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    train_on_demo(tmp_path, {"mode": "names+values"})
    path = tmp_path / "run" / "model.pt"
    before = path.read_bytes()
    emb_before = load_checkpoint(path).bank.emb
    with pytest.raises(ConfigError, match="change\\(s\\) what the model learned"):
        refit_probe(path, [load_sample("@demo")], device="cpu", reading={"w_paat": 0.0})
    assert path.read_bytes() == before
    res = refit_probe(path, [load_sample("@demo")], device="cpu", reading={"vision.test_views": 8})
    ck = load_checkpoint(path)
    assert res["bank_reembedded"] and ck.model.config.vision.test_views == 8
    upd = ck.provenance["updates"]
    assert len(upd) == 1 and upd[0]["what"].startswith("reading switched, probe re-fitted")
    assert upd[0]["reading"] == {"vision.test_views": 8}
    assert (ck.bank.emb - emb_before).abs().max() > 1e-3
