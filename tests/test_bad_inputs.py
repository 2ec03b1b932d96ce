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


@pytest.mark.parametrize("argv,status,pattern", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(work, capsys, argv, status, pattern):
    subst = {"tiny": str(TINY_YAML), **{k: str(v) for k, v in work.items()}}
    argv = [a.format(**subst) for a in argv]
    before = _digest(work["data"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses an option
        code = exc.code
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.search(pattern, last), last
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
