"""Atomic writers and the cache folder."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest

from napari_comtip.constants import CACHE_ENV, Key
from napari_comtip.errors import InputError
from napari_comtip.io.cache import cache_dir, file_identity, identity_key
from napari_comtip.io.writers import write_csv_atomic, write_h5ad_atomic


def _adata(inputs=()):
    a = anndata.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2))
    a.uns[Key.PROVENANCE] = {"inputs": [str(p) for p in inputs]}
    return a


def test_h5ad_atomic_refuses_existing_then_overwrites(tmp_path):
    out = tmp_path / "pred.h5ad"
    write_h5ad_atomic(_adata(), out)
    assert anndata.read_h5ad(out).shape == (3, 2)
    with pytest.raises(InputError, match=r"pred\.h5ad.*already exists.*--overwrite"):
        write_h5ad_atomic(_adata(), out)
    a = _adata()
    a.X[0, 0] = 42
    write_h5ad_atomic(a, out, overwrite=True)
    assert anndata.read_h5ad(out).X[0, 0] == 42
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad"]  # no temp files left


def test_never_writes_over_an_input(tmp_path):
    src = tmp_path / "data.h5ad"
    _adata().write_h5ad(src)
    before = src.read_bytes()
    with pytest.raises(InputError, match="input of this result"):
        write_h5ad_atomic(_adata(inputs=[src]), src, overwrite=True)
    with pytest.raises(InputError, match="input of this result"):
        write_csv_atomic(pd.DataFrame({"a": [1]}), src, overwrite=True, protect=[src])
    assert src.read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path):
    class Boom(pd.DataFrame):
        def to_csv(self, *a, **k):
            raise RuntimeError("disk full")

    out = tmp_path / "t.csv"
    with pytest.raises(RuntimeError):
        write_csv_atomic(Boom({"a": [1]}), out)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="folder does not exist"):
        write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path / "nope" / "t.csv")


def test_csv_atomic(tmp_path):
    out = tmp_path / "t.csv"
    write_csv_atomic(pd.DataFrame({"g": [1.5, 2.5]}, index=["s1", "s2"]), out)
    assert pd.read_csv(out, index_col=0).loc["s2", "g"] == 2.5


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    d = cache_dir("pyramids")
    assert d == tmp_path / "c" / "pyramids" and d.is_dir()
    with pytest.raises(ValueError):
        cache_dir("../x")
    f = tmp_path / "f.txt"
    f.write_text("a")
    k1 = identity_key(file_identity(f))
    f.write_text("ab")
    assert identity_key(file_identity(f)) != k1
