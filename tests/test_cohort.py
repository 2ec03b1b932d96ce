"""Cohort prediction (``comtip predict`` over many samples): manifest checks, resume, isolation."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest

from napari_comtip.cli import main
from napari_comtip.constants import Cohort
from napari_comtip.engine.cohort import predict_cohort, read_summary, shard
from napari_comtip.errors import InputError
from napari_comtip.io.manifest import CohortItem, check_items, expand_paths, read_manifest

SHARED_DATA = Path(os.environ.get("COMTIP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

HER2ST = SHARED_DATA / "her2st"
pytestmark = pytest.mark.skipif(not HER2ST.is_dir(), reason=f"real data not found at {SHARED_DATA}")


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- manifest / bad input
def test_manifest_rows_resolve_relative_paths(tmp_path):
    (tmp_path / "data").symlink_to(HER2ST)
    m = _write(tmp_path / "m.csv", "path,sample,mpp,out\ndata,C2,,c2.h5ad\ndata,C3,0.7,\n")
    items = read_manifest(m, tmp_path / "out")
    assert [it.sample for it in items] == ["C2", "C3"]
    assert items[0].out == str(tmp_path / "out" / "c2.h5ad") and items[1].out == str(tmp_path / "out" / "C3.h5ad")
    assert items[0].mpp is None and items[1].mpp == 0.7
    assert items[0].path == str(tmp_path / "data")


@pytest.mark.parametrize("text, match", [
    ("sample,out\nC2,a.h5ad\n", "no 'path' column"),
    ("path,sample,colour\nx,C2,red\n", "unknown manifest column 'colour'"),
    ("path,sample\n", "lists no samples"),
    ("path,sample\n/no/such/place,C2\n", "row 2: path '/no/such/place' does not exist"),
    (f"path,sample,mpp\n{HER2ST},C2,fast\n", "row 2: column 'mpp' is 'fast'"),
    (f"path,sample,out\n{HER2ST},C2,c2.tif\n", "row 2: out 'c2.tif' is not an .h5ad"),
])
def test_manifest_errors_name_the_row(tmp_path, text, match):
    m = _write(tmp_path / "m.csv", text)
    with pytest.raises(InputError, match=match):
        read_manifest(m, tmp_path / "out")


def test_two_rows_writing_one_output_are_refused(tmp_path):
    m = _write(tmp_path / "m.csv", f"path,sample,out\n{HER2ST},C2,x.h5ad\n{HER2ST},C3,x.h5ad\n")
    with pytest.raises(InputError, match="m.csv row 3 and m.csv row 2 both write x.h5ad"):
        check_items(read_manifest(m, tmp_path / "out"), tmp_path / "out")


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    f = _write(tmp_path / "file", "x")
    with pytest.raises(InputError, match="the output folder is a file"):
        check_items([CohortItem(path=str(HER2ST), out=str(f / "C2.h5ad"), sample="C2")], f)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable|cannot create|cannot write"):
            check_items([CohortItem(path=str(HER2ST), out=str(ro / "C2.h5ad"), sample="C2")], ro)
    finally:
        ro.chmod(0o700)


def test_expand_paths_one_item_per_sample_and_folders(tmp_path):
    items = expand_paths([HER2ST], tmp_path)
    assert [(it.sample, Path(it.out).name) for it in items] == [(s, f"{s}.h5ad") for s in ("B4", "C2", "C3", "C4")]
    folder = tmp_path / "cohort"
    folder.mkdir()
    (folder / "A1").symlink_to(SHARED_DATA / "visium_mouse_brain" / "A1")
    (folder / "B1").symlink_to(SHARED_DATA / "visium_mouse_brain" / "B1")
    (folder / "notes.txt").write_text("not a slide")
    names = [it.name for it in expand_paths([folder], tmp_path)]
    assert len(names) == 2 and len(set(names)) == 2
    with pytest.raises(InputError, match="no slides or data sets"):
        expand_paths([_empty(tmp_path)], tmp_path)


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_shard_is_deterministic_round_robin(tmp_path):
    items = [CohortItem(path="p", out=str(tmp_path / f"{c}.h5ad")) for c in "dacb"]
    parts = [shard(items, r, 2) for r in range(2)]
    assert [[it.name for it in p] for p in parts] == [["a", "c"], ["b", "d"]]
    assert shard(list(reversed(items)), 1, 2) == parts[1]


def test_cli_refuses_a_cohort_into_one_file(tmp_path, capsys):
    assert main(["predict", "@demo", str(HER2ST), "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "give an output folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- run, isolation, resume
def test_cohort_isolates_a_corrupt_slide_and_resumes(tmp_path, capsys):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    m = _write(tmp_path / "m.csv", f"path,sample,out\n@demo,,demo.h5ad\n{bad},,corrupt.h5ad\n")
    out = tmp_path / "out"
    rc = main(["predict", "--manifest", str(m), "--out", str(out), "--device", "cpu", "--mode", "probe"])
    assert rc == 1  # one failed: non-zero at the end, after the other finished
    rows = {r["sample"]: r for r in read_summary(out / Cohort.SUMMARY)}
    assert rows["demo"]["status"] == Cohort.OK and int(rows["demo"]["spots"]) > 0
    err = rows["corrupt"]["error"]
    assert rows["corrupt"]["status"] == Cohort.FAILED and err and "\n" not in err
    assert "failed: corrupt" in capsys.readouterr().err
    first = anndata.read_h5ad(out / "demo.h5ad")

    # the same as one-sample `comtip predict`
    single = tmp_path / "single.h5ad"
    assert main(["predict", "@demo", "--out", str(single), "--device", "cpu", "--mode", "probe"]) == 0
    assert np.array_equal(anndata.read_h5ad(single).X, first.X)

    # a rerun skips what matches; another predictor redoes it; --overwrite forces
    mtime = (out / "demo.h5ad").stat().st_mtime_ns
    ok = _write(tmp_path / "ok.csv", "path,out\n@demo,demo.h5ad\n")
    assert main(["predict", "--manifest", str(ok), "--out", str(out), "--device", "cpu", "--mode", "probe"]) == 0
    assert read_summary(out / Cohort.SUMMARY)[0]["status"] == Cohort.SKIPPED
    assert (out / "demo.h5ad").stat().st_mtime_ns == mtime
    assert main(["predict", "--manifest", str(ok), "--out", str(out), "--device", "cpu", "--mode", "retrieval",
                 "--genes", "ERBB2,GNAS"]) == 0
    redone = anndata.read_h5ad(out / "demo.h5ad")
    assert redone.uns["comtip"]["predictor"] == "retrieval" and list(redone.var_names) == ["ERBB2", "GNAS"]
    res = predict_cohort(read_manifest(ok, out), out, device="cpu", mode="retrieval", genes=["ERBB2", "GNAS"],
                         overwrite=True)
    assert res.counts[Cohort.OK] == 1


def test_a_foreign_file_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo.h5ad").write_bytes(b"mine, not a prediction")
    ok = _write(tmp_path / "ok.csv", "path,out\n@demo,demo.h5ad\n")
    res = predict_cohort(read_manifest(ok, out), out, device="cpu", mode="zero-shot", genes=["ERBB2"])
    assert res.rows[0]["status"] == Cohort.FAILED and "--overwrite" in res.rows[0]["error"]
    assert (out / "demo.h5ad").read_bytes() == b"mine, not a prediction"


def test_cancel_keeps_pending_rows(tmp_path):
    items = expand_paths(["@demo"], tmp_path / "out")
    res = predict_cohort(items, tmp_path / "out", device="cpu", cancel=lambda: True)
    assert res.cancelled and [r["status"] for r in res.rows] == [Cohort.PENDING]
    assert read_summary(res.summary)[0]["status"] == Cohort.PENDING


# --------------------------------------------------------------------------- torchrun, kill and resume
def _torchrun() -> str | None:
    import sys

    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_equal_one_and_a_killed_run_resumes(tmp_path):
    """3 real her2st sections: torchrun with 2 CPU processes (gloo) writes what 1 process writes."""
    import subprocess
    import sys
    import time

    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun not installed")
    m = _write(tmp_path / "m.csv", "".join(["path,sample\n"] + [f"{HER2ST},{s}\n" for s in ("C2", "C3", "C4")]))
    args = ["-m", "napari_comtip", "predict", "--manifest", str(m), "--device", "cpu", "--mode", "probe"]

    def env(cache: str) -> dict:  # separate caches: no run reads another's embeddings
        return dict(os.environ, OMP_NUM_THREADS="1", NAPARI_COMTIP_CACHE=str(tmp_path / cache),
                    PYTHONPATH=os.pathsep.join(sys.path))

    one, two = tmp_path / "one", tmp_path / "two"
    # 1 process, killed (SIGKILL) once its first sample is written
    proc = subprocess.Popen([sys.executable, *args, "--out", str(one)], env=env("c1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    def outputs() -> list[str]:
        return sorted(p.name for p in one.glob("*.h5ad") if not p.name.startswith("."))

    while not outputs() and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    written = outputs()
    assert written and len(written) < 3, "the run finished before it could be killed"
    # resume: what was written is skipped, the rest is predicted
    r = subprocess.run([sys.executable, *args, "--out", str(one)], env=env("c1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    status = {row["sample"] + ".h5ad": row["status"] for row in read_summary(one / Cohort.SUMMARY)}
    assert all(status[w] == Cohort.SKIPPED for w in written)
    assert sorted(status) == ["C2.h5ad", "C3.h5ad", "C4.h5ad"]
    assert not list(one.glob(".*.tmp*")), "the rerun removes the temp files the killed run left"
    assert all(v == Cohort.OK for k, v in status.items() if k not in written)

    # 2 processes
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *args, "--out", str(two)],
                       env=env("c2"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_summary(two / Cohort.SUMMARY)
    assert [row["status"] for row in rows] == [Cohort.OK] * 3
    assert sorted(row["rank"] for row in rows) == ["0", "0", "1"]
    assert not list(two.glob(".summary.rank-*"))
    for s in ("C2", "C3", "C4"):
        a, b = anndata.read_h5ad(one / f"{s}.h5ad"), anndata.read_h5ad(two / f"{s}.h5ad")
        assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
        assert np.array_equal(a.X, b.X)
        assert np.array_equal(a.obsm["spatial"], b.obsm["spatial"])
