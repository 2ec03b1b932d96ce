"""Reader for an ``.h5ad`` file in the scanpy/squidpy spatial convention.

Read from the file:

* ``obsm['spatial']``: spot centres (x, y) in full-resolution pixels (required);
* ``uns['spatial'][<library_id>]``: ``images`` (``hires``/``lowres``/other) and ``scalefactors``
  (``tissue_<key>_scalef``, ``spot_diameter_fullres``); with several libraries, ``sample=`` picks
  one (and ``obs['library_id']``, when present, selects its spots);
* counts: ``layers['counts']`` if present, else ``raw.X``, else ``X``;
* gene names: ``var_names`` (or a symbol column of ``var`` when the names are Ensembl ids).

The image is the ``slide=`` given (addressed at scale 1, like ``obsm['spatial']``), else the
stored hires (or lowres, when hires is blank) image at ``downsample = 1 / scalef``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..constants import Default, Key
from ..errors import InputError
from .cache import file_identity
from .expression import make_expression, quiet_duplicate_names, warn_non_integer
from .image import is_blank, to_rgb_uint8
from .slide import open_image
from .record import SpatialSample, drop_spots_outside, mpp_with_override

FORMAT = "h5ad"
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol", "gene_names")


def list_samples(path: str | os.PathLike) -> list[str]:
    """Library ids under ``uns['spatial']`` when there are several, else the file's stem."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            libs = list(f["uns/spatial"].keys()) if "uns/spatial" in f else []
    except OSError as exc:
        raise InputError(f"cannot open the .h5ad file ({exc})", path=path, hint="the file is damaged; re-export it") from None
    return sorted(libs) if len(libs) > 1 else [_stem(path)]


def _stem(path: Path) -> str:
    return path.name[: -len(".h5ad")] if path.name.endswith(".h5ad") else path.stem


def _scalef(sf: dict, key: str) -> float | None:
    for k in (f"tissue_{key}_scalef", f"{key}_scalef"):
        if k in sf:
            try:
                v = float(np.asarray(sf[k]).ravel()[0])
            except (TypeError, ValueError, IndexError):
                return float("nan")
            return v
    return None


def open_anndata(path: Path):
    """``anndata.read_h5ad`` with one-line errors (a damaged file, not an AnnData file)."""
    import anndata

    try:
        with quiet_duplicate_names():
            return anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types
        raise InputError(f"cannot read the .h5ad file ({type(exc).__name__}: {exc})", path=path,
                         hint="the file is damaged or not an AnnData file; re-export it") from None


def anndata_counts(adata, path: Path, provenance: dict) -> tuple[sp.csr_matrix, list[str], list[str] | None]:
    """The raw counts of an AnnData (``layers['counts']``, else ``raw.X``, else ``X``), its gene symbols
    and feature ids (Ensembl var_names are replaced by a symbol column when there is one)."""
    genes = list(map(str, adata.var_names))
    if Key.COUNTS in adata.layers:
        X, src = adata.layers[Key.COUNTS], f"layers['{Key.COUNTS}']"
    elif adata.raw is not None and adata.raw.n_obs == adata.n_obs:
        X, src = adata.raw.X, "raw.X"
        genes = list(map(str, adata.raw.var_names))
    else:
        X, src = adata.X, "X"
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    provenance["counts_from"] = src
    warn_non_integer(X, path, src, provenance)  # the rule of every reader (io/expression.py)
    var = adata.raw.var if src == "raw.X" else adata.var
    ids = var[Key.GENE_IDS].astype(str).tolist() if Key.GENE_IDS in var.columns else None
    if genes and sum(g.startswith("ENS") for g in genes[:50]) > 25:
        for col in _SYMBOL_COLUMNS:
            if col in var.columns:
                ids = list(genes)  # the Ensembl var_names become the feature ids
                genes = var[col].astype(str).tolist()
                provenance["gene_names_from"] = f"var['{col}']"
                break
    return X, genes, ids


