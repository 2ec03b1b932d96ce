"""Expression matrices: validation, the AnnData every reader returns, 10x matrix files.

Every reader hands its counts to :func:`make_expression`, so all samples look alike:
``X`` = raw counts (float32 CSR), ``layers[Key.COUNTS]`` = the same counts,
``layers[Key.LOGNORM]`` = ``log1p(counts / library size * Default.TARGET_SUM)``,
``obsm[Key.SPATIAL]`` = (x, y) spot centres in full-resolution pixels, ``obs`` = array coordinates,
``obs_names`` = spot ids (== ``SpatialSample.spots.index``), ``var_names`` = gene names.

Duplicated gene symbols (one rule for every reader, :func:`collapse_duplicate_genes`): the
features that share a symbol are **summed into one gene under that symbol**; ``var[Key.GENE_IDS]``
keeps their feature ids joined by ``;`` (first-seen order) and ``var[Key.N_FEATURES]`` how many
were summed. So ``var_names`` are unique, no library warning is raised, and :func:`symbols_for`
lets a user name a gene by symbol or by any of its feature ids.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..constants import Default, Key
from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata


def validate_counts(matrix, path: str | os.PathLike | None = None) -> None:
    """Raise :class:`InputError` when a count matrix holds NaN/inf or negative values."""
    data = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if data.size == 0:
        return
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(f"the count matrix holds {int(bad.sum())} NaN or infinite values", path=path,
                             hint="counts must be finite non-negative numbers; fix or re-export the matrix")
    if data.dtype.kind in "fi" and (data < 0).any():
        n = int((data < 0).sum())
        raise InputError(f"the count matrix holds {n} negative values", path=path,
                         hint="give raw (non-negative) counts, not scaled or centred values")


def warn_non_integer(matrix, path: str | os.PathLike | None, source: str, provenance: dict | None = None) -> str | None:
    """The non-integer rule (every reader): such counts are used as given, with one warning line.

    Returns the message (also appended to ``provenance["warnings"]``), or None when every value is
    a whole number. Call it after :func:`validate_counts` has refused NaN/inf/negative values.
    """
    data = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if data.size == 0 or data.dtype.kind != "f" or not np.isfinite(data).all():
        return None
    flat = data.ravel()
    frac = np.abs(flat - np.round(flat)) > 1e-6
    if not frac.any():
        return None
    n = int(frac.sum())
    example = float(flat[np.flatnonzero(frac)[0]])
    where = f"{path}: " if path is not None else ""
    msg = (f"{where}{source} holds {n} non-integer count(s) (e.g. {example:g}); they are used as given "
           "(library-size normalisation then log1p), as every reader does")
    warnings.warn(msg, stacklevel=3)
    if provenance is not None:
        provenance.setdefault("warnings", []).append(msg)
    return msg


def normalize_log1p(adata: "anndata.AnnData", target_sum: float = Default.TARGET_SUM) -> "anndata.AnnData":
    """Fill ``layers[Key.LOGNORM]`` with ``log1p(X / row sum * target_sum)`` (rows with no counts stay 0)."""
    X = adata.layers[Key.COUNTS] if Key.COUNTS in adata.layers else adata.X
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32)
    lib = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    Y = sp.diags(scale.astype(np.float32)) @ X
    Y = Y.tocsr()
    Y.data = np.log1p(Y.data).astype(np.float32)
    adata.layers[Key.LOGNORM] = Y
    return adata


def collapse_duplicate_genes(X: sp.csr_matrix, genes, gene_ids=None) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The duplicated-symbol rule: columns sharing a symbol are summed into one, in first-seen order.

    Returns ``(X with one column per symbol, var)``: ``var`` is indexed by the unique symbols and
    holds ``Key.GENE_IDS`` (the feature ids, ``;``-joined when several were summed; the symbol
    itself when the input has no ids) and ``Key.N_FEATURES``.
    """
    names = [str(g) for g in genes]
    ids = [str(i) for i in gene_ids] if gene_ids is not None and len(gene_ids) == len(names) else list(names)
    codes, uniques = pd.factorize(pd.Index(names), sort=False)
    n_feat = np.bincount(codes, minlength=len(uniques))
    if len(uniques) < len(names):
        # a (features x symbols) 0/1 matrix sums each symbol's columns; a CSR product keeps X sparse
        merge = sp.csr_matrix((np.ones(len(names), dtype=X.dtype), (np.arange(len(names)), codes)),
                              shape=(len(names), len(uniques)))
        X = (X @ merge).tocsr()
    joined = [[] for _ in range(len(uniques))]
    for c, i in zip(codes, ids):
        joined[c].append(i)
    var = pd.DataFrame({Key.GENE_IDS: [";".join(j) for j in joined], Key.N_FEATURES: n_feat.astype(np.int64)},
                       index=pd.Index([str(u) for u in uniques]))
    return X, var


