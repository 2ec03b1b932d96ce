"""Outputs on real read-only and full file systems, the .h5ad + CSV pair as one unit, the CSV table.

The read-only and full file systems are real tmpfs mounts (tests/_disks.py; skipped where mount
is not permitted). Two tests inject a failure on purpose, each labelled: a KeyboardInterrupt
while the CSV is written (Ctrl-C cannot be typed in a test) and a failed rename.
"""

from __future__ import annotations

import errno
import hashlib
import os

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from napari_comtip.constants import Key
from napari_comtip.errors import InputError
from napari_comtip.io import export_csv, writers
from napari_comtip.io.writers import atomic_replace, check_writable, write_prediction

from _disks import fill, readonly_dir, small_disk  # noqa: F401  (fixtures)

GENES = ["ERBB2", "KRT8", "CD74"]


def _prediction(n: int = 5, uncertainty: bool = False, big: bool = False) -> anndata.AnnData:
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(2000)] if big else GENES
    X = rng.random((n, len(genes)), dtype=np.float32) * 3
    a = anndata.AnnData(X=X, obs=pd.DataFrame(index=[f"{i}x{i + 1}" for i in range(n)]),
                        var=pd.DataFrame(index=genes))
    a.obsm[Key.SPATIAL] = np.column_stack([np.arange(n) * 100.0 + 3478.0299999999997, np.arange(n) * 50.0 + 0.333])
    if uncertainty:
        a.layers[Key.UNCERTAINTY] = (X * 0.1 + 0.01).astype(np.float32)
    a.uns[Key.PROVENANCE] = {
        "predictor": "probe", "checkpoint": "/somewhere/comtip-tiny-her2st.pt",
        "checkpoint_digest": "4a1bb0b3a7bc202e" + "0" * 48, "mpp": 0.5, "mpp_source": "spot pitch (200 um), her2st",
        "sample": {"name": "C2", "format": "legacy-st", "source": "/data/her2st"},
        "created": "2026-12-03T05:00:00+00:00", "inputs": [],
    }
    return a


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the CSV table
def test_csv_says_its_units_and_provenance(tmp_path):
    a = _prediction()
    out = tmp_path / "p.csv"
    write_prediction(a, tmp_path / "p.h5ad", out)
    text = out.read_text()
    head = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert all("," not in ln for ln in head), "a comment line with a comma is split by a spreadsheet"
    joined = "\n".join(head)
    for words in ("log1p(counts / library size x 10000)", "predictor = probe",
                  "checkpoint = comtip-tiny-her2st.pt (sha256 4a1bb0b3a7bc202e)",
                  "micrometres per pixel = 0.5000 (source: spot pitch (200 um); her2st)", "napari-comtip 0.",
                  "2026-12-03T05:00:00"):
        assert words in joined, words
    assert "uncertainty" not in joined
    t = pd.read_csv(out, comment="#")
    assert list(t.columns) == ["spot_id", "x_px", "y_px", "x_um", "y_um", *GENES]
    assert t["x_px"][0] == 3478.03 and t["y_px"][0] == 0.33  # rounded, not 3478.0299999999997
    assert t["x_um"][0] == 1739.0 and t["y_um"][1] == 25.2
    assert "3478.0299" not in text
    np.testing.assert_allclose(t[GENES].to_numpy(), a.X, atol=5.1e-5)


def test_csv_uncertainty_block_after_the_genes(tmp_path):
    a = _prediction(uncertainty=True)
    t = export_csv.prediction_table(a)
    assert list(t.columns[5:]) == GENES + [f"{g}_uncertainty" for g in GENES]
    np.testing.assert_allclose(t[[f"{g}_uncertainty" for g in GENES]].to_numpy(), a.layers[Key.UNCERTAINTY], atol=5.1e-5)
    assert any("<gene>_uncertainty" in ln for ln in export_csv.provenance_lines(a))
    a.layers[Key.UNCERTAINTY] = sp.csr_matrix(a.layers[Key.UNCERTAINTY])  # sparse layers too
    assert export_csv.prediction_table(a).shape == (a.n_obs, 5 + 2 * len(GENES))


def test_csv_without_mpp_leaves_um_empty_and_says_so():
    a = _prediction()
    del a.uns[Key.PROVENANCE]["mpp"]
    t = export_csv.prediction_table(a)
    assert t["x_um"].isna().all()
    assert any("micrometres per pixel = unknown" in ln for ln in export_csv.provenance_lines(a))


