"""Reader for the legacy Spatial Transcriptomics layout (the her2st data set).

Layout of a data set folder (one or many sections ``<S>``)::

    ST-cnts/<S>.tsv.gz                 counts: rows "<x>x<y>" (array position), columns gene symbols
    ST-spotfiles/<S>_selection.tsv     x y new_x new_y pixel_x pixel_y selected
    ST-imgs/<patient>/<S>/<name>.jpg   the H&E image (patient = first letter of <S>)

Only ``selected == 1`` spots are used; a spot's id is ``<x>x<y>`` and its centre is
(row, col) = (pixel_y, pixel_x) in full-resolution pixels. Counts rows are matched to spots by id;
selected spots without counts are dropped with a warning. The microns per pixel come from the
spot pitch: the median pixel distance between spots that are neighbours on the array grid
(array positions one step apart), which is ``Default.LEGACY_ST_PITCH_UM`` (200 um) on the slide.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..constants import Default, Key
from ..errors import InputError
from .decode import IMAGE_SUFFIXES
from .expression import make_expression, warn_non_integer
from .slide import open_image
from .record import SpatialSample, drop_spots_outside, mpp_with_override

FORMAT = "legacy-st"
COUNTS_DIR, SPOTS_DIR, IMAGES_DIR = "ST-cnts", "ST-spotfiles", "ST-imgs"
_COUNT_SUFFIXES = (".tsv.gz", ".tsv", ".csv.gz", ".csv")
_SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def is_legacy_st(path: Path) -> bool:
    return path.is_dir() and (path / COUNTS_DIR).is_dir() and (path / SPOTS_DIR).is_dir()


def _strip_count_suffix(name: str) -> str | None:
    for suf in _COUNT_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def list_samples(root: str | os.PathLike) -> list[str]:
    """Sections that have both a counts file and a spot selection file."""
    root = Path(root)
    counts = {_strip_count_suffix(p.name) for p in (root / COUNTS_DIR).iterdir() if p.is_file()}
    counts.discard(None)
    spots = {p.name[: -len("_selection.tsv")] for p in (root / SPOTS_DIR).glob("*_selection.tsv")}
    return sorted(counts & spots)


def sample_files(root: str | os.PathLike, sample: str) -> dict[str, Path]:
    """The counts, selection and image paths of one section (image: the largest image file found)."""
    root = Path(root)
    counts = next((root / COUNTS_DIR / f"{sample}{suf}" for suf in _COUNT_SUFFIXES
                   if (root / COUNTS_DIR / f"{sample}{suf}").is_file()), None)
    selection = root / SPOTS_DIR / f"{sample}_selection.tsv"
    if counts is None:
        raise InputError(f"no counts file for section {sample}", path=root / COUNTS_DIR,
                         hint=f"expected {sample}.tsv.gz there")
    if not selection.is_file():
        raise InputError(f"no spot selection file for section {sample}", path=selection,
                         hint="expected <section>_selection.tsv with columns x y pixel_x pixel_y selected")
    candidates: list[Path] = []
    img_root = root / IMAGES_DIR
    for folder in (img_root / sample[:1] / sample, img_root / sample):
        if folder.is_dir():
            candidates = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if candidates:
                break
    if not candidates and img_root.is_dir():
        candidates = [p for p in img_root.rglob("*") if p.is_file() and p.parent.name == sample
                      and p.suffix.lower() in IMAGE_SUFFIXES]
    image = max(candidates, key=lambda p: p.stat().st_size) if candidates else None
    return {"counts": counts, "selection": selection, "image": image}


# --------------------------------------------------------------------------- tables
def read_selection(path: str | os.PathLike) -> pd.DataFrame:
    """Selected spots of a ``*_selection.tsv`` as a spot table (index ``<x>x<y>``, no diameter yet)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t")
    except Exception as exc:  # noqa: BLE001 - any parse error is a bad file
        raise InputError(f"cannot read the spot selection table ({type(exc).__name__}: {exc})", path=path,
                         hint="it must be tab-separated with columns x y pixel_x pixel_y selected") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in _SELECTION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"the spot selection table lacks column(s) {', '.join(missing)}", path=path,
                         hint="it must be tab-separated with columns x y pixel_x pixel_y selected")
    if "selected" in df.columns:
        df = df[pd.to_numeric(df["selected"], errors="coerce") == 1]
    if df[list(_SELECTION_COLUMNS)].isna().any().any():
        raise InputError("the spot selection table has empty or non-numeric coordinates", path=path,
                         hint="fix the x y pixel_x pixel_y columns")
    xs = np.rint(df["x"].to_numpy(dtype=np.float64)).astype(int)
    ys = np.rint(df["y"].to_numpy(dtype=np.float64)).astype(int)
    ids = pd.Index([f"{x}x{y}" for x, y in zip(xs, ys)])
    if ids.has_duplicates:
        dup = ids[ids.duplicated()].unique()
        raise InputError(f"{len(dup)} array position(s) are listed twice among the selected spots (e.g. {dup[0]})",
                         path=path, hint="each spot id (x, y) must appear once; remove the duplicates")
    spots = pd.DataFrame(
        {
            Key.ROW: df["pixel_y"].to_numpy(dtype=np.float64),
            Key.COL: df["pixel_x"].to_numpy(dtype=np.float64),
            Key.ARRAY_ROW: ys,
            Key.ARRAY_COL: xs,
            Key.IN_TISSUE: np.ones(len(df), dtype=np.int64),
        },
        index=ids,
    )
    spots.index.name = "spot"
    return spots


