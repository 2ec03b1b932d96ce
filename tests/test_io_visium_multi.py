"""A folder of several Space Ranger runs (the real visium_mouse_brain), and the duplicated-symbol rule."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from napari_comtip.cli import main
from napari_comtip.constants import Key
from napari_comtip.errors import InputError
from napari_comtip.io import bundled_sample_path, detect_format, list_samples, load_sample
from napari_comtip.io.expression import collapse_duplicate_genes, read_10x_h5, symbols_for


@pytest.fixture(scope="module")
def brain(shared_data):
    return shared_data / "visium_mouse_brain"


@pytest.fixture(scope="module")
def b1(brain):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning (anndata's "not unique" etc.) reaches the user
        return load_sample(brain, sample="B1")


def test_parent_folder_is_a_multi_sample_visium_dataset(brain):
    assert detect_format(brain) == "visium"
    assert list_samples(brain) == ["A1", "B1"]
    assert list_samples(brain / "A1") == ["A1"]
    with pytest.raises(InputError, match=r"holds 2 Visium runs \(A1, B1\).*--sample"):
        load_sample(brain)
    with pytest.raises(InputError, match=r"unknown sample 'C1'.*available samples: A1, B1"):
        load_sample(brain, sample="C1")


def test_b1_numbers_and_hires_only_scale(b1, brain):
    sf = json.loads((brain / "B1" / "spatial" / "scalefactors_json.json").read_text())
    assert (b1.name, b1.format, b1.n_spots) == ("B1", "visium", 2554)  # the data README's count
    assert b1.image.level_shapes[0][:2] == (1937, 2000)  # the hires PNG is the finest level
    assert b1.image.downsamples[0] == pytest.approx(1 / sf["tissue_hires_scalef"])
    assert b1.mpp == pytest.approx(65.0 / sf["spot_diameter_fullres"])
    # spot_diameter_fullres (15.5 hires px) spans 10x's 65 um spot; the 55 um spot drawn is 13.1 hires px
    # (the data README's "about 15" took spot_diameter_fullres for 55 um; the 100 um pitch says 65)
    assert b1.spots[Key.DIAMETER].iloc[0] * sf["tissue_hires_scalef"] == pytest.approx(15.5 * 55 / 65, abs=0.2)


def test_spots_fall_on_the_tissue_not_the_glass(b1, brain):
    """Orientation and scale at hires-only resolution: the spots land on tissue, and no flip,
    transpose or factor-2 error of the scale does as well (B1's measured fractions: 0.77 against
    at most 0.66)."""
    sf = json.loads((brain / "B1" / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    img = np.asarray(Image.open(brain / "B1" / "spatial" / "tissue_hires_image.png").convert("RGB"), float).mean(2)
    h, w = img.shape
    r = np.rint(b1.spots[Key.ROW].to_numpy() * sf).astype(int)
    c = np.rint(b1.spots[Key.COL].to_numpy() * sf).astype(int)
    dark = np.median(img[:40, :40]) - 40  # clearly darker than the glass in the corner

    def on_tissue(rr, cc):
        return float((img[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)] < dark).mean())

    right = on_tissue(r, c)
    assert right > 0.7
    for wrong in (on_tissue(c, r), on_tissue(h - 1 - r, c), on_tissue(r, w - 1 - c), on_tissue(r * 2, c * 2),
                  on_tissue(r // 2, c // 2)):
        assert right > wrong + 0.08


def test_duplicated_symbols_are_summed_with_their_feature_ids(b1, brain):
    X, barcodes, names, ids = read_10x_h5(brain / "B1" / "filtered_feature_bc_matrix.h5")
    var = b1.expression.var
    assert var.index.is_unique and b1.n_genes == len(set(names)) == 31017
    assert int((var[Key.N_FEATURES] > 1).sum()) == b1.provenance["duplicate_symbols"] == 35
    cols = [j for j, n in enumerate(names) if n == "Gm16701"]
    assert len(cols) == 2
    assert var.loc["Gm16701", Key.GENE_IDS] == ";".join(ids[j] for j in cols)
    rows = pd.Index(barcodes).get_indexer(b1.expression.obs_names)
    expect = np.asarray(X[rows][:, cols].sum(axis=1)).ravel()
    got = b1.expression[:, "Gm16701"].layers[Key.COUNTS].toarray().ravel()
    np.testing.assert_array_equal(got, expect)
    assert var.loc["Gfap", Key.N_FEATURES] == 1 and var.loc["Gfap", Key.GENE_IDS].startswith("ENSMUSG")


def test_genes_by_symbol_or_feature_id(b1):
    var = b1.expression.var
    second_id = var.loc["Gm16701", Key.GENE_IDS].split(";")[1]
    gfap_id = var.loc["Gfap", Key.GENE_IDS]
    assert symbols_for(["Gfap", gfap_id.lower(), second_id, "nope"], var) == ["Gfap", "Gfap", "Gm16701", "nope"]


def test_collapse_keeps_order_and_sums():
    X = sp.csr_matrix(np.array([[1, 2, 3, 4], [5, 0, 7, 1]], dtype=np.float32))
    Y, var = collapse_duplicate_genes(X, ["B", "A", "B", "C"], ["b1", "a", "b2", "c"])
    assert list(var.index) == ["B", "A", "C"]
    assert list(var[Key.GENE_IDS]) == ["b1;b2", "a", "c"] and list(var[Key.N_FEATURES]) == [2, 1, 1]
    np.testing.assert_array_equal(Y.toarray(), [[4, 2, 4], [12, 0, 1]])
    _, var = collapse_duplicate_genes(X, ["B", "A", "D", "C"])  # no ids: the symbol stands for itself
    assert list(var[Key.GENE_IDS]) == ["B", "A", "D", "C"]


def test_legacy_st_header_with_a_repeated_symbol(tmp_path):
    dst = tmp_path / "demo"
    shutil.copytree(bundled_sample_path(), dst)
    f = next((dst / "ST-cnts").glob("*.tsv.gz"))
    lines = gzip.open(f, "rt").read().splitlines()
    head = lines[0].split("\t")
    a, b = head[1], head[2]
    lines[0] = "\t".join([head[0], a, a, *head[3:]])
    f.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    ref = load_sample(bundled_sample_path())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_sample(dst)
    assert s.n_genes == ref.n_genes - 1 and b not in s.expression.var_names
    assert s.expression.var.loc[a, Key.N_FEATURES] == 2
    got = s.expression[:, a].layers[Key.COUNTS].toarray().ravel()
    want = (ref.expression[:, a].layers[Key.COUNTS] + ref.expression[:, b].layers[Key.COUNTS]).toarray().ravel()
    np.testing.assert_array_equal(got, want)


def test_h5ad_with_duplicated_var_names(tmp_path):
    n, rng = 30, np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2, size=(n, 4)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = anndata.AnnData(X=X, var=pd.DataFrame({"gene_ids": ["e1", "e2", "e3", "e4"]}, index=["G", "H", "G", "K"]))
    ad.obs_names = [f"s{i}" for i in range(n)]
    ad.obsm["spatial"] = np.c_[np.arange(n) * 10.0 + 20, np.full(n, 50.0)]
    img = (rng.random((100, 400, 3)) * 200).astype(np.uint8)
    ad.uns["spatial"] = {"lib": {"images": {"hires": img}, "scalefactors": {"tissue_hires_scalef": 1.0,
                                                                          "spot_diameter_fullres": 10.0}}}
    path = tmp_path / "dup.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.write_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = load_sample(path)
    assert list(s.expression.var_names) == ["G", "H", "K"]
    assert list(s.expression.var[Key.GENE_IDS]) == ["e1;e3", "e2", "e4"]
    np.testing.assert_array_equal(s.expression[:, "G"].layers[Key.COUNTS].toarray().ravel(),
                                  (X[:, 0] + X[:, 2]).toarray().ravel())


def _copy_run(brain, tmp_path, name="A1"):
    dst = tmp_path / "brain"
    (dst / name).mkdir(parents=True)
    shutil.copytree(brain / name / "spatial", dst / name / "spatial")
    (dst / name / "filtered_feature_bc_matrix.h5").symlink_to(brain / name / "filtered_feature_bc_matrix.h5")
    for p in (dst / name / "spatial").iterdir():
        p.chmod(0o644)
    return dst


def test_blank_or_missing_hires_is_one_line(brain, tmp_path, capsys):
    dst = _copy_run(brain, tmp_path)
    hires = dst / "A1" / "spatial" / "tissue_hires_image.png"
    Image.new("RGB", (2000, 1937), (255, 255, 255)).save(hires)
    assert main(["inspect", str(dst), "--sample", "A1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no usable tissue image" in err and "--slide" in err and "\n" not in err
    hires.unlink()
    assert main(["inspect", str(dst)]) == 2  # one run in the folder: no --sample needed to get there
    err = capsys.readouterr().err.strip()
    assert "no usable tissue image" in err and "Traceback" not in err


def test_inspect_lists_and_reads_the_runs(brain, capsys):
    assert main(["inspect", str(brain), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(brain), "format": "visium", "samples": ["A1", "B1"]}
    assert main(["inspect", str(brain), "--sample", "A1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["name"], info["n_spots"], info["n_genes"]) == ("A1", 2399, 31017)
    with h5py.File(brain / "A1" / "filtered_feature_bc_matrix.h5") as f:
        assert f["matrix/features/name"].shape[0] == 31053  # the file's features before the rule
