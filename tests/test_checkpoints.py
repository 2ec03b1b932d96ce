"""The bundled checkpoints: the registry table, resolving a name or a path, the cheap metadata
catalogue, the one Checkpoint object, ``comtip checkpoints`` and ``--checkpoint NAME``, and the
one-line errors for an unknown name and for a gene of another panel or species."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from napari_comtip.cli import main
from napari_comtip.errors import CheckpointError, InputError
from napari_comtip.model import bundled as bundled_mod
from napari_comtip.model import catalogue
from napari_comtip.model.bundled import (
    BUNDLED, DEFAULT_NAME, FOLDER, bundled_names, checkpoint_name, default_checkpoint_path, resolve_checkpoint,
)
from napari_comtip.model.checkpoint import Checkpoint, StoredProbe, load_checkpoint, update_checkpoint
from napari_comtip.model.checkpoint_file import checkpoint_digest

HER2ST, MOUSE = "comtip-tiny-her2st", "comtip-tiny-mouse-brain"


# --------------------------------------------------------------------------- the registry table
def test_every_bundled_file_has_one_row_and_every_row_a_file():
    files = sorted(p.name for p in FOLDER.glob("*.pt"))
    assert files == sorted(b.file for b in BUNDLED), "a checkpoint file without a row in model/bundled.py (or back)"
    assert len({b.name for b in BUNDLED}) == len(BUNDLED) and sum(b.default for b in BUNDLED) == 1
    assert bundled_names() == [HER2ST, MOUSE] and DEFAULT_NAME == HER2ST
    assert default_checkpoint_path() == FOLDER / "comtip-tiny-her2st.pt"
    for b in BUNDLED:
        assert b.species in ("human", "mouse") and (FOLDER.parents[2] / b.card).is_file(), b


def test_resolve_a_name_a_file_name_a_path_or_nothing(tmp_path, monkeypatch):
    assert resolve_checkpoint(None) == resolve_checkpoint("") == default_checkpoint_path()
    assert resolve_checkpoint(MOUSE) == FOLDER / "comtip-tiny-mouse-brain.pt"
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("comtip-tiny-mouse-brain.pt") == FOLDER / "comtip-tiny-mouse-brain.pt"
    own = tmp_path / "comtip-tiny-mouse-brain.pt"
    own.write_bytes(b"x")  # a file of that name where the user is: the path wins over the file name
    assert resolve_checkpoint("comtip-tiny-mouse-brain.pt") == own.relative_to(tmp_path)
    assert resolve_checkpoint(own) == own
    assert resolve_checkpoint(MOUSE) == FOLDER / "comtip-tiny-mouse-brain.pt"  # the bare name is always bundled
    assert checkpoint_name(FOLDER / "comtip-tiny-mouse-brain.pt") == MOUSE and checkpoint_name(own) is None


@pytest.mark.parametrize("spec, words", [
    ("comtip-tiny-hers2t", "checkpoint not found"),
    ("runs/x/model.pt", "checkpoint not found"),
    (".", "is a folder"),
])
def test_an_unknown_name_or_missing_file_is_one_line_listing_the_names(spec, words):
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(spec)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{spec}: ") and words in msg
    assert HER2ST in msg and MOUSE in msg and "path" in msg and "comtip checkpoints" in msg


def test_a_bundled_file_missing_from_the_installation(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled_mod, "FOLDER", tmp_path)  # an installation without its checkpoint files
    with pytest.raises(CheckpointError, match=r"bundled checkpoint 'comtip-tiny-her2st' is missing .* reinstall"):
        resolve_checkpoint(None)


# --------------------------------------------------------------------------- the catalogue
def test_listing_reads_metadata_only_and_once(monkeypatch, tmp_path):
    import napari_comtip.model.factory as factory

    monkeypatch.setattr(factory, "build_model", lambda *a, **k: pytest.fail("listing built a model"))
    monkeypatch.setattr(catalogue, "_INFO", {})
    records = catalogue.list_bundled()
    by = {r["name"]: r for r in records}
    assert [r["name"] for r in records] == [HER2ST, MOUSE]
    assert by[HER2ST]["n_genes"] == 1238 and by[MOUSE]["n_genes"] == 1237
    assert by[HER2ST]["species"] == "human" and by[MOUSE]["species"] == "mouse"
    assert by[HER2ST]["default"] and not by[MOUSE]["default"]
    assert by[MOUSE]["samples"] == ["A1", "B1"] and by[MOUSE]["bank_spots"] == 4953
    for r in records:
        assert r["recipe"] == r["evaluation"]["arm"] and r["preset"] == "tiny"
        probe = r["evaluation"]["predictors"]["probe"]
        assert 0 < probe["pcc_heg50"] < 1 and set(probe["per_section"]) == set(r["samples"])
    # a second listing reads no file
    monkeypatch.setattr(catalogue, "read_checkpoint", lambda *a, **k: pytest.fail("read again"))
    assert catalogue.list_bundled() == records


def test_catalogue_notices_a_changed_file(tmp_path, monkeypatch):
    copy = tmp_path / "mine.pt"
    shutil.copyfile(FOLDER / "comtip-tiny-her2st.pt", copy)
    before = catalogue.checkpoint_info(copy)
    assert before["name"] == "mine" and not before["bundled"] and before["species"] is None
    assert before["data"] == "sections B4, C2, C3, C4"
    update_checkpoint(copy, extras={"evaluation": {"arm": "other", "predictors": {}}})
    after = catalogue.checkpoint_info(copy)
    assert after["recipe"] == "other" and after["evaluation"] == {"arm": "other", "predictors": {}}


def test_which_bundled_checkpoint_has_a_gene():
    assert catalogue.bundled_with_gene("ERBB2") == [(HER2ST, "ERBB2")]
    assert catalogue.bundled_with_gene("mbp") == [(MOUSE, "Mbp")]
    assert catalogue.bundled_with_gene("ERBB2", exclude=default_checkpoint_path()) == []
    assert catalogue.bundled_with_gene("NOT-A-GENE") == []


def test_a_sample_of_another_species_is_pointed_to_the_fitting_checkpoint(shared_data):
    mouse_genes = catalogue.gene_panel_of(MOUSE) + ["Xist", "Gm42418"]
    b = catalogue.better_bundled_for(mouse_genes, HER2ST)
    assert b["name"] == MOUSE and b["species"] == "mouse" and b["own_species"] == "human" and b["shared"] == 1237
    assert catalogue.better_bundled_for(mouse_genes, MOUSE) is None  # the right one already
    assert catalogue.better_bundled_for(catalogue.gene_panel_of(HER2ST), HER2ST) is None
    assert catalogue.better_bundled_for([f"ENSG{i:011d}" for i in range(100)], HER2ST) is None  # no fit anywhere
    # through predict: a real mouse-brain section with the (default) human checkpoint warns, naming the fix
    from napari_comtip.engine.predict import predict_sample
    from napari_comtip.io import load_sample

    a1 = load_sample(shared_data / "visium_mouse_brain", sample="A1")
    with pytest.warns(UserWarning, match="sample 'A1' measures only .* comtip-tiny-her2st \\(human\\).*"
                                         "use --checkpoint comtip-tiny-mouse-brain"):
        with pytest.raises(InputError, match="has it as Mbp"):
            predict_sample(a1, genes=["Mbp"], device="cpu")


# --------------------------------------------------------------------------- the Checkpoint object
def test_load_by_name_gives_the_typed_object():
    ck = load_checkpoint(MOUSE)
    assert isinstance(ck, Checkpoint) and ck.name == ck.label == MOUSE
    assert ck.path == FOLDER / "comtip-tiny-mouse-brain.pt" and ck.digest == checkpoint_digest(ck.path)
    assert len(ck.gene_panel) == 1237 and ck.model.gene_panel == ck.gene_panel
    assert ck.bank.emb.shape == (4953, ck.model.embed_dim) and ck.bank.expr.shape == (4953, 1237)
    assert isinstance(ck.probe, StoredProbe) and ck.probe.context == "neighbours"
    assert ck.probe.weight.shape[1] == len(ck.probe.genes) and ck.probe.weight.dtype.name == "float32"
    assert ck.evaluation["arm"] == catalogue.checkpoint_info(MOUSE)["recipe"]
    assert ck.provenance["samples"] == ["A1", "B1"]
    # the typed probe is what update_checkpoint stores back
    assert set(ck.probe.to_dict()) >= {"weight", "bias", "mean", "std", "alpha", "genes", "context", "alpha_rule"}


def test_stored_probe_round_trips_through_update(tmp_path):
    copy = tmp_path / "m.pt"
    shutil.copyfile(FOLDER / "comtip-tiny-her2st.pt", copy)
    ck = load_checkpoint(copy)
    probe = ck.probe
    probe.alpha = 123.0
    update_checkpoint(copy, probe=probe, note={"what": "test"})
    again = load_checkpoint(copy).probe
    assert again.alpha == 123.0 and again.context == probe.context and again.genes == probe.genes
    assert torch.equal(torch.from_numpy(again.weight), torch.from_numpy(probe.weight))


# --------------------------------------------------------------------------- the command line
def test_cli_checkpoints_json_and_table(capsys):
    assert main(["checkpoints", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == [HER2ST, MOUSE]
    for r in records:
        assert {"name", "path", "data", "n_genes", "recipe", "species", "default", "evaluation"} <= set(r)
    assert [r["n_genes"] for r in records] == [1238, 1237] and [r["default"] for r in records] == [True, False]
    assert main(["checkpoints"]) == 0
    text = capsys.readouterr().out
    assert f"{HER2ST} *" in text and MOUSE in text and "mouse" in text and "--checkpoint NAME" in text


def test_cli_predict_with_a_bundled_name(tmp_path, capsys):
    import anndata

    out = tmp_path / "demo.h5ad"
    rc = main(["predict", "@demo", "--checkpoint", HER2ST, "--genes", "erbb2,KRT19", "--device", "cpu",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and "wrote 187 spots x 2 genes" in captured.out and "another species" not in captured.err
    ad = anndata.read_h5ad(out)
    prov = ad.uns["comtip"]
    assert list(ad.var_names) == ["ERBB2", "KRT19"]  # symbols match case-insensitively
    assert prov["checkpoint_name"] == HER2ST and prov["checkpoint"] == str(default_checkpoint_path())
    assert prov["checkpoint_digest"] == checkpoint_digest(default_checkpoint_path())


def test_cli_evaluate_and_a_cohort_take_a_bundled_name(tmp_path, capsys):
    assert main(["evaluate", "--data", "@demo", "--checkpoint", HER2ST, "--device", "cpu", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["checkpoint"] == str(default_checkpoint_path()) and metrics["n_genes"] > 1000
    assert metrics["pcc_hvg50"] > 0.1  # @demo is (a crop of) one of its training sections
    out = tmp_path / "cohort"
    assert main(["predict", "@demo", "--checkpoint", MOUSE, "--genes", "Mbp", "--device", "cpu",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    import anndata

    (h5,) = out.glob("*.h5ad")
    assert anndata.read_h5ad(h5).uns["comtip"]["checkpoint_name"] == MOUSE


def test_cli_unknown_checkpoint_name_lists_the_names(tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    rc = main(["predict", "@demo", "--checkpoint", "comtip-tiny-brain", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and not list(tmp_path.iterdir())
    assert err.count("\n") == 0 and err.startswith("error: comtip-tiny-brain: checkpoint not found")
    assert HER2ST in err and MOUSE in err and "path" in err


@pytest.mark.parametrize("checkpoint, gene, words", [
    (MOUSE, "ERBB2", ["not in the gene panel of comtip-tiny-mouse-brain (1237 mouse genes)",
                      "the bundled checkpoint comtip-tiny-her2st (human) has it as ERBB2",
                      "--checkpoint comtip-tiny-her2st"]),
    (HER2ST, "Mbp", ["not in the gene panel of comtip-tiny-her2st (1238 human genes)",
                     "comtip-tiny-mouse-brain (mouse) has it as Mbp", "--checkpoint comtip-tiny-mouse-brain"]),
    (HER2ST, "Gfap", ["not in the gene panel of comtip-tiny-her2st (1238 human genes)", "without --genes"]),
])
def test_cli_gene_of_another_panel_names_the_fix(tmp_path, capsys, checkpoint, gene, words):
    out = tmp_path / "x.h5ad"
    rc = main(["predict", "@demo", "--checkpoint", checkpoint, "--genes", gene, "--device", "cpu", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    # one error line, after at most the species warning (shown once per process, so the test does
    # not depend on which test ran first)
    assert rc == 2 and not out.exists() and lines[-1].startswith("error: ") and "Traceback" not in "".join(lines)
    assert all(x.startswith("warning: ") for x in lines[:-1]), lines
    err = lines[-1]
    for w in words:
        assert w in err, (w, err)


def test_cli_a_pickled_object_is_refused_in_one_line(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "napari-comtip-checkpoint", "obj": _NotAllowed()}, evil)
    rc = main(["predict", "@demo", "--checkpoint", str(evil), "--device", "cpu", "--out", str(tmp_path / "x.h5ad")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "pickled Python objects" in err and "evil.pt" in err


class _NotAllowed:
    pass


def test_engine_resolve_genes_without_a_path_stays_generic():
    from napari_comtip.engine.predict_inputs import resolve_genes

    with pytest.raises(InputError) as info:
        resolve_genes(["ERBB2"], ["A", "B"], "x.pt")
    assert "not in the gene panel of x.pt (2 genes). run" in str(info.value) and "has it as" not in str(info.value)
    with pytest.raises(InputError, match="close matches: Erbb2b"):  # close matches are spelt as in the panel
        resolve_genes(["ERBB2X"], ["Erbb2b", "Zzz"], "x.pt")
