"""What the model-layer test modules share: a small real gene panel and one torch thread.

Import the fixtures into a test module (``from _model_common import GENES, one_thread``) to use
them there; ``one_thread`` is autouse, so importing it applies it to every test of that module.
"""

from __future__ import annotations

import pytest
import torch

GENES = ["KRT8", "KRT18", "CD74", "HLA-DRA", "COL1A1", "ERBB2", "PIP", "MGP"]


@pytest.fixture(autouse=True)
def one_thread():
    """Model tests are timed on one thread: small models run faster without a thread pool."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def micro_model(genes, seed: int = 0):
    """An untrained micro-preset CoMTIP over ``genes`` in eval mode (random name embeddings,
    sentences as long as the panel), seeded."""
    from napari_comtip.model import build_model, get_preset

    torch.manual_seed(seed)
    cfg = get_preset("micro").replace(**{"text.max_genes": len(genes)})
    return build_model(cfg, list(genes), name_embeddings=torch.randn(len(genes), 384)).eval()


def micro_reading_model(genes, **vision):
    """An untrained micro-preset CoMTIP over ``genes`` without MFM, in eval mode, seeded, with
    these ``vision`` reading keys (e.g. ``colour_features=True, test_views=8``)."""
    from napari_comtip.model import build_model, get_preset

    cfg = get_preset("micro")
    cfg.w_mfm = 0.0
    for k, v in vision.items():
        setattr(cfg.vision, k, v)
    torch.manual_seed(0)
    return build_model(cfg, list(genes), name_embeddings=torch.randn(len(genes), 8)).eval()


def train_on_demo(tmp_path, text: dict, model: dict | None = None):
    """(loaded model, training set, run config) of 3 micro steps on the demo sample with these
    ``model.text`` keys (and other ``model`` keys): the end-to-end path (training set, pretrain,
    checkpoint file, load)."""
    from napari_comtip.engine import run_config as RC
    from napari_comtip.engine import training as T
    from napari_comtip.engine.data import build_training_set
    from napari_comtip.engine.run_config import DataConfig
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import load_checkpoint

    s = load_sample("@demo")
    ts = build_training_set([s], DataConfig(n_hvg=30, n_mean=10, unlabelled=False), patch_um=175.0, img_size=32)
    cfg = RC.run_config_from_dict({"preset": "micro", "model": {**(model or {}), "text": dict(text)},
                                  "data": {"n_hvg": 30, "n_mean": 10, "unlabelled": False},
                                  "training": {"epochs": 1, "batch_size": 16, "threads": 1}})
    path = T.pretrain(cfg, [], tmp_path / "run", max_steps=3, training_set=ts, training_samples=[s], device="cpu")
    return load_checkpoint(path).model, ts, cfg