def read_counts(path: str | os.PathLike) -> pd.DataFrame:
    """A spots x genes count table (``.tsv[.gz]``, first column = spot id) as a DataFrame."""
    path = Path(path)
    sep = "," if ".csv" in path.name else "\t"
    try:
        try:
            import pyarrow  # noqa: F401

            engine = "pyarrow"
        except ImportError:
            engine = "c"
        df = pd.read_csv(path, sep=sep, index_col=0, engine=engine)
    except Exception as exc:  # noqa: BLE001 - EOFError/zlib/ParserError: a bad file
        raise InputError(f"cannot read the count matrix ({type(exc).__name__}: {exc})", path=path,
                         hint="the file is damaged or not a tab-separated spots x genes table; re-download it") from None
    header = _header_names(path, sep)
    if header is not None and len(header) == df.shape[1] and len(set(header)) < len(header):
        df.columns = header  # pandas renamed repeated symbols "X.1"; keep them for the duplicate rule
    df.index = pd.Index([str(i).strip() for i in df.index])
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()].unique()
        raise InputError(f"duplicated spot ids in the count matrix ({len(dup)}, e.g. {dup[0]})", path=path,
                         hint="each spot must have one row; remove the duplicates")
    nonnum = [c for c, t in df.dtypes.items() if t.kind not in "iufb"]
    if nonnum:
        raise InputError(f"{len(nonnum)} count column(s) are not numeric (e.g. {nonnum[0]})", path=path,
                         hint="the table must hold numbers only, one row per spot and one column per gene")
    return df


def _header_names(path: Path, sep: str) -> list[str] | None:
    """The gene names of a count table's header line as written (without the spot-id column)."""
    import gzip

    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            names = fh.readline().rstrip("\r\n").split(sep)
    except OSError:
        return None
    return [n.strip().strip('"') for n in names[1:]]


def estimate_pitch_px(spots: pd.DataFrame) -> tuple[float, str]:
    """Spot pitch in pixels: median distance of array-grid neighbours (fallback: nearest neighbours)."""
    from scipy.spatial import cKDTree

    pix = spots[[Key.ROW, Key.COL]].to_numpy(dtype=np.float64)
    if len(pix) < 2:
        return float("nan"), "too few spots"
    if Key.ARRAY_ROW in spots and Key.ARRAY_COL in spots:
        arr = spots[[Key.ARRAY_ROW, Key.ARRAY_COL]].to_numpy(dtype=np.float64)
        pairs = cKDTree(arr).query_pairs(1.0 + 1e-6, output_type="ndarray")
        if len(pairs) >= 3:
            d = np.linalg.norm(pix[pairs[:, 0]] - pix[pairs[:, 1]], axis=1)
            return float(np.median(d)), f"median of {len(pairs)} array-neighbour distances"
    d, _ = cKDTree(pix).query(pix, k=2)
    return float(np.median(d[:, 1])), "median nearest-neighbour distance"


def _spots_with_counts(files: dict[str, Path], provenance: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, pd.Index]:
    """The selected spots, the count table, and the ids of the selected spots that have counts
    (the others are dropped with a warning)."""
    spots = read_selection(files["selection"])
    if len(spots) == 0:
        raise InputError("no selected spots (selected == 1)", path=files["selection"],
                         hint="the selection table must mark spots under tissue with selected = 1")
    counts = read_counts(files["counts"])
    shared = spots.index.intersection(counts.index, sort=False)
    if len(shared) == 0:
        raise InputError(
            f"the counts rows (e.g. {counts.index[0] if len(counts) else 'none'}) and the selected spots "
            f"(e.g. {spots.index[0]}) share no spot ids",
            path=files["counts"],
            hint=f"counts rows must be named <x>x<y> like the x, y columns of {files['selection'].name}",
        )
    n_drop = len(spots) - len(shared)
    if n_drop:
        missing = [s for s in spots.index if s not in counts.index]
        msg = (f"{n_drop} selected spot(s) have no counts in {files['counts'].name} and were dropped "
               f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''})")
        warnings.warn(msg, stacklevel=3)
        provenance.setdefault("warnings", []).append(msg)
    provenance["dropped_spots"] = int(n_drop)
    provenance["unselected_count_rows"] = int(len(counts.index.difference(spots.index)))
    return spots, counts, shared


