"""``predict_sample`` / ``predict_to_file`` / ``comtip predict`` on real samples with a real tiny checkpoint.

The checkpoint is a tiny CoMTIP (untrained weights) whose retrieval bank and ridge probe were
built here from the bundled demo section (real H&E, real counts), saved with ``save_checkpoint``
and loaded back, exactly the file layout ``comtip pretrain`` writes.
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from napari_comtip.cli import main
from napari_comtip.constants import Key
from napari_comtip.engine.predict import predict_sample
from napari_comtip.engine.predict_file import predict_to_file
from napari_comtip.engine.predict_inputs import get_checkpoint, resolve_genes
from napari_comtip.errors import CheckpointError, ConfigError, InputError


@pytest.fixture(scope="session")
def demo():
    from napari_comtip.io import load_sample

    return load_sample("@demo")


@pytest.fixture(scope="session")
def panel(demo):
    """40 real genes of the demo section: the most expressed ones (alphabetical ties broken)."""
    from napari_comtip.engine.data import lognorm_matrix

    ln = lognorm_matrix(demo.expression)
    order = np.argsort(-ln.mean(axis=0), kind="stable")[:40]
    return [str(demo.expression.var_names[i]) for i in order]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, demo, panel):
    from napari_comtip.engine import predictors
    from napari_comtip.engine.data import panel_matrix
    from napari_comtip.engine.inference import embed_sample
    from napari_comtip.model import build_model, get_preset, save_checkpoint

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.text.use_name_embedding = False  # skips loading the text model; every predictor still works
    model = build_model(cfg, panel).eval()
    emb = embed_sample(demo, model, device="cpu", features=True)
    expr = panel_matrix(demo.expression, panel)
    probe = predictors.fit_probe(emb.features, expr, alpha=1.0, genes=panel)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, extras={
        "bank": {"emb": torch.from_numpy(np.asarray(emb.image)), "expr": torch.from_numpy(expr),
                 "ids": demo.spot_ids},
        "probe": probe.to_dict(),
        "provenance": {"data": ["@demo C2"], "steps": 0, "note": "untrained, for tests"},
    })
    return path


@pytest.fixture(scope="session")
def visium(visium_tiny_dir):
    from napari_comtip.io import load_sample

    return load_sample(visium_tiny_dir)


def _lognorm(demo, genes):
    from napari_comtip.engine.data import panel_matrix

    return panel_matrix(demo.expression, genes)


# --------------------------------------------------------------------------- the AnnData
def test_retrieval_on_visium_is_aligned_with_the_source(visium, ckpt, panel):
    ad = predict_sample(visium, checkpoint=ckpt, device="cpu", mode="retrieval")
    assert ad.shape == (visium.n_spots, len(panel))
    assert list(ad.obs_names) == visium.spot_ids
    np.testing.assert_array_equal(ad.obsm[Key.SPATIAL], visium.centers_xy())
    assert list(ad.var_names) == panel
    assert ad.X.dtype == np.float32 and np.isfinite(ad.X).all()
    assert ad.obsm[Key.EMBEDDING].shape == (visium.n_spots, get_checkpoint(ckpt).model.embed_dim)
    prov = ad.uns[Key.PROVENANCE]
    assert prov["predictor"] == "retrieval" and prov["params"]["k"] == 50 and prov["params"]["bank_source"] == "checkpoint"
    assert prov["checkpoint"] == str(ckpt) and len(prov["checkpoint_digest"]) == 16
    assert prov["training"]["note"] == "untrained, for tests"
    assert prov["device"].startswith("cpu") and prov["batch_size"] > 0
    assert prov["patch_um"] == get_checkpoint(ckpt).model.config.patch_um
    assert set(prov["versions"]) >= {"napari-comtip", "torch", "timm", "anndata"}
    assert prov["sample"]["format"] == "visium" and prov["created"].endswith("+00:00")
    # the bank's values are log-normalised expression of real spots: a mean of k of them
    assert ad.X.min() >= 0 and ad.X.max() < 15


def test_retrieval_k1_on_the_bank_sample_returns_its_own_expression(demo, ckpt, panel):
    ad = predict_sample(demo, checkpoint=ckpt, device="cpu", mode="retrieval", k=1)
    np.testing.assert_allclose(ad.X, _lognorm(demo, panel), atol=5e-3)  # fp16 bank storage
    assert list(ad.obs_names) == demo.spot_ids


def test_gene_subset_keeps_the_requested_order(visium, ckpt, panel):
    full = predict_sample(visium, checkpoint=ckpt, device="cpu")
    genes = [panel[7], panel[2], panel[7].lower()]  # case-insensitive, duplicates dropped
    sub = predict_sample(visium, checkpoint=ckpt, device="cpu", genes=genes)
    assert list(sub.var_names) == [panel[7], panel[2]]
    np.testing.assert_allclose(sub.X, full[:, [panel[7], panel[2]]].X, atol=1e-6)


def test_genes_by_feature_id(demo, ckpt, panel):
    """--genes accepts the sample's feature ids (var['gene_ids']) as well as symbols."""
    import dataclasses

    from napari_comtip.constants import Key

    expr = demo.expression.copy()
    expr.var[Key.GENE_IDS] = [f"ENSG{i:011d}" for i in range(expr.n_vars)]
    sample = dataclasses.replace(demo, expression=expr)
    fid = expr.var.loc[panel[5], Key.GENE_IDS]
    sub = predict_sample(sample, checkpoint=ckpt, device="cpu", mode="retrieval", genes=f"{fid},{panel[1]}")
    assert list(sub.var_names) == [panel[5], panel[1]]
    with pytest.raises(InputError, match="ENSG99999999999"):
        predict_sample(sample, checkpoint=ckpt, device="cpu", mode="retrieval", genes=["ENSG99999999999"])


