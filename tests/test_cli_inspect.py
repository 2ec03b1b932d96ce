"""``comtip inspect`` on every input format, and its one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_comtip.cli import main
from napari_comtip.io import bundled_sample_path
from test_io_h5ad_hest import _hest_folder
from test_io_image import make_blob_rgb, make_ome_tiff

KEYS = {"n_spots", "n_genes", "width", "height", "mpp", "mpp_source", "levels", "format"}


def _inspect_json(capsys, *args):
    rc = main(["inspect", *map(str, args), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    info = json.loads(out.strip().splitlines()[-1])
    assert KEYS <= set(info)
    return info


def test_inspect_demo_text_and_json(capsys):
    assert main(["inspect", "@demo"]) == 0
    out = capsys.readouterr().out
    assert "C2" in out and "legacy-st" in out and "187" in out and "spot pitch (200 um)" in out
    info = _inspect_json(capsys, "@demo")
    assert info["format"] == "legacy-st" and info["n_spots"] == 187 and info["n_genes"] > 10000
    assert info["levels"] == [[info["height"], info["width"]]]


def test_inspect_her2st(capsys, her2st_dir):
    info = _inspect_json(capsys, her2st_dir, "--sample", "B4")
    assert (info["n_spots"], info["width"], info["height"]) == (283, 9272, 9923)
    assert info["levels"][0] == [9923, 9272] and len(info["levels"]) >= 4
    assert 0.66 < info["mpp"] < 0.72 and info["mpp_source"] == "spot pitch (200 um)"


def test_inspect_visium(capsys, visium_tiny_dir):
    info = _inspect_json(capsys, visium_tiny_dir)
    assert info["format"] == "visium" and info["n_spots"] == 100 and info["n_genes"] == 100
    assert info["levels"] == [[600, 600]] and info["width"] == 13332
    assert info["mpp_source"] == "scalefactors_json.json spot_diameter_fullres"


def test_inspect_h5ad_hest_and_bare(capsys, tmp_path):
    root, xy = _hest_folder(tmp_path / "hest")
    info = _inspect_json(capsys, root)
    assert info["format"] == "hest" and info["n_spots"] == len(xy) and info["mpp"] == 0.5
    info = _inspect_json(capsys, root / "st" / "TENX99.h5ad", "--slide", root / "wsis" / "TENX99.tif", "--mpp", "0.5")
    assert info["format"] == "h5ad" and info["n_spots"] == len(xy) and info["mpp_source"] == "--mpp override"
    slide = make_ome_tiff(tmp_path / "bare.ome.tif", make_blob_rgb(1200, 1600), mpp=1.0)
    info = _inspect_json(capsys, slide, "--pitch-um", "100")
    assert info["format"] == "bare" and info["n_genes"] == 0 and info["n_spots"] > 20
    assert info["mpp"] == 1.0 and len(info["levels"]) >= 2


# --------------------------------------------------------------------------- errors
def _demo(tmp_path):
    dst = tmp_path / "her2st"
    shutil.copytree(bundled_sample_path(), dst)
    return dst


def _bad_truncated(tmp_path):
    d = _demo(tmp_path)
    img = next((d / "ST-imgs").rglob("*.jpg"))
    img.write_bytes(img.read_bytes()[:20000])
    return [d], r"5714_HE_BT_C2\.jpg.*truncated"


def _bad_no_shared(tmp_path):
    d = _demo(tmp_path)
    c = d / "ST-cnts" / "C2.tsv.gz"
    df = pd.read_csv(c, sep="\t", index_col=0).iloc[:, :50]
    df.index = [f"s{i}" for i in range(len(df))]
    c.unlink()
    df.to_csv(d / "ST-cnts" / "C2.tsv", sep="\t")
    return [d], r"C2\.tsv.*share no spot ids"


def _bad_nan(tmp_path):
    d = _demo(tmp_path)
    c = d / "ST-cnts" / "C2.tsv.gz"
    df = pd.read_csv(c, sep="\t", index_col=0).iloc[:, :50].astype(float)
    df.iloc[0, 0] = np.nan
    c.unlink()
    df.to_csv(d / "ST-cnts" / "C2.tsv", sep="\t")
    return [d], r"C2\.tsv.*NaN"


def _bad_unknown_sample(tmp_path):
    return ["@demo", "--sample", "Q1"], r"unknown sample 'Q1'.*available samples: C2"


def _bad_outside(tmp_path):
    d = _demo(tmp_path)
    sel = d / "ST-spotfiles" / "C2_selection.tsv"
    df = pd.read_csv(sel, sep="\t")
    df["pixel_x"] += 5000
    df.to_csv(sel, sep="\t", index=False)
    return [d], r"C2_selection\.tsv.*fall outside"


def _visium(tmp_path, visium_tiny_dir):
    d = tmp_path / "outs"
    shutil.copytree(visium_tiny_dir, d)
    for p in d.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


def _bad_no_scalefactors(tmp_path, vt):
    d = _visium(tmp_path, vt)
    (d / "spatial" / "scalefactors_json.json").unlink()
    return [d], r"scalefactors_json\.json: scale factors not found"


def _bad_inconsistent_scalefactors(tmp_path, vt):
    d = _visium(tmp_path, vt)
    f = d / "spatial" / "scalefactors_json.json"
    sf = json.loads(f.read_text())
    sf["tissue_lowres_scalef"] = sf["tissue_hires_scalef"]
    f.write_text(json.dumps(sf))
    return [d], r"scalefactors_json\.json: inconsistent scale factors"


def _bad_duplicated(tmp_path, vt):
    d = _visium(tmp_path, vt)
    f = d / "spatial" / "tissue_positions_list.csv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines + lines[:1]) + "\n")
    return [d], r"tissue_positions_list\.csv.*duplicated barcodes"


def _bad_path(tmp_path):
    return [tmp_path / "nope"], r"nope: path not found"


def _bad_bare_without_mpp(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(make_blob_rgb(300, 300)).save(p)
    return [p], r"x\.png.*--mpp"


@pytest.mark.parametrize("make", [_bad_truncated, _bad_no_shared, _bad_nan, _bad_unknown_sample, _bad_outside,
                                  _bad_path, _bad_bare_without_mpp])
def test_inspect_errors(capsys, tmp_path, make):
    args, pattern = make(tmp_path)
    rc = main(["inspect", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("make", [_bad_no_scalefactors, _bad_inconsistent_scalefactors, _bad_duplicated])
def test_inspect_visium_errors(capsys, tmp_path, visium_tiny_dir, make):
    args, pattern = make(tmp_path, visium_tiny_dir)
    with pytest.warns(UserWarning) if make is _bad_inconsistent_scalefactors else _nullcontext():
        rc = main(["inspect", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    import re

    assert re.search(pattern, lines[0]), lines[0]


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()