# --------------------------------------------------------------------------- both or neither
def test_pair_ctrl_c_while_writing_the_csv_leaves_neither(tmp_path, monkeypatch):
    # injected on purpose: Ctrl-C arrives while the CSV is being written
    def interrupted(adata, path):
        with open(path, "w") as fh:
            fh.write("# half a table\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_csv, "write_prediction_csv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_prediction(_prediction(), tmp_path / "p.h5ad", tmp_path / "p.csv")
    assert list(tmp_path.iterdir()) == []


def test_pair_failure_keeps_the_old_pair(tmp_path, monkeypatch):
    h5, csv = tmp_path / "p.h5ad", tmp_path / "p.csv"
    write_prediction(_prediction(), h5, csv)
    before = (_sha(h5), _sha(csv))
    # injected on purpose: the second rename (the CSV's) fails after the .h5ad was replaced
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if str(dst) == str(csv) and str(src).endswith(".tmp.csv"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real(src, dst)

    monkeypatch.setattr(writers.os, "replace", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        write_prediction(_prediction(n=7), h5, csv, overwrite=True)
    monkeypatch.undo()
    assert (_sha(h5), _sha(csv)) == before, "the old pair must be restored"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.h5ad"]
    write_prediction(_prediction(n=7), h5, csv, overwrite=True)
    assert anndata.read_h5ad(h5).n_obs == 7 and len(pd.read_csv(csv, comment="#")) == 7


# --------------------------------------------------------------------------- real file systems
def test_read_only_folder_is_refused_up_front(readonly_dir):
    with pytest.raises(InputError, match=r"cannot write in the output folder \(Read-only file system\)"):
        check_writable(readonly_dir)
    with pytest.raises(InputError, match="Read-only file system"):
        check_writable(readonly_dir / "run", create=True, what="run folder")
    assert list(readonly_dir.iterdir()) == []


def test_a_folder_access_calls_writable_is_probed_for_real():
    """/sys: os.access() says yes to root, yet no file can be made there; the probe finds out."""
    if not (os.path.isdir("/sys") and os.access("/sys", os.W_OK)):
        pytest.skip("needs /sys that os.access() calls writable (root on Linux)")
    with pytest.raises(InputError, match=r"^/sys: cannot write in the output folder \("):
        check_writable("/sys")


def test_full_disk_is_refused_up_front_with_the_sizes(small_disk):
    fill(small_disk, 200_000)
    with pytest.raises(InputError, match=r"not enough free space in the output folder: .* needed, .* free"):
        write_prediction(_prediction(), small_disk / "p.h5ad", small_disk / "p.csv")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler.bin"]


def test_full_disk_during_the_h5ad_write_is_one_clean_error(small_disk):
    a = _prediction(n=600, big=True)  # ~4.8 MB of values: more than the disk holds
    items = [(small_disk / "p.h5ad", lambda tmp: a.write_h5ad(tmp), ".h5ad")]
    with pytest.raises(OSError) as info:
        writers.atomic_replace_all(items)
    exc = info.value
    assert exc.errno == errno.ENOSPC and exc.filename == str(small_disk / "p.h5ad")
    assert "\n" not in str(exc) and "No space left on device" in str(exc)
    assert list(small_disk.iterdir()) == []


def test_full_disk_torch_save_by_path_becomes_enospc(small_disk):
    """Training states are saved with torch.save(path): on a full disk torch says "unexpected pos"."""
    out = small_disk / "step-0000002.pt"
    with pytest.raises(OSError) as info:
        atomic_replace(out, lambda tmp: torch.save({"w": torch.zeros(2_000_000)}, tmp))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert list(small_disk.iterdir()) == []


def test_checkpoint_on_a_full_disk_keeps_the_last_good_one(small_disk):
    from napari_comtip.model import build_model, get_preset, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model(get_preset("micro"), GENES)
    path = small_disk / "final.pt"
    save_checkpoint(path, model, model.config, GENES)
    good = _sha(path)
    fill(small_disk, 64_000)  # less than a checkpoint: the next save cannot fit
    with pytest.raises(OSError) as info:
        save_checkpoint(path, model, model.config, GENES)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert _sha(path) == good
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler.bin", "final.pt"]
    assert load_checkpoint(path).gene_panel == GENES


@pytest.mark.slow
def test_pretrain_on_a_full_disk_keeps_the_last_good_state(tmp_path, capsys, monkeypatch):
    """The real command: a 60 MB disk holds one training state (39 MB) but not two; the second save
    fails as one line naming it, the first stays loadable, no temp is left."""
    from pathlib import Path

    from napari_comtip.cli import main

    from _disks import tmpfs

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("COMTIP_RAISE", raising=False)
    with tmpfs(tmp_path / "disk", "60m") as disk:
        code = main(["pretrain", "--config", str(repo / "training" / "configs" / "tiny.yaml"),
                     "--data", str(repo / "src" / "napari_comtip" / "sample_data" / "her2st_C2"),
                     "--out", str(disk / "run"), "--max-steps", "2", "--set", "training.checkpoint_every=1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err[-3:]
        assert err[-1].startswith(f"error: {disk / 'run' / 'checkpoints'}/step-000000") and "No space left on device" in err[-1]
        states = sorted((disk / "run" / "checkpoints").iterdir())
        assert [p.name for p in states] == ["step-0000001.pt"], states
        blob = torch.load(states[0], map_location="cpu", weights_only=True)
        assert blob["step"] == 1