def test_unknown_gene_lists_close_matches(ckpt, panel):
    gene = panel[0]
    typo = gene[:-1] + ("X" if gene[-1] != "X" else "Y")
    with pytest.raises(InputError) as exc:
        resolve_genes([typo], panel, "tiny.pt")
    msg = str(exc.value)
    assert "\n" not in msg and typo in msg and gene in msg and "without --genes" in msg


def test_probe_from_checkpoint_equals_probe_fitted_from_reference(demo, visium, ckpt, panel):
    stored = predict_sample(visium, checkpoint=ckpt, mode="probe", device="cpu")
    fitted = predict_sample(visium, checkpoint=ckpt, mode="probe", device="cpu", reference="@demo", alpha=1.0,
                            context="none")  # the stored probe's rule (an old checkpoint: no context)
    assert stored.uns[Key.PROVENANCE]["params"]["probe_source"] == "checkpoint"
    assert fitted.uns[Key.PROVENANCE]["params"]["probe_source"] == "reference"
    np.testing.assert_allclose(stored.X, fitted.X, atol=2e-3)
    # a probe is a real fit: on its own training spots it beats predicting the mean
    own = predict_sample(demo, checkpoint=ckpt, mode="probe", device="cpu").X
    truth = _lognorm(demo, panel)
    assert ((own - truth) ** 2).mean() < ((truth.mean(0) - truth) ** 2).mean()


def test_probe_in_context_stored_equals_fitted(demo, visium, ckpt, panel, tmp_path):
    """A probe stored with the neighbours context applies the same transform as one fitted here,
    and a stored probe refuses another context."""
    from napari_comtip.engine.context import context_features
    from napari_comtip.engine.data import panel_matrix
    from napari_comtip.engine.inference import embed_sample
    from napari_comtip.engine.predictors import fit_probe
    from napari_comtip.errors import InputError
    from napari_comtip.model.checkpoint import update_checkpoint

    path = tmp_path / "ctx.pt"
    path.write_bytes(Path(ckpt).read_bytes())
    model = get_checkpoint(str(path)).model
    f = np.asarray(embed_sample(demo, model, device="cpu", features=True).features)
    probe = fit_probe(context_features(f, demo.centers_rc(), "neighbours"), panel_matrix(demo.expression, panel),
                      alpha=1.0, genes=panel).to_dict()
    probe["context"] = "neighbours"
    update_checkpoint(path, probe=probe, note={"why": "test"})
    stored = predict_sample(visium, checkpoint=str(path), mode="probe", device="cpu")
    fitted = predict_sample(visium, checkpoint=str(path), mode="probe", device="cpu", reference="@demo", alpha=1.0)
    assert stored.uns[Key.PROVENANCE]["params"]["context"] == "neighbours"
    np.testing.assert_allclose(stored.X, fitted.X, atol=2e-3)
    with pytest.raises(InputError, match="fitted with context 'neighbours'"):
        predict_sample(visium, checkpoint=str(path), mode="probe", device="cpu", context="none")


