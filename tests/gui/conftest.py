"""Fixtures of the napari GUI tests: a small real her2st dataset and a real tiny checkpoint.

* ``demo``: the bundled her2st section C2 (``@demo``), the slide the widget tests predict; it
  has measured expression, so the measured layer and Pearson r are exercised.
* ``small_her2st``: sections C2 and C3 of the real her2st data with their real counts and spot
  tables, the H&E images downsampled 4x (spot coordinates scaled with them), written to a temp
  folder in the her2st layout (a multi-section dataset for the reader tests, and C3 as the
  reference of the checkpoint's bank), so loading takes a second instead of building a pyramid
  of a 9k x 10k JPEG.
* ``tiny_checkpoint``: the ``tiny`` preset (without the pretrained gene-name embedding, so no text
  model is loaded) built for a 64-gene panel (untrained weights: the GUI plumbing does not need a
  good model), saved with ``save_checkpoint`` together with a real
  retrieval bank and ridge probe made from 96 spots of section C3 (embedded with the same model), so every
  predictor runs. 

GUI tests need a real X server (pytest-xvfb starts Xvfb); artefacts (screenshots) go to
``$COMTIP_TEST_ARTEFACTS`` or ``<repo>/test-artefacts/gui``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_comtip.constants import Key

DOWNSAMPLE = 4
SECTIONS = {"C2": "C", "C3": "C"}
N_GENES = 64
BANK_SPOTS = 96


def _small_section(src: Path, dst: Path, section: str, patient: str) -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    (dst / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (dst / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "ST-cnts" / f"{section}.tsv.gz", dst / "ST-cnts" / f"{section}.tsv.gz")
    sel = pd.read_csv(src / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    for c in ("pixel_x", "pixel_y"):
        sel[c] = sel[c] / DOWNSAMPLE
    sel.to_csv(dst / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
    img_dir = src / "ST-imgs" / patient / section
    jpg = sorted(img_dir.glob("*.jpg"))[0]
    out_dir = dst / "ST-imgs" / patient / section
    out_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(jpg) as im:
        size = (im.width // DOWNSAMPLE, im.height // DOWNSAMPLE)
        im.draft("RGB", size)  # decode at 1/4 scale (JPEG DCT scaling): fast
        small = im.convert("RGB")
        if small.size != size:
            small = small.resize(size, Image.Resampling.BOX)
        small.save(out_dir / jpg.name, quality=92)


@pytest.fixture(scope="session")
def small_her2st(her2st_dir, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("her2st-small")
    for section, patient in SECTIONS.items():
        _small_section(her2st_dir, dst, section, patient)
    return dst


@pytest.fixture(scope="session")
def demo():
    """The bundled her2st section C2 (``@demo``): the slide the widget tests predict."""
    from napari_comtip.io import DEMO_ALIAS, bundled_sample_path, load_sample

    if not bundled_sample_path().is_dir():
        pytest.skip("the bundled sample is not in this checkout")
    return load_sample(DEMO_ALIAS)


@pytest.fixture(scope="session")
def tiny_checkpoint(small_her2st, demo, tmp_path_factory) -> Path:
    import torch

    from napari_comtip.engine.inference import embed_sample
    from napari_comtip.engine.predictors import fit_probe
    from napari_comtip.io import load_sample
    from napari_comtip.model.checkpoint import save_checkpoint
    from napari_comtip.model.presets import get_preset
    from napari_comtip.model.factory import build_model

    ref = load_sample(small_her2st, sample="C3")
    measured_on_demo = set(demo.expression.var_names)
    shared = [g for g in ref.expression.var_names if g in measured_on_demo]
    lognorm = ref.expression[:, shared].layers[Key.LOGNORM]
    lognorm = lognorm.toarray() if hasattr(lognorm, "toarray") else np.asarray(lognorm)
    top = np.argsort(-lognorm.mean(axis=0))[: N_GENES - 2]
    panel = [shared[i] for i in sorted(top)]
    for g in ("ERBB2", "KRT19"):  # HER2 and an epithelial marker: genes a pathologist looks for
        if g in shared and g not in panel:
            panel.append(g)
    panel = panel[:N_GENES]
    torch.manual_seed(0)
    config = get_preset("tiny")
    config.text.use_name_embedding = False  # no text model to load: the GUI plumbing does not need it
    model = build_model(config, panel).eval()
    ref = dataclasses.replace(ref, spots=ref.spots.iloc[:BANK_SPOTS])  # a small bank keeps the fixture fast
    emb = embed_sample(ref, model, device="cpu", features=True, cache=False)
    expr = ref.expression[ref.spot_ids, panel].layers[Key.LOGNORM]
    expr = np.asarray(expr.toarray() if hasattr(expr, "toarray") else expr, dtype=np.float32)
    probe = fit_probe(emb.features, expr, genes=panel)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-test.pt"
    save_checkpoint(path, model, extras={
        "bank": {"emb": torch.from_numpy(np.asarray(emb.image)), "expr": torch.from_numpy(expr),
                 "ids": list(ref.spot_ids)},
        "probe": probe.to_dict(),
        "provenance": {"note": "untrained tiny model for GUI tests; bank and probe from her2st C3 (4x downsampled)"},
    })
    return path


@pytest.fixture(scope="session")
def artefact_dir() -> Path:
    root = Path(os.environ.get("COMTIP_TEST_ARTEFACTS", Path(__file__).resolve().parents[2] / "test-artefacts"))
    out = root / "gui"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def notifications():
    """Every napari notification emitted during the test, as (severity, message) pairs."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def grab(event):
        n = event.value if hasattr(event, "value") else event
        seen.append((str(getattr(n, "severity", "")), str(getattr(n, "message", n))))

    notification_manager.notification_ready.connect(grab)
    yield seen
    notification_manager.notification_ready.disconnect(grab)
