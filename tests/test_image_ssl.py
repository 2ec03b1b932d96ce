"""Image self-distillation (model.w_image_ssl, model/image_ssl.py): the second views, the EMA
teacher, the loss, and a training run with it that resumes to the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _model_common import one_thread  # noqa: F401
from _training_common import CrashAt
from napari_comtip.engine import run_config as RC
from napari_comtip.engine import run_folder as RF
from napari_comtip.engine import training as T
from napari_comtip.engine.batches import Augment, BatchSet, generator, random_crops
from napari_comtip.engine.data import build_training_set
from napari_comtip.engine.distributed import Dist
from napari_comtip.errors import ConfigError
from napari_comtip.model import build_model
from napari_comtip.model.image_ssl import EmaTeacher, image_ssl_loss

RUN = {
    "preset": "micro",
    "model": {"w_mfm": 0.0, "w_image_ssl": 1.0},
    "data": {"n_hvg": 40, "n_mean": 10, "unlabelled_per_sample": 48, "unlabelled_batch": 8},
    "training": {"epochs": 1, "batch_size": 16, "checkpoint_every": 3, "warmup_steps": 2, "threads": 1},
}


def _cfg(**model):
    d = {**RUN, "model": {**RUN["model"], **model}}
    return RC.run_config_from_dict(d)


@pytest.fixture(scope="module")
def demo_set():
    from napari_comtip.io import load_sample

    cfg = _cfg()
    return build_training_set([load_sample("@demo")], cfg.data, patch_um=cfg.model.patch_um,
                              img_size=cfg.model.vision.img_size)


def test_random_crops_are_seeded_resized_crops():
    x = torch.arange(2 * 16 * 16 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 16, 16, 3)
    a = random_crops(x, generator(1), 0.25)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, random_crops(x, generator(1), 0.25))  # a step's draw depends on its seed only
    assert not torch.equal(a, random_crops(x, generator(2), 0.25))
    assert torch.equal(random_crops(x, generator(1), 1.0), x)  # crop_scale 1: the whole patch
    flat = torch.full((1, 16, 16, 3), 77, dtype=torch.uint8)  # a crop of a flat patch stays flat
    assert bool((random_crops(flat, generator(3), 0.3) == 77).all())


def test_second_views_cover_the_spots_and_the_unlabelled_patches_and_leave_the_batch_as_it_was(demo_set):
    off, on = _cfg(w_image_ssl=0.0, w_mfm=1.0), _cfg()
    a = BatchSet(demo_set, off, 0, 2, Dist(), Augment(off.data))[1]
    b = BatchSet(demo_set, on, 0, 2, Dist(), Augment(on.data))[1]
    assert a[-1].shape[0] == 0  # off: no second views
    for x, y in zip(a[:6], b[:6]):  # the first views, sentences and unlabelled patches are unchanged
        torch.testing.assert_close(x, y)
    imgs, extra, second = b[0], b[4], b[-1]
    assert second.shape == (imgs.shape[0] + extra.shape[0],) + tuple(imgs.shape[1:]) and second.dtype == torch.uint8
    assert extra.shape[0] == 8
    assert not torch.equal(second[: imgs.shape[0]], imgs)  # independently augmented and cropped
    # without MFM and without the term, no unlabelled patches are drawn at all
    none = _cfg(w_image_ssl=0.0)
    assert BatchSet(demo_set, none, 0, 2, Dist(), Augment(none.data))[1][4].shape[0] == 0


def test_the_teacher_is_an_ema_of_the_student_and_outside_the_model(demo_set):
    torch.manual_seed(0)
    model = build_model(_cfg().model, demo_set.panel).train()
    teacher = EmaTeacher(model, 0.9)
    names = set(dict(model.named_parameters()))
    assert any(n.startswith("image_ssl_head.") for n in names)
    assert not any("teacher" in n for n in names)  # not saved in the checkpoint, not optimised
    s0 = {k: v.clone() for k, v in teacher.state_dict()["vision"].items()}
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(1.0)
    teacher.update(model)
    for k, v in teacher.state_dict()["vision"].items():
        if v.dtype.is_floating_point and k in dict(model.vision.named_parameters()):
            torch.testing.assert_close(v, s0[k] + 0.1)  # 0.9 * t + 0.1 * (t + 1)
    other = EmaTeacher(model, 0.9)
    other.load_state_dict(teacher.state_dict())
    x = model.preprocess(torch.from_numpy(np.asarray(demo_set.patches[:4])))
    torch.testing.assert_close(other.embed(x), teacher.embed(x))
    assert not teacher.embed(x).requires_grad


def test_the_loss_trains_the_student_and_not_the_teacher(demo_set, one_thread):
    """Trained alone for 40 steps on two augmented views of the demo's patches, the loss falls well
    below its start (2 - 2 cos of nearly unrelated projections), while the teacher gets no gradient."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg.model, demo_set.panel).train()
    teacher = EmaTeacher(model, 0.9)
    aug = Augment(cfg.data)
    params = list(model.vision.parameters()) + list(model.image_ssl_head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    raw = torch.from_numpy(np.asarray(demo_set.patches[:48]))
    losses = []
    for step in range(40):
        g = generator(step)
        xa = model.preprocess(aug(raw, g))
        xb = model.preprocess(random_crops(aug(raw, g), g, 0.5))
        pooled = model.vision.pool(model.vision.forward_tokens(xa))
        loss = image_ssl_loss(model, teacher, pooled, xa, xb)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
        teacher.update(model)
        losses.append(float(loss.detach()))
    assert losses[0] > 0.5
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_a_run_with_the_term_logs_it_and_resumes_to_the_same_weights(demo_set, tmp_path):
    cfg = _cfg()
    full = T.pretrain(cfg, [], tmp_path / "full", max_steps=5, training_set=demo_set, device="cpu")
    with pytest.raises(RuntimeError, match="killed"):
        T.pretrain(cfg, [], tmp_path / "cut", max_steps=5, training_set=demo_set, device="cpu", callbacks=[CrashAt(4)])
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-0000003.pt", map_location="cpu", weights_only=True)
    assert state["image_ssl_teacher"] is not None  # the teacher resumes from its own weights
    resumed = T.pretrain(cfg, [], tmp_path / "cut", max_steps=5, training_set=demo_set, device="cpu", resume=True)
    a = torch.load(full, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(resumed, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    rows = RF.read_metrics(tmp_path / "full" / "metrics.csv")
    assert all(r["image_ssl"] > 0 for r in rows)
    assert [r["loss"] for r in rows] == [r["loss"] for r in RF.read_metrics(tmp_path / "cut" / "metrics.csv")]


def test_bad_values_are_refused():
    for key, value in (("w_image_ssl", -1), ("image_ssl.momentum", 1.0), ("image_ssl.crop_scale", 0.0),
                       ("image_ssl.dim", 0)):
        with pytest.raises(ConfigError, match=key.split(".")[-1]) as e:
            _cfg(**{key: value}) if "." not in key else RC.run_config_from_dict(
                {**RUN, "model": {**RUN["model"], "image_ssl": {key.split(".")[1]: value}}})
        assert "\n" not in str(e.value)
    for freeze in (True, 0):  # no block of the ViT trains
        with pytest.raises(ConfigError, match="vision.freeze"):
            RC.run_config_from_dict({**RUN, "model": {**RUN["model"], "vision": {"freeze": freeze}}})


def test_tissue_only_slides_add_their_tissue_spots_included(shared_data):
    from napari_comtip.engine.data import tissue_centres
    from napari_comtip.engine.run_config import DataConfig
    from napari_comtip.io import load_sample

    tiny = shared_data / "visium_tiny"
    if not tiny.is_dir():
        pytest.skip("visium_tiny not found")
    demo = load_sample("@demo")
    base = build_training_set([demo], DataConfig(n_hvg=30, n_mean=10, unlabelled_per_sample=20), patch_um=175.0, img_size=32)
    more = build_training_set([demo], DataConfig(n_hvg=30, n_mean=10, unlabelled_per_sample=20, tissue_only=[str(tiny)]),
                              patch_um=175.0, img_size=32)
    assert more.info["tissue_only"] == [f"{tiny}:visium_tiny"] and "tissue_only" not in base.info
    assert len(more.unlabelled) > len(base.unlabelled)
    np.testing.assert_array_equal(more.unlabelled[: len(base.unlabelled)], base.unlabelled)  # the training slides' first
    np.testing.assert_array_equal(more.patches, base.patches)  # and no spot or count of the tissue slide is read
    assert more.n_spots == base.n_spots and more.panel == base.panel
    s = load_sample(tiny)
    assert len(tissue_centres(s, 175.0, max_n=10**6, avoid_spots=False)) > len(tissue_centres(s, 175.0, max_n=10**6))


def test_the_benchmark_refuses_to_read_its_own_slides_as_tissue(shared_data, tmp_path):
    from napari_comtip.engine.loso import run_loso

    her2st = shared_data / "her2st"
    if not her2st.is_dir():
        pytest.skip("her2st not found")
    cfg = RC.run_config_from_dict({"preset": "micro", "data": {"tissue_only": [str(her2st)]}})
    with pytest.raises(ConfigError, match="tissue_only names the benchmark's own data") as e:
        run_loso(str(her2st), tmp_path / "b", config=cfg, arms=["untrained"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "b" / "untrained").exists()  # refused before any fold