def test_retrieval_from_a_reference_dataset_equals_the_bank(demo, ckpt):
    bank = predict_sample(demo, checkpoint=ckpt, device="cpu", mode="retrieval", k=3)
    ref = predict_sample(demo, checkpoint=ckpt, device="cpu", mode="retrieval", k=3, reference="@demo", reference_samples=["C2"])
    assert ref.uns[Key.PROVENANCE]["params"]["bank_source"] == "reference"
    np.testing.assert_allclose(ref.X, bank.X, atol=5e-3)


def test_zero_shot_stays_on_the_value_grid(visium, ckpt, panel):
    ad = predict_sample(visium, checkpoint=ckpt, mode="zero-shot", device="cpu", genes=panel[:5])
    assert ad.shape == (visium.n_spots, 5) and np.isfinite(ad.X).all()
    from napari_comtip.engine.predict_inputs import get_checkpoint

    model = get_checkpoint(ckpt).model
    grid = model.value_grid(model.gene_index(panel[:5])).numpy()
    assert (ad.X >= grid[:, 0] - 1e-4).all() and (ad.X <= grid[:, -1] + 1e-4).all()
    assert ad.uns[Key.PROVENANCE]["params"]["grid"] == model.config.zero_shot.grid


def test_zero_shot_reads_each_spot_in_its_neighbourhood_unless_told_not_to(visium, ckpt, panel):
    """The default zero-shot input is the spot's embedding with its neighbourhood's
    (engine/context.embedding_context); ``context="none"`` is the spot alone; obsm keeps the
    spot's own embedding either way."""
    from napari_comtip.engine.context import embedding_context
    from napari_comtip.engine.predict_inputs import get_checkpoint
    from napari_comtip.engine.predictors import zero_shot

    model = get_checkpoint(ckpt).model
    genes = panel[:4]
    ctx = predict_sample(visium, checkpoint=ckpt, mode="zero-shot", device="cpu", genes=genes)
    raw = predict_sample(visium, checkpoint=ckpt, mode="zero-shot", device="cpu", genes=genes, context="none")
    assert ctx.uns[Key.PROVENANCE]["params"]["context"] == "neighbours"
    assert raw.uns[Key.PROVENANCE]["params"]["context"] == "none"
    emb = np.asarray(raw.obsm[Key.EMBEDDING])
    np.testing.assert_array_equal(np.asarray(ctx.obsm[Key.EMBEDDING]), emb)
    np.testing.assert_allclose(raw.X, zero_shot(model, emb, model.gene_index(genes)), rtol=1e-5, atol=1e-6)
    want = zero_shot(model, embedding_context(emb, visium.centers_rc(), "neighbours"), model.gene_index(genes))
    np.testing.assert_allclose(ctx.X, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ctx.X, raw.X)
    with pytest.raises(ConfigError, match="zero-shot context"):
        predict_sample(visium, checkpoint=ckpt, mode="zero-shot", device="cpu", genes=genes, context="section")


