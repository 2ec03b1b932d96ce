"""Reliability regression table: each bad input gives its exit code and one line, no traceback.

Each row: the command, the expected exit status, a pattern the last stderr line must match.
Every row checks too that no traceback is printed, the inputs are unchanged and no output or
temp file is left behind. Real data is copied to ``tmp_path`` first (never written in shared/).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_comtip.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "training" / "configs" / "tiny.yaml"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def work(tmp_path, her2st_dir):
    """A copy of her2st section C2 (spots, counts, image) and an empty output folder."""
    data = tmp_path / "data"
    for sub, name in (("ST-cnts", "C2.tsv.gz"), ("ST-spotfiles", "C2_selection.tsv")):
        (data / sub).mkdir(parents=True)
        shutil.copy(her2st_dir / sub / name, data / sub / name)
    img = next((her2st_dir / "ST-imgs" / "C" / "C2").iterdir())
    (data / "ST-imgs" / "C" / "C2").mkdir(parents=True)
    shutil.copy(img, data / "ST-imgs" / "C" / "C2" / img.name)
    out = tmp_path / "out"
    out.mkdir()
    bad = tmp_path / "cfg"
    bad.mkdir()
    (bad / "neg_lr.yaml").write_text("preset: tiny\ntraining:\n  lr: -1\n")
    return {"data": data, "out": out, "cfg": bad}


PRETRAIN = ["pretrain", "--config", "{tiny}", "--data", "{data}", "--sample", "C2", "--out", "{out}/run"]

#: (id, argv, exit status, pattern of the one stderr line)
ROWS = [
    ("batch-size-negative", PRETRAIN + ["--set", "training.batch_size=-8"], 2,
     r"^error: --set: config key 'training\.batch_size' must be >= 2, got -8"),
    ("batch-size-zero", PRETRAIN + ["--set", "training.batch_size=0"], 2, r"training\.batch_size' must be >= 2"),
    ("lr-negative", PRETRAIN + ["--set", "training.lr=-1"], 2, r"^error: --set: config key 'training\.lr' must be > 0"),
    ("lr-negative-in-file", ["pretrain", "--config", "{cfg}/neg_lr.yaml", "--data", "{data}", "--out", "{out}/run"], 2,
     r"^error: .*neg_lr\.yaml: config key 'training\.lr' must be > 0"),
    ("mask-ratio", PRETRAIN + ["--set", "model.mask_ratio=1.5"], 2, r"config key 'model\.mask_ratio' must be in \(0, 1\)"),
    ("text-depth", PRETRAIN + ["--set", "model.text.depth=0"], 2, r"config key 'model\.text\.depth' must be >= 1"),
    ("type-from-set", PRETRAIN + ["--set", "training.epochs=abc"], 2, r"^error: --set: config key 'training\.epochs' has an invalid value"),
    ("epochs-option", PRETRAIN + ["--epochs", "0"], 2, r"argument --epochs: must be >= 1, got 0"),
    ("predict-batch-size-0", ["predict", "{data}", "--sample", "C2", "--batch-size", "0", "--out", "{out}/p.h5ad"], 2,
     r"argument --batch-size: must be >= 1, got 0"),
    ("predict-mpp-negative", ["predict", "{data}", "--sample", "C2", "--mpp", "-1", "--out", "{out}/p.h5ad"], 2,
     r"argument --mpp: must be a finite number > 0"),
    ("inspect-pitch-nan", ["inspect", "{data}", "--sample", "C2", "--pitch-um", "nan"], 2,
     r"argument --pitch-um: must be a finite number > 0"),
    ("evaluate-batch-size", ["evaluate", "--data", "{data}", "--sample", "C2", "--batch-size", "-3"], 2,
     r"argument --batch-size: must be >= 1"),
]


def _assert_one_line_failure(err: str, code, status: int, pattern: str) -> None:
    """The exit status, no traceback, and the last stderr line matching ``pattern``."""
    assert code == status, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.search(pattern, last), last


@pytest.mark.parametrize("argv,status,pattern", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(work, capsys, argv, status, pattern):
    subst = {"tiny": str(TINY_YAML), **{k: str(v) for k, v in work.items()}}
    argv = [a.format(**subst) for a in argv]
    before = _digest(work["data"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses an option
        code = exc.code
    _assert_one_line_failure(capsys.readouterr().err, code, status, pattern)
    assert _digest(work["data"]) == before, "an input changed"
    assert list(work["out"].iterdir()) == [], "output or temp left behind"


def test_internal_error_is_one_line_with_a_log(monkeypatch, capsys, tmp_path):
    """A bug prints one line naming a log with the traceback (exit 1); with COMTIP_RAISE the test sees it."""
    import napari_comtip.cli as cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli._COMMANDS, "inspect", (cli._COMMANDS["inspect"][0], boom))
    with pytest.raises(ZeroDivisionError):
        cli.main(["inspect", str(tmp_path)])
    monkeypatch.delenv("COMTIP_RAISE", raising=False)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("internal error: ZeroDivisionError: division by zero; details in ")
    log = Path(err[0].rsplit("details in ", 1)[1])
    assert "Traceback" in log.read_text() and "boom" in log.read_text()


def test_os_error_is_one_line(monkeypatch, capsys, tmp_path):
    import errno

    import napari_comtip.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.h5ad"))

    monkeypatch.setitem(cli._COMMANDS, "inspect", (cli._COMMANDS["inspect"][0], full))
    assert cli.main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"^error: .*x\.h5ad: No space left on device\.", err[0])


# --------------------------------------------------------------------------- outputs, counts, --genes (issue 14 items 3-6)
# Read-only and full output folders are real tmpfs mounts (tests/_disks.py; skipped where mount
# is not permitted): {ro} is read-only, {full} has about 200 kB free.
from _disks import fill, tmpfs  # noqa: E402

OUTPUT_ROWS = [
    ("predict-read-only-out", ["predict", "{data}", "--sample", "C2", "--out", "{ro}/p.h5ad"], 2,
     r"^error: .*/ro: cannot write in the output folder \(Read-only file system\)\. choose a folder you can write"),
    ("predict-read-only-csv", ["predict", "{data}", "--sample", "C2", "--out", "{out}/p.h5ad", "--csv", "{ro}/p.csv"], 2,
     r"^error: .*/ro: cannot write in the output folder \(Read-only file system\)"),
    ("predict-full-disk", ["predict", "{data}", "--sample", "C2", "--out", "{full}/p.h5ad", "--csv", "{full}/p.csv"], 2,
     r"^error: .*/full: not enough free space in the output folder: 1\.0 MB needed, \d+\.\d KB free"),
    ("cohort-read-only", ["predict", "{data}", "--out", "{ro}/cohort"], 2,
     r"^error: .*/ro/cohort: cannot create the output folder \(Read-only file system\)"),
    ("pretrain-read-only-run", PRETRAIN[:-1] + ["{ro}/run"], 2,
     r"^error: .*/ro: cannot write in the run folder \(Read-only file system\)"),
    ("pretrain-full-disk", PRETRAIN[:-1] + ["{full}/run"], 2, r"^error: .*/full: not enough free space in the run folder"),
    ("benchmark-read-only", ["benchmark-loso", "--data", "{data}", "--out", "{ro}/bench"], 2,
     r"^error: .*/ro: cannot write in the benchmark folder \(Read-only file system\)"),
    ("evaluate-unknown-gene", ["evaluate", "--data", "{data}", "--sample", "C2", "--genes", "NOPE1"], 2,
     r"^error: .*NOPE1"),
    ("legacy-st-non-integer-counts", ["inspect", "{nonint}", "--sample", "C2"], 0,
     r"^warning: .*C2\.tsv\.gz: the count table holds 1 non-integer count\(s\) \(e\.g\. 2\.5\); they are used as given"),
]


@pytest.fixture()
def nonint(tmp_path, work):
    """The C2 copy with one count of 2.5 (legacy ST table)."""
    import pandas as pd

    root = tmp_path / "nonint"
    shutil.copytree(work["data"], root)
    p = root / "ST-cnts" / "C2.tsv.gz"
    df = pd.read_csv(p, sep="\t", index_col=0).astype("float64")
    df.iloc[0, 2] = 2.5
    df.to_csv(p, sep="\t")
    return root


@pytest.mark.parametrize("argv,status,pattern", [r[1:] for r in OUTPUT_ROWS], ids=[r[0] for r in OUTPUT_ROWS])
def test_bad_output_or_count(work, tmp_path, request, capsys, argv, status, pattern):
    import contextlib
    import sys
    import warnings

    subst = {"tiny": str(TINY_YAML), **{k: str(v) for k, v in work.items()}}
    with contextlib.ExitStack() as stack:
        if any("{ro}" in a for a in argv):
            subst["ro"] = str(stack.enter_context(tmpfs(tmp_path / "ro", "1m", readonly=True)))
        if any("{full}" in a for a in argv):
            full = stack.enter_context(tmpfs(tmp_path / "full", "4m"))
            fill(full, 200_000)
            subst["full"] = str(full)
        if any("{nonint}" in a for a in argv):
            subst["nonint"] = str(request.getfixturevalue("nonint"))
        args = [a.format(**subst) for a in argv]
        watched = [Path(subst[k]) for k in ("data", "nonint") if k in subst]
        before = [_digest(d) for d in watched]
        with warnings.catch_warnings():  # show warnings on stderr as the CLI does (pytest records them)
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(m, c, f, n, line))
            try:
                code = main(args)
            except SystemExit as exc:
                code = exc.code
        _assert_one_line_failure(capsys.readouterr().err, code, status, pattern)
        assert [_digest(d) for d in watched] == before, "an input changed"
        assert list(work["out"].iterdir()) == [], "output or temp left behind"
        for k in ("ro", "full"):
            if k in subst:
                assert sorted(p.name for p in Path(subst[k]).iterdir()) == (["filler.bin"] if k == "full" else []), \
                    f"output or temp left behind in {k}"


def test_ctrl_c_while_writing_the_csv_leaves_neither_file(work, monkeypatch, capsys):
    """`predict --csv`: Ctrl-C during the CSV write (injected there on purpose) leaves no .h5ad, no temp; exit 130."""
    from napari_comtip.io import export_csv

    def interrupted(adata, path):
        Path(path).write_text("# half\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_csv, "write_prediction_csv", interrupted)
    monkeypatch.delenv("COMTIP_RAISE", raising=False)
    before = _digest(work["data"])
    code = main(["predict", str(work["data"]), "--sample", "C2", "--out", str(work["out"] / "p.h5ad"),
                 "--csv", str(work["out"] / "p.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1] == "interrupted"
    assert list(work["out"].iterdir()) == [] and _digest(work["data"]) == before


def test_duplicated_gene_column_is_summed_not_renamed(work, tmp_path, capsys):
    """A legacy-ST table naming a gene twice: one gene, the counts summed (the rule of every reader)."""
    import pandas as pd

    root = tmp_path / "dup"
    shutil.copytree(work["data"], root)
    p = root / "ST-cnts" / "C2.tsv.gz"
    df = pd.read_csv(p, sep="\t", index_col=0)
    a, b = df.columns[1], df.columns[2]
    df = df.rename(columns={b: a})
    df.to_csv(p, sep="\t")
    from napari_comtip.io import load_sample

    s = load_sample(root, sample="C2")
    var = s.expression.var
    assert f"{a}.1" not in var.index and list(var.index).count(a) == 1
    assert var.loc[a, "n_features"] == 2 and s.provenance["duplicate_symbols"] == 1
    raw = pd.read_csv(work["data"] / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)
    col = list(s.expression.var_names).index(a)
    want = (raw[a] + raw[b]).loc[s.spot_ids].to_numpy()
    np.testing.assert_array_equal(np.asarray(s.expression.layers["counts"][:, col].todense()).ravel(), want)
    assert main(["inspect", str(root), "--sample", "C2", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["n_genes"] == raw.shape[1] - 1


# --------------------------------------------------------------------------- damaged slides (issue 14, item 2)
# A separate block (its own fixture and rows) so that other rows can be added above without conflicts.
@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    from _damaged_slides import make_damaged_slides

    return make_damaged_slides(tmp_path_factory.mktemp("slides"))


_TRUNCATED = r"^error: .*truncated\.ome\.tif: the slide is truncated: tile \(\d+, \d+\) \(row, col\) of level 0 ends at byte"
_UNDECODABLE = r"^error: .*corrupt\.ome\.tif: cannot decode tile \(2, 3\) \(row, col\) of level 0 \(Jpeg8Error"

#: (id, argv, exit status, pattern of the one stderr line); {truncated}/{corrupt}: the damaged slides
SLIDE_ROWS = [
    ("inspect-truncated-tiff", ["inspect", "{truncated}"], 2, _TRUNCATED),
    ("predict-truncated-tiff", ["predict", "{truncated}", "--device", "cpu", "--out", "{out}/p.h5ad"], 2, _TRUNCATED),
    ("predict-slide-truncated-tiff", ["predict", "{data}", "--sample", "C2", "--slide", "{truncated}", "--device", "cpu",
                                      "--out", "{out}/p.h5ad"], 2, _TRUNCATED),
    ("evaluate-slide-truncated-tiff", ["evaluate", "--data", "{truncated}", "--device", "cpu"], 2, _TRUNCATED),
    ("inspect-undecodable-tile", ["inspect", "{corrupt}"], 2, _UNDECODABLE),
    ("predict-undecodable-tile", ["predict", "{corrupt}", "--device", "cpu", "--out", "{out}/p.h5ad"], 2, _UNDECODABLE),
]


@pytest.mark.parametrize("argv,status,pattern", [r[1:] for r in SLIDE_ROWS], ids=[r[0] for r in SLIDE_ROWS])
def test_damaged_slide(work, damaged, capsys, argv, status, pattern):
    subst = {k: str(v) for k, v in {**work, **damaged}.items()}
    argv = [a.format(**subst) for a in argv]
    before = _digest(work["data"]), {k: p.read_bytes() for k, p in damaged.items()}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err and "Task was destroyed" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert (_digest(work["data"]), {k: p.read_bytes() for k, p in damaged.items()}) == before, "an input changed"
    assert list(work["out"].iterdir()) == [], "output or temp left behind"


def test_decode_error_while_reading_names_file_level_and_tile(damaged):
    """The up-front checks pass (structure intact, the probed tiles decode); the bad tile fails
    when it is read: through the engine's tile cache, a plain window, and napari's view."""
    import warnings

    import numpy as np

    from napari_comtip.errors import InputError
    from napari_comtip.io.patches import read_patch
    from napari_comtip.io.slide import open_image
    from napari_comtip.io.tiles import TileCachedImage

    image, _ = open_image(damaged["corrupt"])  # the structural check and the probe pass
    th, tw = 256, 256
    centre = ((2 + 0.5) * th, (3 + 0.5) * tw)  # the middle of the bad tile, full resolution
    view = TileCachedImage(image)
    with pytest.raises(InputError, match=r"corrupt\.ome\.tif: cannot decode tile \(2, 3\) \(row, col\) of level 0"):
        read_patch(view, centre, 64.0, 64)  # the engine's reading path (pread + tifffile, no zarr)
    view.close()
    read_patch(TileCachedImage(image), (100.0, 100.0), 64.0, 64)  # other tiles read fine
    with pytest.raises(InputError, match=r"cannot decode tile \(2, 3\) \(row, col\) of level 0"):
        image.read_level_window(0, 0, 0, 1024, 1024)  # a window over the bad tile (zarr path)
    shown = image.as_dask()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block = np.asarray(shown[0:1024, 0:1024])  # what napari reads: the view stays usable
    assert block.shape == (1024, 1024, 3) and (block[2 * th:3 * th, 3 * tw:4 * tw] == 255).all()
    good = open_image(damaged["full"])[0].read_level_window(0, 0, 0, 1024, 1024)
    good[2 * th:3 * th, 3 * tw:4 * tw] = 255
    np.testing.assert_array_equal(block, good, err_msg="every other tile is shown as it is")
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]  # not a stray ResourceWarning
    assert len(msgs) == 1 and "cannot decode tile (2, 3)" in msgs[0] and "corrupt.ome.tif" in msgs[0], msgs
