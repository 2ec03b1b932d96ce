"""The reader registry (``io.READERS``): one table of formats that detect_format, list_samples and
load_sample walk, on the real data sets."""

from __future__ import annotations

import pytest

from napari_comtip.errors import InputError
from napari_comtip.io import READERS, detect_format, list_samples, load_sample


def test_one_table_of_formats():
    assert {r.format for r in READERS} == {"legacy-st", "visium", "hest", "h5ad", "bare"}
    for r in READERS:
        assert callable(r.matches) and callable(r.list_samples) and callable(r.read) and r.expects


def test_the_table_detects_lists_and_reads_real_data(her2st_dir, visium_tiny_dir, tmp_path):
    assert detect_format(her2st_dir) == "legacy-st"
    assert list_samples(her2st_dir) == ["B4", "C2", "C3", "C4"]
    assert detect_format(visium_tiny_dir) == "visium"
    h5 = visium_tiny_dir / "filtered_feature_bc_matrix.h5"
    assert detect_format(h5) == "visium" and list_samples(h5) == list_samples(visium_tiny_dir)
    s = load_sample(h5)  # the matrix file stands for its run
    assert s.format == "visium" and s.n_spots > 0
    assert list_samples("@demo") == ["C2"]


def test_no_format_fits_names_every_folder_format(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a recognised data folder") as err:
        detect_format(tmp_path / "empty")
    for r in READERS:
        if r.folder:
            assert r.expects in str(err.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported file type '.txt'"):
        load_sample(tmp_path / "notes.txt")