def read_legacy_st_expression(root: str | os.PathLike, sample: str):
    """The expression AnnData of one section's selected spots, without its image (a section whose
    H&E is not available: expression-only training data, ``data.expression_only``)."""
    files = sample_files(root, sample)
    provenance: dict[str, Any] = {"reader": "legacy_st (expression only)", "root": str(root), "sample": sample}
    spots, counts, shared = _spots_with_counts(files, provenance)
    spots = spots.loc[shared]
    matrix = counts.loc[spots.index].to_numpy(dtype=np.float32)
    warn_non_integer(matrix, files["counts"], "the count table", provenance)
    expr = make_expression(matrix, spots.index, counts.columns, spots, path=files["counts"])
    expr.uns["provenance"] = {k: v for k, v in provenance.items() if k != "warnings"}
    return expr


# --------------------------------------------------------------------------- reader
def read_legacy_st(root: str | os.PathLike, sample: str | None = None, slide: str | os.PathLike | None = None,
                   mpp: float | None = None, progress=None) -> SpatialSample:
    root = Path(root)
    names = list_samples(root)
    if not names:
        raise InputError("no section has both a counts file and a spot selection file", path=root,
                         hint=f"expected {COUNTS_DIR}/<S>.tsv.gz and {SPOTS_DIR}/<S>_selection.tsv")
    if sample is None:
        if len(names) > 1:
            raise InputError(f"this data set holds {len(names)} sections ({', '.join(names)})", path=root,
                             hint="choose one with --sample")
        sample = names[0]
    if sample not in names:
        raise InputError(f"unknown sample {sample!r}", path=root,
                         hint=f"available samples: {', '.join(names)}")
    files = sample_files(root, sample)
    image_path = Path(slide) if slide else files["image"]
    if image_path is None:
        raise InputError(f"no H&E image found for section {sample}", path=root / IMAGES_DIR,
                         hint=f"expected {IMAGES_DIR}/{sample[:1]}/{sample}/<image>.jpg, or pass --slide")

    provenance: dict[str, Any] = {"reader": "legacy_st", "root": str(root), "sample": sample}
    spots, counts, shared = _spots_with_counts(files, provenance)

    pitch_px, how = estimate_pitch_px(spots)
    data_mpp = Default.LEGACY_ST_PITCH_UM / pitch_px if np.isfinite(pitch_px) and pitch_px > 0 else None
    mpp_val, mpp_source = mpp_with_override(data_mpp, f"spot pitch ({Default.LEGACY_ST_PITCH_UM:g} um)", mpp,
                                            path=files["selection"])
    provenance["pitch_px"] = pitch_px
    provenance["pitch_estimate"] = how

    spots = spots.loc[shared].copy()
    spots[Key.DIAMETER] = Default.LEGACY_ST_SPOT_UM / mpp_val

    image, _ = open_image(image_path, progress=progress)
    spots = drop_spots_outside(spots, image, files["selection"],
                               "pixel_x/pixel_y taken as full-resolution pixels of "
                               f"{image_path.name}, scale 1", provenance)
    matrix = counts.loc[spots.index].to_numpy(dtype=np.float32)
    warn_non_integer(matrix, files["counts"], "the count table", provenance)  # the rule of every reader
    expr = make_expression(matrix, spots.index, counts.columns, spots, path=files["counts"])
    provenance["duplicate_symbols"] = int((expr.var[Key.N_FEATURES] > 1).sum())
    provenance.update(
        {
            "image": str(image_path),
            "image_identity": image.identity,
            "image_kind": image.kind,
            "image_decoded": bool(image.info.get("decoded", False)),
            "inputs": [str(files["counts"]), str(files["selection"]), str(image_path)],
            "files": {"counts": str(files["counts"]), "selection": str(files["selection"]), "image": str(image_path)},
        }
    )
    return SpatialSample(name=sample, image=image, mpp=mpp_val, mpp_source=mpp_source, spots=spots,
                         expression=expr, format=FORMAT, provenance=provenance)


__all__ = ["read_legacy_st", "read_legacy_st_expression", "list_samples", "is_legacy_st", "read_selection", "read_counts", "estimate_pitch_px",
           "sample_files"]