def test_checkpoint_evaluation_warns_about_an_unreliable_predictor(visium, ckpt, panel, tmp_path, recwarn):
    """A checkpoint whose stored held-out evaluation says zero-shot is anti-correlated warns when
    zero-shot is used (not for the probe); update_checkpoint keeps the weights and logs the change."""
    import shutil
    import warnings

    import torch

    from napari_comtip.model.checkpoint import read_checkpoint, update_checkpoint

    path = tmp_path / "evaluated.pt"
    shutil.copy(ckpt, path)
    update_checkpoint(path, extras={"evaluation": {"protocol": "leave-one-section-out", "predictors": {
        "zero-shot": {"pcc_hvg50": -0.13}, "probe": {"pcc_hvg50": 0.22}, "retrieval": {"pcc_hvg50": -0.01}}}},
        note={"what": "evaluation added"})
    before, after = read_checkpoint(ckpt), read_checkpoint(path)
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert after["provenance"]["updates"][-1]["what"] == "evaluation added"
    with pytest.warns(UserWarning, match="zero-shot predictions of evaluated.pt were not positively correlated"):
        predict_sample(visium, checkpoint=path, mode="zero-shot", device="cpu", genes=panel[:3])
    with pytest.warns(UserWarning, match="retrieval predictions of evaluated.pt"):
        predict_sample(visium, checkpoint=path, mode="retrieval", device="cpu", genes=panel[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the probe's evaluation is positive: no warning
        predict_sample(visium, checkpoint=path, mode="probe", device="cpu", genes=panel[:3])


def test_missing_bank_or_probe_is_a_clear_error(tmp_path, visium, panel):
    from napari_comtip.model import build_model, get_preset, save_checkpoint

    cfg = get_preset("tiny")
    cfg.text.use_name_embedding = False
    bare = save_checkpoint(tmp_path / "bare.pt", build_model(cfg, panel))
    with pytest.raises(InputError, match="stores no probe.*--reference"):
        predict_sample(visium, checkpoint=bare, mode="probe", device="cpu")
    with pytest.raises(InputError, match="stores no retrieval bank.*--reference"):
        predict_sample(visium, checkpoint=bare, mode="retrieval", device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        predict_sample(visium, checkpoint=tmp_path / "nope.pt", device="cpu")
    with pytest.raises(InputError, match="unknown prediction mode"):
        predict_sample(visium, checkpoint=bare, mode="magic", device="cpu")


def test_second_prediction_reuses_the_embeddings(visium, ckpt):
    model = get_checkpoint(ckpt).model
    seen = []
    handle = model.vision.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        predict_sample(visium, checkpoint=ckpt, device="cpu", mode="probe")  # features: computed or cached
        n = len(seen)
        ad = predict_sample(visium, checkpoint=ckpt, device="cpu", mode="probe")
    finally:
        handle.remove()
    prov = ad.uns[Key.PROVENANCE]
    assert len(seen) == n and prov["embeddings_cached"]
    assert prov["device"].startswith("cpu") and "cache" in prov["device"] and prov["batch_size"] > 0


# --------------------------------------------------------------------------- files
def test_predict_to_file_writes_h5ad_and_csv(tmp_path, visium, ckpt, panel):
    out, csv = tmp_path / "pred.h5ad", tmp_path / "pred.csv"
    ad = predict_to_file(visium, out, checkpoint=ckpt, device="cpu", csv=csv)
    back = anndata.read_h5ad(out)
    assert list(back.obs_names) == visium.spot_ids and list(back.var_names) == panel
    np.testing.assert_array_equal(back.X, ad.X)
    np.testing.assert_array_equal(back.obsm[Key.SPATIAL], visium.centers_xy())
    assert back.uns[Key.PROVENANCE]["checkpoint_digest"] == ad.uns[Key.PROVENANCE]["checkpoint_digest"]
    head = [ln for ln in csv.read_text().splitlines() if ln.startswith("#")]
    assert any("log1p(counts / library size x 10000)" in ln for ln in head) and all("," not in ln for ln in head)
    table = pd.read_csv(csv, comment="#")
    assert list(table.columns[:5]) == ["spot_id", "x_px", "y_px", "x_um", "y_um"]
    # the genes, then (the probe gives its spread) one <gene>_uncertainty column per gene
    assert Key.UNCERTAINTY in ad.layers
    assert list(table.columns[5:]) == panel + [f"{g}_uncertainty" for g in panel]
    np.testing.assert_allclose(table[[f"{g}_uncertainty" for g in panel]].to_numpy(),
                               ad.layers[Key.UNCERTAINTY], atol=5.1e-5)
    assert table["spot_id"].tolist() == visium.spot_ids
    np.testing.assert_allclose(table[["x_px", "y_px"]].to_numpy(), visium.centers_xy(), atol=0.005)
    np.testing.assert_allclose(table["x_um"], np.round(table["x_px"] * visium.mpp, 1), atol=0.051)
    np.testing.assert_allclose(table[panel].to_numpy(), ad.X, atol=5.1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv", "pred.h5ad"]


def test_bare_slide_grid_pitch_in_provenance_and_csv(tmp_path, demo, ckpt):
    from napari_comtip.io import load_sample

    bare = load_sample(demo.provenance["image"], pitch_um=300, mpp=demo.mpp)
    out, csv = tmp_path / "bare.h5ad", tmp_path / "bare.csv"
    predict_to_file(bare, out, checkpoint=ckpt, device="cpu", mode="retrieval", csv=csv)
    grid = anndata.read_h5ad(out).uns[Key.PROVENANCE]["sample"]["grid"]
    assert grid["pitch_um"] == 300 and grid["pitch_px"] == pytest.approx(300 / demo.mpp)
    assert "# bare-slide grid: pitch 300 um (spot diameter 165 um)" in csv.read_text().splitlines()


def test_existing_output_needs_overwrite(tmp_path, visium, ckpt):
    out = tmp_path / "pred.h5ad"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        predict_to_file(visium, out, checkpoint=ckpt, device="cpu")
    assert out.read_bytes() == b"precious"
    predict_to_file(visium, out, checkpoint=ckpt, device="cpu", overwrite=True)
    assert anndata.read_h5ad(out).n_obs == visium.n_spots


def test_never_writes_over_an_input(tmp_path, visium, ckpt):
    before = ckpt.read_bytes()
    with pytest.raises(InputError, match="input"):
        predict_to_file(visium, ckpt, checkpoint=ckpt, device="cpu", overwrite=True)
    assert ckpt.read_bytes() == before


def test_failure_mid_write_leaves_nothing(tmp_path, visium, ckpt, monkeypatch):
    out = tmp_path / "pred.h5ad"

    def broken_write(self, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"\x89HDF partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", broken_write)
    with pytest.raises(OSError, match="No space left"):
        predict_to_file(visium, out, checkpoint=ckpt, device="cpu")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI
def test_cli_predict_and_its_error_path(tmp_path, ckpt, panel, capsys):
    out = tmp_path / "demo.h5ad"
    rc = main(["predict", "@demo", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu",
               "--genes", f"{panel[0]},{panel[1]}", "--csv", str(tmp_path / "demo.csv")])
    assert rc == 0 and out.is_file() and (tmp_path / "demo.csv").is_file()
    assert "wrote 187 spots x 2 genes" in capsys.readouterr().out
    ad = anndata.read_h5ad(out)
    assert ad.uns[Key.PROVENANCE]["sample"]["name"] == "C2"

    capsys.readouterr()
    rc = main(["predict", "@demo", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err

    rc = main(["predict", "@demo", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.h5ad"),
               "--genes", "NOT_A_GENE", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "not in the gene panel" in err and err.count("\n") == 1
    assert not (tmp_path / "x.h5ad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_unavailable_device(tmp_path, ckpt, capsys):
    rc = main(["predict", "@demo", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.h5ad"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "cuda" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- heavier
@pytest.mark.slow
def test_her2st_section_with_its_own_reference(her2st_dir, ckpt, panel):
    from napari_comtip.io import load_sample

    s = load_sample(her2st_dir, sample="C3")
    ad = predict_sample(s, checkpoint=ckpt, device="cpu", mode="retrieval", reference=her2st_dir, reference_samples=["C3"], k=1)
    assert list(ad.obs_names) == s.spot_ids and ad.shape == (s.n_spots, len(panel))
    np.testing.assert_allclose(ad.X, _lognorm(s, panel), atol=1e-5)  # every spot finds itself
    np.testing.assert_array_equal(ad.obsm[Key.SPATIAL], s.centers_xy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_on_cuda_records_the_device(visium, ckpt):
    ad = predict_sample(visium, checkpoint=ckpt, device="cuda")
    prov = ad.uns[Key.PROVENANCE]
    assert prov["device"].startswith("cuda:") and prov["precision"] in ("bf16", "fp16")
    cpu = predict_sample(visium, checkpoint=ckpt, device="cpu")
    assert np.corrcoef(ad.X.ravel(), cpu.X.ravel())[0, 1] > 0.95
    get_checkpoint(ckpt).model.to("cpu")


# --------------------------------------------------------------------------- the bundled checkpoint
def _bundled_or_skip():
    from napari_comtip.model import default_checkpoint_path

    path = default_checkpoint_path()
    if not path.is_file():
        pytest.skip("no bundled checkpoint in this checkout")
    return path


def test_bundled_checkpoint_predicts_the_demo_section(demo, tmp_path, capsys):
    bundled = _bundled_or_skip()
    from napari_comtip.engine.evaluation import evaluate_predictions

    ad = predict_sample(demo, device="cpu")  # checkpoint=None: the bundled one
    prov = ad.uns[Key.PROVENANCE]
    assert prov["checkpoint"] == str(bundled) and prov["training"]  # its training provenance travels along
    assert list(ad.obs_names) == demo.spot_ids and ad.n_vars == len(get_checkpoint(None).gene_panel)
    # the demo is (a downsampled crop of) one of its training sections: retrieval must track the
    # measured expression of the most variable genes (about 0.3 when measured; chance is 0)
    assert evaluate_predictions(ad, demo.expression)["pcc_hvg50"] > 0.1
    rc = main(["predict", "@demo", "--out", str(tmp_path / "d.h5ad"), "--genes", "ERBB2", "--device", "cpu"])
    assert rc == 0 and "wrote 187 spots x 1 genes" in capsys.readouterr().out


# --------------------------------------------------------------------------- embeddings passed in
def test_embeddings_of_another_resolution_are_refused(visium, ckpt):
    """``predict_sample(embeddings=...)`` compares the whole embedding signature, not only the digest."""
    import dataclasses

    from napari_comtip.engine.inference import embed_sample

    model = get_checkpoint(ckpt).model
    emb = embed_sample(visium, model, device="cpu", features=True)
    predict_sample(visium, checkpoint=ckpt, mode="probe", device="cpu", embeddings=emb)  # matching: accepted
    coarser = dataclasses.replace(visium, mpp=visium.mpp * 2)
    with pytest.raises(InputError, match="mpp"):
        predict_sample(coarser, checkpoint=ckpt, mode="probe", device="cpu", embeddings=emb)
    for field, value in (("precision", "bf16"), ("pad_value", 0), ("patch_um", 1.0),
                         ("sample_identity", "another slide")):
        other = dataclasses.replace(emb, signature={**emb.signature, field: value})
        with pytest.raises(InputError, match=field):
            predict_sample(visium, checkpoint=ckpt, mode="probe", device="cpu", embeddings=other)
    unsigned = dataclasses.replace(emb, signature={})
    with pytest.raises(InputError, match="signature"):
        predict_sample(visium, checkpoint=ckpt, mode="probe", device="cpu", embeddings=unsigned)


# --------------------------------------------------------------------------- uncertainty
def test_every_predictor_fills_the_uncertainty_layer(visium, ckpt, panel, tmp_path):
    genes = panel[:5]
    for mode in ("retrieval", "probe", "zero-shot"):
        ad = predict_sample(visium, checkpoint=ckpt, mode=mode, genes=genes, device="cpu")
        u = ad.layers[Key.UNCERTAINTY]
        assert u.shape == ad.shape and u.dtype == np.float32 and np.isfinite(u).all() and (u >= 0).all(), mode
        assert u.std() > 0, mode  # it varies over spots and genes
        note = ad.uns[Key.PROVENANCE]["uncertainty"]
        assert note["layer"] == Key.UNCERTAINTY and "standard deviation" in note["what"], note
    out = tmp_path / "u.h5ad"
    written = predict_to_file(visium, out, checkpoint=ckpt, mode="probe", genes=genes, device="cpu")
    back = anndata.read_h5ad(out)
    assert np.array_equal(back.layers[Key.UNCERTAINTY], written.layers[Key.UNCERTAINTY])
    assert "leave-one-out" in back.uns[Key.PROVENANCE]["uncertainty"]["what"]


def test_a_probe_stored_before_uncertainty_still_predicts(visium, ckpt, panel, tmp_path):
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    for k in ("cov", "resid_var", "n_train", "resid_rule", "var_weight", "var_bias"):
        blob["probe"].pop(k)
    old = tmp_path / "old.pt"
    torch.save(blob, old)
    new = predict_sample(visium, checkpoint=ckpt, mode="probe", genes=panel[:3], device="cpu")
    ad = predict_sample(visium, checkpoint=old, mode="probe", genes=panel[:3], device="cpu")
    assert np.allclose(ad.X, new.X, atol=1e-5) and Key.UNCERTAINTY not in ad.layers
    note = ad.uns[Key.PROVENANCE]["uncertainty"]
    assert note["layer"] == "" and "not available" in note["what"] and "--reference" in note["what"]
