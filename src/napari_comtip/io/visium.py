"""Reader for a 10x Space Ranger ``outs/`` folder (Visium).

Read from the folder:

* ``spatial/tissue_positions_list.csv`` (Space Ranger v1, no header) or
  ``spatial/tissue_positions.csv`` (v2+, header): barcode, in_tissue, array_row, array_col,
  pxl_row_in_fullres, pxl_col_in_fullres. Spot centres are in *full-resolution* pixels.
* ``spatial/scalefactors_json.json``: ``tissue_hires_scalef``, ``tissue_lowres_scalef``
  (image pixels per full-resolution pixel) and ``spot_diameter_fullres`` (pixels of 10x's
  "theoretical 65 um spot": the microns per pixel are ``65 / spot_diameter_fullres``, which puts
  neighbouring spots 100 um apart; the 55 um printed spot is drawn ``55 / 65`` of it).
* ``spatial/tissue_hires_image.png`` (or ``tissue_lowres_image.png`` when hires is missing or
  blank), unless a full-resolution slide is given with ``slide=``.
* ``filtered_feature_bc_matrix.h5`` (or the ``filtered_feature_bc_matrix/`` folder, or the raw
  matrix when there is no filtered one).

A folder whose subfolders are such runs (e.g. ``visium_mouse_brain/A1``, ``.../B1``) is a
multi-sample data set (:func:`visium_runs`): ``sample=`` picks a run by its folder name.

Spots kept: ``in_tissue == 1`` and present in the matrix. The image is always addressed in
full-resolution pixels: a hires PNG becomes a one-level :class:`MultiscaleImage` with
``downsamples = [1 / tissue_hires_scalef]`` whose ``shape`` is the full-resolution extent it covers.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..constants import Default, Key
from ..errors import InputError
from .expression import make_expression, read_10x_h5, read_10x_mex
from .decode import decode_image
from .image import MultiscaleImage, is_blank
from .slide import open_image
from .record import SpatialSample, drop_spots_outside, mpp_with_override

FORMAT = "visium"
_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_MATRIX_CANDIDATES = ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix", "raw_feature_bc_matrix.h5",
                      "raw_feature_bc_matrix")
_V2_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def find_outs(path: Path) -> Path | None:
    """The ``outs/``-like folder (the one holding ``spatial/``) at or directly below ``path``."""
    path = Path(path)
    for cand in (path, path / "outs"):
        if (cand / "spatial").is_dir() and any((cand / "spatial" / f).is_file() for f in _POSITION_FILES):
            return cand
    if path.name == "spatial" and any((path / f).is_file() for f in _POSITION_FILES):
        return path.parent
    return None


def run_name(outs: Path) -> str:
    """A run's sample name: the folder above ``outs/``, else the outs-like folder's own name."""
    return outs.parent.name if outs.name == "outs" else outs.name


def visium_runs(path: str | os.PathLike) -> dict[str, Path]:
    """``{sample name: outs folder}`` of a folder whose subfolders are Space Ranger runs.

    A folder such as ``visium_mouse_brain/`` holding ``A1/`` and ``B1/`` (each an ``outs/``-like
    folder, or holding ``outs/``) is a multi-sample data set; empty when ``path`` is itself a run.
    """
    path = Path(path)
    if not path.is_dir() or find_outs(path) is not None:
        return {}
    runs: dict[str, Path] = {}
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            outs = find_outs(child)
            if outs is not None:
                runs[run_name(outs)] = outs
    return runs


def resolve_run(path: str | os.PathLike, sample: str | None) -> Path:
    """The outs folder to read: ``path`` itself, or the run ``sample`` of a multi-run folder."""
    outs = find_outs(Path(path))
    if outs is not None:
        name = run_name(outs)
        if sample is not None and sample != name:
            raise InputError(f"unknown sample {sample!r}", path=outs, hint=f"available samples: {name}")
        return outs
    runs = visium_runs(path)
    if not runs:
        raise InputError("not a Space Ranger outs/ folder (no spatial/tissue_positions*.csv)", path=path,
                         hint="give the outs/ folder of a Visium run, or a folder holding several of them")
    if sample is None:
        if len(runs) > 1:
            raise InputError(f"this folder holds {len(runs)} Visium runs ({', '.join(runs)})", path=path,
                             hint="choose one with --sample")
        sample = next(iter(runs))
    if sample not in runs:
        raise InputError(f"unknown sample {sample!r}", path=path, hint=f"available samples: {', '.join(runs)}")
    return runs[sample]


def read_positions(path: Path) -> pd.DataFrame:
    """A tissue positions table (v1 without header or v2+ with header) with the v2 column names."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        has_header = "barcode" in first.lower() or "in_tissue" in first.lower()
        df = pd.read_csv(path, header=0 if has_header else None)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read the tissue positions ({type(exc).__name__}: {exc})", path=path,
                         hint="re-export the Space Ranger spatial/ folder") from None
    if has_header:
        df.columns = [str(c).strip() for c in df.columns]
        missing = [c for c in _V2_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(f"the tissue positions lack column(s) {', '.join(missing)}", path=path,
                             hint="expected Space Ranger's columns " + ", ".join(_V2_COLUMNS))
        df = df[_V2_COLUMNS]
    else:
        if df.shape[1] != 6:
            raise InputError(f"expected 6 columns in a headerless (v1) tissue positions file, found {df.shape[1]}",
                             path=path, hint="columns: " + ", ".join(_V2_COLUMNS))
        df.columns = _V2_COLUMNS
    df["barcode"] = df["barcode"].astype(str)
    if df["barcode"].duplicated().any():
        dup = df.loc[df["barcode"].duplicated(), "barcode"].iloc[0]
        raise InputError(f"duplicated barcodes in the tissue positions (e.g. {dup})", path=path,
                         hint="each barcode must appear once; re-export the positions")
    num = df[_V2_COLUMNS[1:]].apply(pd.to_numeric, errors="coerce")
    if num.isna().any().any():
        raise InputError("the tissue positions hold empty or non-numeric values", path=path,
                         hint="re-export the Space Ranger spatial/ folder")
    df[_V2_COLUMNS[1:]] = num
    return df.set_index("barcode")


def read_scalefactors(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise InputError("scale factors not found", path=path,
                         hint="copy spatial/scalefactors_json.json from the Space Ranger outs/ folder, "
                              "or pass the full-resolution --slide together with --mpp")
    try:
        sf = json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot parse the scale factors ({type(exc).__name__}: {exc})", path=path,
                         hint="re-export spatial/scalefactors_json.json") from None
    if not isinstance(sf, dict):
        raise InputError("the scale factors file is not a JSON object", path=path,
                         hint="re-export spatial/scalefactors_json.json")
    out = {}
    for k, v in sf.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    for k in ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"):
        if k in out and not (out[k] > 0 and math.isfinite(out[k])):
            raise InputError(f"scale factor {k} = {out[k]} is not a positive number", path=path,
                             hint="re-export spatial/scalefactors_json.json")
    return out


def _find_matrix(outs: Path) -> Path | None:
    for name in _MATRIX_CANDIDATES:
        if (outs / name).exists():
            return outs / name
    h5s = sorted(outs.glob("*filtered_feature_bc_matrix.h5"))
    return h5s[0] if h5s else None


def scaled_image(arr: np.ndarray, scalef: float, identity: str, source: str, kind: str) -> MultiscaleImage:
    """A hires/lowres image standing in for the full-resolution slide: level 0 downsample ``1/scalef``."""
    d = 1.0 / scalef
    h, w = arr.shape[:2]
    return MultiscaleImage([arr], [d], full_shape=(int(round(h * d)), int(round(w * d))), identity=identity,
                           source=source, kind=kind, info={"decoded": True, "scalef": scalef})


def read_visium(path: str | os.PathLike, sample: str | None = None, slide: str | os.PathLike | None = None,
                mpp: float | None = None, progress=None) -> SpatialSample:
    outs = resolve_run(path, sample)
    spatial = outs / "spatial"
    name = run_name(outs)
    provenance: dict[str, Any] = {"reader": "visium", "root": str(outs)}
    pos_file = next(spatial / f for f in _POSITION_FILES if (spatial / f).is_file())
    positions = read_positions(pos_file)
    provenance["positions_format"] = "v2+ (header)" if pos_file.name == "tissue_positions.csv" else "v1 (no header)"
    sf_file = spatial / "scalefactors_json.json"
    if sf_file.is_file() or slide is None or mpp is None:
        sf = read_scalefactors(sf_file)
    else:
        sf = {}

    # ---------------------------------------------------------------- image
    if slide is not None:
        slide = Path(slide)
        image, slide_mpp = open_image(slide, progress=progress)
        image_path = slide
        scale_note = f"positions used as pixels of the slide {slide.name} (scale 1)"
        hires = spatial / "tissue_hires_image.png"
        if "tissue_hires_scalef" in sf and hires.is_file():
            from .decode import image_size

            hw, hh = image_size(hires)
            exp_w = image.shape[1] * sf["tissue_hires_scalef"]
            if abs(hw - exp_w) / hw > Default.SCALE_TOLERANCE and abs(hw - exp_w) > 2:
                raise InputError(
                    f"the slide ({image.shape[1]} px wide) x tissue_hires_scalef {sf['tissue_hires_scalef']:g} = "
                    f"{exp_w:.0f} px, but the hires image is {hw} px wide",
                    path=sf_file,
                    hint="the scale factors belong to another image: pass the full-resolution slide Space Ranger was run on",
                )
    else:
        slide_mpp = None
        chosen = None
        blank: list[str] = []
        for key, fname in (("hires", "tissue_hires_image.png"), ("lowres", "tissue_lowres_image.png")):
            f = spatial / fname
            if not f.is_file():
                continue
            scalef = sf.get(f"tissue_{key}_scalef")
            if scalef is None:
                raise InputError(f"tissue_{key}_scalef is missing from the scale factors", path=sf_file,
                                 hint="re-export spatial/scalefactors_json.json")
            arr = decode_image(f)
            if is_blank(arr):
                blank.append(fname)
                continue
            chosen = (key, f, arr, scalef)
            break
        if chosen is None:  # one line: no warning about the blank image before it
            raise InputError("no usable tissue image (hires/lowres missing or blank)", path=spatial,
                             hint="pass the full-resolution slide with --slide")
        for fname in blank:  # warned only when the next image was used instead
            msg = f"{fname} is blank (one flat colour); using the next image instead"
            warnings.warn(msg, stacklevel=2)
            provenance.setdefault("warnings", []).append(msg)
        key, image_path, arr, scalef = chosen
        _check_scalef_ratio(spatial, sf, sf_file)
        from .cache import file_identity

        image = scaled_image(arr, scalef, file_identity(image_path), str(image_path), f"visium {key}")
        scale_note = f"tissue_{key}_scalef = {scalef:g} applied ({image_path.name} at 1/{1 / scalef:.2f} of full resolution)"
        provenance["image_scalef"] = {"key": f"tissue_{key}_scalef", "value": scalef}

    # ---------------------------------------------------------------- mpp
    if "spot_diameter_fullres" in sf:
        data_mpp = Default.VISIUM_SCALEFACTOR_SPOT_UM / sf["spot_diameter_fullres"]
        src = "scalefactors_json.json spot_diameter_fullres"
    elif slide_mpp:
        data_mpp, src = slide_mpp, "slide metadata (tiffslide mpp-x)"
    else:
        data_mpp, src = None, ""
    mpp_val, mpp_source = mpp_with_override(data_mpp, src, mpp, path=sf_file)
    diameter = (sf["spot_diameter_fullres"] * Default.VISIUM_SPOT_UM / Default.VISIUM_SCALEFACTOR_SPOT_UM
                if "spot_diameter_fullres" in sf else Default.VISIUM_SPOT_UM / mpp_val)  # the 55 um spot

    # ---------------------------------------------------------------- matrix + spots
    mat_path = _find_matrix(outs)
    if mat_path is None:
        raise InputError("no feature-barcode matrix", path=outs,
                         hint="expected filtered_feature_bc_matrix.h5 (or the filtered_feature_bc_matrix/ folder)")
    counts, barcodes, genes, gene_ids = (read_10x_mex(mat_path) if mat_path.is_dir() else read_10x_h5(mat_path))
    bc = pd.Index(barcodes)
    if bc.has_duplicates:
        dup = bc[bc.duplicated()].unique()
        raise InputError(f"duplicated barcodes in the matrix ({len(dup)}, e.g. {dup[0]})", path=mat_path,
                         hint="each barcode must appear once; re-export the matrix")
    tissue = positions[positions["in_tissue"] == 1]
    shared = tissue.index.intersection(bc, sort=False)
    if len(shared) == 0:
        raise InputError(
            f"the matrix barcodes (e.g. {bc[0] if len(bc) else 'none'}) and the in-tissue spots "
            f"(e.g. {tissue.index[0] if len(tissue) else 'none'}) share no barcodes",
            path=mat_path, hint="the matrix and spatial/ must come from the same Space Ranger run",
        )
    n_drop = len(tissue) - len(shared)
    n_extra = int(len(bc.difference(positions.index)))
    if n_drop:
        msg = f"{n_drop} in-tissue spot(s) have no column in {mat_path.name} and were dropped"
        warnings.warn(msg, stacklevel=2)
        provenance.setdefault("warnings", []).append(msg)
    if n_extra:
        msg = f"{n_extra} matrix barcode(s) have no position in {pos_file.name} and were ignored"
        warnings.warn(msg, stacklevel=2)
        provenance.setdefault("warnings", []).append(msg)
    provenance["dropped_spots"] = int(n_drop)
    provenance["positions_total"] = int(len(positions))
    provenance["positions_in_tissue"] = int(len(tissue))
    t = tissue.loc[shared]
    spots = pd.DataFrame(
        {
            Key.ROW: t["pxl_row_in_fullres"].to_numpy(dtype=np.float64),
            Key.COL: t["pxl_col_in_fullres"].to_numpy(dtype=np.float64),
            Key.DIAMETER: np.full(len(t), float(diameter)),
            Key.ARRAY_ROW: t["array_row"].to_numpy(dtype=np.int64),
            Key.ARRAY_COL: t["array_col"].to_numpy(dtype=np.int64),
            Key.IN_TISSUE: t["in_tissue"].to_numpy(dtype=np.int64),
        },
        index=pd.Index(shared, name="spot"),
    )
    spots = drop_spots_outside(spots, image, pos_file, scale_note, provenance)
    rows = bc.get_indexer(spots.index)
    expr = make_expression(counts[rows], spots.index, genes, spots, path=mat_path, gene_ids=gene_ids)
    provenance["duplicate_symbols"] = int((expr.var[Key.N_FEATURES] > 1).sum())
    provenance.update(
        {
            "image": str(image_path),
            "image_identity": image.identity,
            "image_kind": image.kind,
            "scale_applied": scale_note,
            "inputs": [str(pos_file), str(mat_path), str(image_path)] + ([str(sf_file)] if sf_file.is_file() else []),
            "files": {"positions": str(pos_file), "matrix": str(mat_path), "image": str(image_path),
                      "scalefactors": str(sf_file) if sf_file.is_file() else None},
        }
    )
    return SpatialSample(name=name, image=image, mpp=mpp_val, mpp_source=mpp_source, spots=spots, expression=expr,
                         format=FORMAT, provenance=provenance)


def _check_scalef_ratio(spatial: Path, sf: dict[str, float], sf_file: Path) -> None:
    """hires/lowres image sizes must agree with hires/lowres scale factors."""
    from .decode import image_size

    hi, lo = spatial / "tissue_hires_image.png", spatial / "tissue_lowres_image.png"
    if not (hi.is_file() and lo.is_file() and "tissue_hires_scalef" in sf and "tissue_lowres_scalef" in sf):
        return
    (hw, hh), (lw, lh) = image_size(hi), image_size(lo)
    size_ratio = max(hw, hh) / max(lw, lh)
    sf_ratio = sf["tissue_hires_scalef"] / sf["tissue_lowres_scalef"]
    if abs(size_ratio - sf_ratio) / sf_ratio > Default.SCALE_TOLERANCE:
        raise InputError(
            f"inconsistent scale factors: hires/lowres scalef = {sf_ratio:.3f} but the images' size ratio is "
            f"{size_ratio:.3f} ({hw} vs {lw} px)",
            path=sf_file,
            hint="the scale factors and images come from different runs; re-export spatial/ from Space Ranger",
        )


__all__ = ["read_visium", "find_outs", "visium_runs", "resolve_run", "run_name", "read_positions", "read_scalefactors", "scaled_image", "FORMAT"]