@contextlib.contextmanager
def quiet_duplicate_names():
    """Silence anndata's "... names are not unique" while a reader builds or subsets an AnnData.

    The readers apply :func:`collapse_duplicate_genes` (and refuse duplicated spot ids), so the
    library's advice to call ``var_names_make_unique`` would only mislead the user.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*names are not unique")
        yield


def symbols_for(genes, var: pd.DataFrame | None) -> list[str]:
    """Map requested genes (symbols or feature ids) to ``var_names`` symbols; unknown ones pass unchanged."""
    genes = [str(g).strip() for g in genes]
    if var is None or Key.GENE_IDS not in var.columns:
        return genes
    by_id: dict[str, str] = {}
    for sym, ids in zip(var.index, var[Key.GENE_IDS].astype(str)):
        for fid in ids.split(";"):
            by_id.setdefault(fid.upper(), str(sym))
    names = {str(g) for g in var.index}
    return [g if g in names else by_id.get(g.upper(), g) for g in genes]


def make_expression(counts, spot_ids, genes, spots: pd.DataFrame, path=None, gene_ids=None) -> "anndata.AnnData":
    """Build the standard expression AnnData (see module docstring) for ``spots`` (same order as ids).

    ``gene_ids`` (same length as ``genes``) are the feature ids kept in ``var[Key.GENE_IDS]``.
    """
    import anndata

    X = counts if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    X = X.tocsr()
    validate_counts(X, path)
    X = X.astype(np.float32)
    X.sum_duplicates()
    X, var = collapse_duplicate_genes(X, genes, gene_ids)
    X.eliminate_zeros()
    ids = pd.Index([str(s) for s in spot_ids])
    if ids.has_duplicates:
        dup = ids[ids.duplicated()].unique()
        raise InputError(f"duplicated spot barcodes ({len(dup)}, e.g. {dup[0]})", path=path,
                         hint="each spot id must appear once; remove the duplicates")
    obs = pd.DataFrame(index=ids)
    sp_rows = spots.loc[ids]
    for col in (Key.ARRAY_ROW, Key.ARRAY_COL, Key.IN_TISSUE):
        if col in sp_rows.columns:
            obs[col] = sp_rows[col].to_numpy()
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    adata.layers[Key.COUNTS] = X.copy()
    adata.obsm[Key.SPATIAL] = sp_rows[[Key.COL, Key.ROW]].to_numpy(dtype=np.float64)
    normalize_log1p(adata)
    return adata


# --------------------------------------------------------------------------- 10x matrices
def read_10x_h5(path: str | os.PathLike) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """Read a Cell Ranger/Space Ranger ``*_feature_bc_matrix.h5`` (v3+ layout).

    Returns ``(counts spots x genes CSR, barcodes, gene names, gene ids)``; only "Gene Expression"
    features are kept.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise InputError("not a 10x feature-barcode matrix (no 'matrix' group; v2 files are not supported)",
                                 path=path, hint="give the filtered_feature_bc_matrix.h5 written by Space Ranger >= 1.0")
            g = f["matrix"]
            shape = tuple(int(x) for x in g["shape"][:])  # (features, barcodes)
            data = g["data"][:]
            indices = g["indices"][:]
            indptr = g["indptr"][:]
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in g["barcodes"][:]]
            feats = g["features"]
            names = [b.decode() if isinstance(b, bytes) else str(b) for b in feats["name"][:]]
            ids = [b.decode() if isinstance(b, bytes) else str(b) for b in feats["id"][:]]
            ftype = ([b.decode() if isinstance(b, bytes) else str(b) for b in feats["feature_type"][:]]
                     if "feature_type" in feats else ["Gene Expression"] * len(names))
    except InputError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read the 10x matrix ({type(exc).__name__}: {exc})", path=path,
                         hint="the file is damaged or not an HDF5 feature-barcode matrix; re-export it") from None
    m = sp.csc_matrix((data, indices, indptr), shape=shape)  # genes x barcodes, columns = barcodes
    keep = np.array([t == "Gene Expression" for t in ftype])
    m = m[keep] if not keep.all() else m
    names = [n for n, k in zip(names, keep) if k]
    ids = [n for n, k in zip(ids, keep) if k]
    return m.T.tocsr(), barcodes, names, ids


def read_10x_mex(folder: str | os.PathLike) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """Read a 10x ``filtered_feature_bc_matrix/`` folder (matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz)."""
    import scipy.io
    from pathlib import Path

    folder = Path(folder)

    def _find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).exists():
                return folder / name
        raise InputError(f"missing {stem}(.gz)", path=folder, hint="the matrix folder must hold matrix.mtx, barcodes.tsv and features.tsv")

    mtx = _find("matrix.mtx")
    try:
        m = scipy.io.mmread(str(mtx)).tocsc()
        barcodes = pd.read_csv(_find("barcodes.tsv"), sep="\t", header=None)[0].astype(str).tolist()
        feats = pd.read_csv(_find("features.tsv"), sep="\t", header=None)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise InputError(f"cannot read the 10x matrix folder ({type(exc).__name__}: {exc})", path=folder,
                         hint="re-export the matrix") from None
    names = feats[1].astype(str).tolist() if feats.shape[1] > 1 else feats[0].astype(str).tolist()
    ids = feats[0].astype(str).tolist()
    if feats.shape[1] > 2:
        keep = (feats[2].astype(str) == "Gene Expression").to_numpy()
        m = m[keep]
        names = [n for n, k in zip(names, keep) if k]
        ids = [n for n, k in zip(ids, keep) if k]
    return m.T.tocsr(), barcodes, names, ids


__all__ = ["validate_counts", "warn_non_integer", "normalize_log1p", "make_expression", "collapse_duplicate_genes", "symbols_for", "read_10x_h5", "read_10x_mex"]