def read_h5ad(path: str | os.PathLike, sample: str | None = None, slide: str | os.PathLike | None = None,
              mpp: float | None = None, progress=None, *, mpp_hint: tuple[float, str] | None = None,
              spot_um: float | None = None, fmt: str = FORMAT, name: str | None = None,
              extra_inputs: list[str] | None = None) -> SpatialSample:
    path = Path(path)
    adata = open_anndata(path)
    provenance: dict[str, Any] = {"reader": fmt, "root": str(path)}
    if Key.SPATIAL not in adata.obsm:
        raise InputError(f"no obsm['{Key.SPATIAL}'] with spot coordinates", path=path,
                         hint="store the spot centres (x, y) in full-resolution pixels in adata.obsm['spatial']")
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise InputError(f"duplicated barcodes in obs_names ({len(dup)}, e.g. {dup[0]})", path=path,
                         hint="each spot must appear once; remove the duplicates (adata.obs_names_make_unique() hides them)")

    # ---------------------------------------------------------------- library
    spatial_uns = adata.uns.get(Key.SPATIAL, {}) or {}
    libs = list(spatial_uns.keys()) if isinstance(spatial_uns, dict) else []
    lib_id = None
    if sample is not None and libs:
        if sample not in libs and not (len(libs) == 1 and sample == _stem(path)):
            raise InputError(f"unknown sample {sample!r}", path=path, hint=f"available samples: {', '.join(sorted(libs))}")
        lib_id = sample if sample in libs else libs[0]
    elif sample is not None and sample != _stem(path) and sample != name:
        raise InputError(f"unknown sample {sample!r}", path=path, hint=f"available samples: {name or _stem(path)}")
    elif len(libs) == 1:
        lib_id = libs[0]
    elif len(libs) > 1:
        raise InputError(f"the file holds {len(libs)} libraries ({', '.join(sorted(libs))})", path=path,
                         hint="choose one with --sample")
    if lib_id is not None and len(libs) > 1 and "library_id" in adata.obs.columns:
        with quiet_duplicate_names():
            adata = adata[adata.obs["library_id"].astype(str) == lib_id].copy()
    lib = spatial_uns.get(lib_id, {}) if lib_id is not None else {}
    sf = dict(lib.get("scalefactors", {}) or {})
    images = dict(lib.get("images", {}) or {})
    provenance["library_id"] = lib_id
    sdf = sf.get("spot_diameter_fullres")
    if sdf is not None:
        sdf = float(np.asarray(sdf).ravel()[0])
        if not (sdf > 0 and math.isfinite(sdf)):
            raise InputError(f"scale factor spot_diameter_fullres = {sdf} is not a positive number", path=path,
                             hint=f"fix uns['spatial']['{lib_id}']['scalefactors']")

    # ---------------------------------------------------------------- image
    slide_mpp = None
    if slide is not None:
        slide = Path(slide)
        image, slide_mpp = open_image(slide, progress=progress)
        image_path = str(slide)
        scale_note = f"obsm['spatial'] used as pixels of the slide {slide.name} (scale 1)"
        for key, arr in images.items():
            s = _scalef(sf, key)
            if s is None:
                continue
            expect = image.shape[1] * s
            w = np.asarray(arr).shape[1]
            if not (s > 0 and math.isfinite(s)) or (abs(w - expect) / max(w, 1) > Default.SCALE_TOLERANCE and abs(w - expect) > 2):
                raise InputError(
                    f"inconsistent scale factors: the slide is {image.shape[1]} px wide x {key} scalef {s:g} = "
                    f"{expect:.0f} px, but the stored {key} image is {w} px wide",
                    path=path,
                    hint="the slide is not the one these coordinates refer to: pass the matching --slide",
                )
    else:
        order = [k for k in ("hires", "lowres") if k in images] + [k for k in images if k not in ("hires", "lowres")]
        chosen = None
        blank: list[str] = []
        for key in order:
            arr = np.asarray(images[key])
            if arr.ndim not in (2, 3) or min(arr.shape[:2]) == 0:
                continue
            s = _scalef(sf, key)
            if s is None:
                raise InputError(f"no scale factor for the stored '{key}' image (tissue_{key}_scalef)", path=path,
                                 hint=f"add it to uns['spatial']['{lib_id}']['scalefactors'] or pass --slide")
            if not (s > 0 and math.isfinite(s)):
                raise InputError(f"scale factor tissue_{key}_scalef = {s} is not a positive number", path=path,
                                 hint=f"fix uns['spatial']['{lib_id}']['scalefactors'] or pass --slide")
            if is_blank(arr):
                blank.append(key)
                continue
            chosen = (key, to_rgb_uint8(arr), s)
            break
        if chosen is None:  # one line: no warning about a blank image before it
            raise InputError("no usable image in uns['spatial'] and no slide given", path=path,
                             hint="pass the full-resolution slide with --slide")
        for k in blank:  # warned only when the next image was used instead
            msg = f"the stored '{k}' image is blank (one flat colour); using the next image instead"
            warnings.warn(msg, stacklevel=2)
            provenance.setdefault("warnings", []).append(msg)
        key, arr, s = chosen
        from .visium import scaled_image

        image = scaled_image(arr, s, f"{file_identity(path)}|{lib_id}|{key}", f"{path}:{key}", f"h5ad {key}")
        image_path = f"{path} uns['spatial']['{lib_id}']['images']['{key}']"
        scale_note = f"tissue_{key}_scalef = {s:g} applied to the stored {key} image"
        provenance["image_scalef"] = {"key": f"tissue_{key}_scalef", "value": s}

    # ---------------------------------------------------------------- mpp and spot size
    if mpp_hint is not None:
        data_mpp, src = mpp_hint
    elif sdf is not None:
        data_mpp, src = Default.VISIUM_SCALEFACTOR_SPOT_UM / sdf, "uns['spatial'] scalefactors spot_diameter_fullres"
    elif slide_mpp:
        data_mpp, src = slide_mpp, "slide metadata (tiffslide mpp-x)"
    else:
        data_mpp, src = None, ""
    mpp_val, mpp_source = mpp_with_override(data_mpp, src, mpp, path=path)
    if spot_um is not None:
        diameter = spot_um / mpp_val
    elif sdf is not None:
        diameter = sdf * Default.VISIUM_SPOT_UM / Default.VISIUM_SCALEFACTOR_SPOT_UM  # 10x's 65 um -> the 55 um spot
    else:
        diameter = Default.VISIUM_SPOT_UM / mpp_val

    # ---------------------------------------------------------------- spots + expression
    xy = np.asarray(adata.obsm[Key.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"obsm['{Key.SPATIAL}'] must be an (n_spots, 2) array of (x, y), got shape {xy.shape}",
                         path=path, hint="store (x, y) full-resolution pixel centres")
    if not np.isfinite(xy[:, :2]).all():
        raise InputError(f"obsm['{Key.SPATIAL}'] holds NaN or infinite coordinates", path=path,
                         hint="drop the spots without a position")
    spots = pd.DataFrame({Key.ROW: xy[:, 1], Key.COL: xy[:, 0], Key.DIAMETER: float(diameter)},
                         index=pd.Index(list(map(str, adata.obs_names)), name="spot"))
    for col in (Key.ARRAY_ROW, Key.ARRAY_COL, Key.IN_TISSUE):
        if col in adata.obs.columns:
            spots[col] = pd.to_numeric(adata.obs[col], errors="coerce").fillna(-1).astype(np.int64).to_numpy()
    keep = np.ones(len(spots), dtype=bool)
    if Key.IN_TISSUE in spots.columns and (spots[Key.IN_TISSUE] == 1).any():
        keep = (spots[Key.IN_TISSUE] == 1).to_numpy()
        provenance["not_in_tissue"] = int((~keep).sum())
    X, genes, gene_ids = anndata_counts(adata, path, provenance)
    spots = spots.loc[keep]
    X = X[np.flatnonzero(keep)]
    n0 = len(spots)
    spots = drop_spots_outside(spots, image, path, scale_note, provenance)
    if len(spots) != n0:
        X = X[pd.Index(adata.obs_names[keep]).get_indexer(spots.index)]
    expr = make_expression(X, spots.index, genes, spots, path=path, gene_ids=gene_ids) if X.shape[1] > 0 else None
    if expr is not None:
        provenance["duplicate_symbols"] = int((expr.var[Key.N_FEATURES] > 1).sum())
    provenance.update(
        {
            "image": image_path,
            "image_identity": image.identity,
            "image_kind": image.kind,
            "scale_applied": scale_note,
            "dropped_spots": 0,
            "inputs": [str(path)] + ([str(slide)] if slide is not None else []) + list(extra_inputs or []),
        }
    )
    return SpatialSample(name=name or (lib_id if lib_id and len(libs) > 1 else _stem(path)), image=image, mpp=mpp_val,
                         mpp_source=mpp_source, spots=spots, expression=expr, format=fmt, provenance=provenance)


__all__ = ["read_h5ad", "list_samples", "open_anndata", "anndata_counts", "FORMAT"]
