"""Checkpoints: round trip, fp16 storage, bank/probe, weights_only safety, refusal of foreign files."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from napari_comtip.engine.predictors import fit_probe, probe_predict
from napari_comtip.errors import CheckpointError
from napari_comtip.model import (
    build_model,
    checkpoint_digest,
    default_checkpoint_path,
    embed_gene_names,
    get_preset,
    load_checkpoint,
    save_checkpoint,
)
from napari_comtip.model import checkpoint as ck_mod

from _model_common import GENES, one_thread  # noqa: F401  (one_thread is autouse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro model after a few optimiser steps (so weights and value ranges are non-trivial)."""
    torch.manual_seed(0)
    m = build_model(get_preset("micro"), GENES, name_embeddings=embed_gene_names(GENES))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = m.preprocess(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g))
        out = m(x, *m.sample_text(torch.rand(8, len(GENES), generator=g) * 3, g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def probe_inputs():
    x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    gi = torch.tensor([[0, 3, 5], [1, 2, 2], [7, 0, 0], [4, 5, 6], [1, 1, 1], [2, 3, 4]])
    v = torch.rand(6, 3) * 2
    mk = torch.ones(6, 3, dtype=torch.bool)
    mk[1, 2] = mk[2, 1:] = mk[4, 1:] = False
    return x, gi, v, mk


def _outputs(model, inputs):
    x, gi, v, mk = inputs
    with torch.no_grad():
        xx = model.preprocess(x)
        return model.encode_image(xx), model.image_features(xx), model.encode_genes(gi, v, mk)


def test_round_trip_gives_identical_outputs(trained, probe_inputs, tmp_path, monkeypatch):
    bank = {"emb": torch.randn(20, 32), "expr": torch.rand(20, len(GENES)), "ids": [f"s{i}" for i in range(20)], "samples": ["B4"]}
    probe = fit_probe(np.random.default_rng(0).normal(size=(30, 64)), np.random.default_rng(1).normal(size=(30, 8)), 1.0)
    path = save_checkpoint(
        tmp_path / "sub" / "m.pt",
        trained,
        trained.config,
        GENES,
        extras={"provenance": {"data": ["B4"], "steps": 3}, "bank": bank, "probe": probe, "note": np.float32(1.5)},
    )
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    # loading needs no text model: the name embeddings travel in the checkpoint
    monkeypatch.setattr("napari_comtip.model.factory.embed_gene_names", lambda *a, **k: pytest.fail("text model used"))
    ck = load_checkpoint(path)
    assert ck.gene_panel == GENES and ck.model.gene_panel == GENES
    assert ck.config.to_dict() == trained.config.to_dict()
    assert not ck.model.training
    for a, b in zip(_outputs(trained, probe_inputs), _outputs(ck.model, probe_inputs)):
        assert torch.equal(a, b)
    assert torch.equal(ck.model.value_hi, trained.value_hi)
    assert ck.meta["provenance"] == {"data": ["B4"], "steps": 3}
    assert ck.meta["normalization"] == {"target_sum": 1e4, "log1p": True}
    assert ck.meta["patch_um"] == trained.config.patch_um
    assert ck.meta["extras"] == {"note": 1.5}
    assert re.fullmatch(r"[0-9a-f]{16}", ck.digest) and ck.path == path and ck.name is None and ck.label == "m.pt"
    assert ck.bank.ids == bank["ids"] and ck.bank.meta == {"samples": ["B4"]}
    assert torch.allclose(ck.bank.emb, bank["emb"], atol=2e-3) and ck.bank.emb.dtype == torch.float32
    f = np.random.default_rng(2).normal(size=(4, 64))
    assert np.allclose(probe_predict(ck.probe, f), probe_predict(probe, f))
    assert isinstance(ck.probe, ck_mod.StoredProbe) and ck.probe.context == "none" and ck.probe.alpha == probe.alpha
    # the file holds only weights_only-safe objects
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "napari-comtip-checkpoint" and raw["bank"]["emb"].dtype == torch.float16


def test_fp16_storage_is_smaller_and_close(trained, probe_inputs, tmp_path):
    p32 = save_checkpoint(tmp_path / "a.pt", trained)
    p16 = save_checkpoint(tmp_path / "b.pt", trained, half=True)
    assert p16.stat().st_size < 0.65 * p32.stat().st_size
    ck = load_checkpoint(p16)
    assert ck.meta["storage_dtype"] == "float16"
    assert all(v.dtype != torch.float16 for v in ck.model.state_dict().values())
    for a, b in zip(_outputs(trained, probe_inputs), _outputs(ck.model, probe_inputs)):
        assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()
    assert float(ck.model.logit_scale) == float(trained.logit_scale)  # kept in fp32
    # a model the trainer converted with .half() is stored the same way
    import copy

    p16b = save_checkpoint(tmp_path / "c.pt", copy.deepcopy(trained).half())
    assert load_checkpoint(p16b).meta["storage_dtype"] == "float16"


def test_other_panel_is_refused(trained, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", trained)
    assert load_checkpoint(path, expected_panel=GENES).gene_panel == GENES
    with pytest.raises(CheckpointError, match=r"m\.pt: .*another gene panel .*not in it \(e\.g\. NEWGENE"):
        load_checkpoint(path, expected_panel=GENES[:-1] + ["NEWGENE"])
    with pytest.raises(CheckpointError, match="another order"):
        load_checkpoint(path, expected_panel=GENES[::-1])
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.pt", trained, gene_panel=GENES[::-1])


def _rewrite(path, out, **changes):
    blob = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if k == "config_version":
            blob["config"]["version"] = v
        else:
            blob[k] = v
    torch.save(blob, out)
    return out


def test_other_versions_and_foreign_files_are_refused(trained, tmp_path):
    good = save_checkpoint(tmp_path / "m.pt", trained)
    cases = {
        "newer": (_rewrite(good, tmp_path / "newer.pt", format_version=ck_mod.FORMAT_VERSION + 1), "newer .* upgrade"),
        "older": (_rewrite(good, tmp_path / "older.pt", format_version=0), "older"),
        "model": (_rewrite(good, tmp_path / "model.pt", config_version=99), "model version 99"),
        "foreign": (tmp_path / "foreign.pt", "not a napari-comtip checkpoint"),
        "text": (tmp_path / "notes.txt", "not a PyTorch checkpoint"),
        "pickle": (tmp_path / "evil.pt", "pickled Python objects"),
        "missing": (tmp_path / "missing.pt", "not found"),
        "broken": (_rewrite(good, tmp_path / "broken.pt", state_dict={"x": torch.zeros(1)}), "weights do not fit"),
    }
    torch.save({"state_dict": trained.state_dict()}, cases["foreign"][0])
    cases["text"][0].write_text("not a checkpoint")
    torch.save({"format": "napari-comtip-checkpoint", "obj": _Custom()}, cases["pickle"][0])
    for name, (path, pattern) in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert "\n" not in msg and path.name in msg, (name, msg)


class _Custom:
    pass


def test_default_checkpoint_path_and_digest(tmp_path, trained):
    p = default_checkpoint_path()
    assert p.name == "comtip-tiny-her2st.pt" and p.parent.name == "checkpoints" and p.is_file()
    a = save_checkpoint(tmp_path / "a.pt", trained)
    d1 = checkpoint_digest(a)
    assert re.fullmatch(r"[0-9a-f]{16}", d1) and checkpoint_digest(a) == d1
    with torch.no_grad():
        trained.image_proj.bias.add_(1.0)
    try:
        save_checkpoint(tmp_path / "a.pt", trained)  # atomic replace
    finally:
        with torch.no_grad():
            trained.image_proj.bias.sub_(1.0)
    assert checkpoint_digest(a) != d1


def test_unpicklable_extras_are_refused(trained, tmp_path):
    with pytest.raises(TypeError, match="extras.thing"):
        save_checkpoint(tmp_path / "x.pt", trained, extras={"thing": object()})
    assert not (tmp_path / "x.pt").exists()
