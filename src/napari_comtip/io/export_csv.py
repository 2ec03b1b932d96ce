"""The CSV table of a prediction (``comtip predict --csv``, the Predict widget's Export CSV...).

Made for a person opening it in a spreadsheet: ``#`` lines at the top say what the numbers are
(the values, the model, the predictor, the scale, the package version and date), then one header
row and one row per spot::

    # napari-comtip prediction of C2 (legacy-st)
    # values = predicted log1p(counts / library size x 10000) per spot and gene; not measured counts
    # ...
    spot_id,x_px,y_px,x_um,y_um,ERBB2,...,ERBB2_uncertainty,...

Columns: ``spot_id``; the spot centre in full-resolution pixels of the slide (``x_px`` = column,
``y_px`` = row, 2 decimals) and in micrometres from the slide's top-left corner (``x_um``,
``y_um`` = pixels x µm per pixel, 1 decimal); one column per gene (4 decimals); when the
prediction has ``layers[Key.UNCERTAINTY]``, one ``<gene>_uncertainty`` column per gene after
them (same units). The comment lines never hold a comma, so a spreadsheet keeps each one in its
first cell. Read it back with ``pandas.read_csv(path, comment="#")`` or, in R,
``read.csv(path, comment.char = "#")``.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..constants import Default, Key

if TYPE_CHECKING:  # pragma: no cover
    import anndata

#: Decimals written: pixel coordinates, micrometre coordinates, predicted values.
PX_DECIMALS, UM_DECIMALS, VALUE_DECIMALS = 2, 1, 4
UNCERTAINTY_SUFFIX = "_uncertainty"
COORD_COLUMNS = ("spot_id", "x_px", "y_px", "x_um", "y_um")


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)


def _prov(adata: "anndata.AnnData") -> dict[str, Any]:
    prov = adata.uns.get(Key.PROVENANCE, {})
    return dict(prov) if hasattr(prov, "keys") else {}


def _mpp(prov: dict) -> float | None:
    try:
        v = float(prov.get("mpp"))
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def prediction_table(adata: "anndata.AnnData") -> pd.DataFrame:
    """Spots x (coordinates, genes[, gene uncertainties]) as written to the CSV (see module docstring)."""
    prov = _prov(adata)
    mpp = _mpp(prov)
    xy = np.asarray(adata.obsm[Key.SPATIAL], dtype=np.float64)
    genes = [str(g) for g in adata.var_names]
    cols: dict[str, Any] = {
        "spot_id": [str(s) for s in adata.obs_names],
        "x_px": np.round(xy[:, 0], PX_DECIMALS),
        "y_px": np.round(xy[:, 1], PX_DECIMALS),
        "x_um": np.round(xy[:, 0] * mpp, UM_DECIMALS) if mpp else np.full(len(xy), np.nan),
        "y_um": np.round(xy[:, 1] * mpp, UM_DECIMALS) if mpp else np.full(len(xy), np.nan),
    }
    blocks = [pd.DataFrame(cols), pd.DataFrame(np.round(_dense(adata.X), VALUE_DECIMALS), columns=genes)]
    if Key.UNCERTAINTY in adata.layers:
        unc = np.round(_dense(adata.layers[Key.UNCERTAINTY]), VALUE_DECIMALS)
        blocks.append(pd.DataFrame(unc, columns=[f"{g}{UNCERTAINTY_SUFFIX}" for g in genes]))
    return pd.concat(blocks, axis=1)


def _clean(value: Any) -> str:
    """One comment-line value: no comma (a spreadsheet would split the line), no newline."""
    return " ".join(str(value).replace(",", ";").split())


def provenance_lines(adata: "anndata.AnnData") -> list[str]:
    """The ``#`` lines at the top of the CSV: what the values are and where they came from."""
    from .. import __version__

    prov = _prov(adata)
    sample = prov.get("sample", {}) if hasattr(prov.get("sample", {}), "get") else {}
    mpp = _mpp(prov)
    ckpt = str(prov.get("checkpoint") or "")
    digest = str(prov.get("checkpoint_digest") or "")
    name = str(prov.get("checkpoint_name") or (Path(ckpt).name if ckpt else "unknown"))
    target = f"{Default.TARGET_SUM:.0f}"
    lines = [
        f"napari-comtip prediction of {sample.get('name', '?')} ({sample.get('format', '?')})",
        f"values = predicted log1p(counts / library size x {target}) per spot and gene"
        "; predicted from the H&E image; not measured counts",
        f"predictor = {prov.get('predictor', '?')}",
        f"checkpoint = {name}" + (f" (sha256 {digest[:16]})" if digest else ""),
        (f"micrometres per pixel = {mpp:.4f} (source: {prov.get('mpp_source', '?')})" if mpp
         else "micrometres per pixel = unknown (x_um and y_um are empty)"),
        "x_px y_px = spot centre in full-resolution pixels of the slide (column; row); "
        "x_um y_um = the same in micrometres from the top-left corner",
    ]
    grid = sample.get("grid") if hasattr(sample.get("grid"), "get") else None
    if grid:
        lines.append(f"bare-slide grid: pitch {float(grid.get('pitch_um', float('nan'))):g} um "
                     f"(spot diameter {float(grid.get('spot_um', float('nan'))):g} um)")
    if Key.UNCERTAINTY in adata.layers:
        lines.append(f"<gene>{UNCERTAINTY_SUFFIX} = the predictor's own spread for that spot and gene "
                     "(same units as the values; larger = less sure)")
    if sample.get("source"):
        lines.append(f"slide data = {sample.get('source')}")
    created = prov.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines.append(f"napari-comtip {__version__}; predicted {created}")
    return ["# " + _clean(t) for t in lines]


def write_prediction_csv(adata: "anndata.AnnData", path: str | Path) -> None:
    """Write the whole CSV file to ``path``: the ``#`` provenance lines, the header, one row per spot.

    Not atomic by itself: :mod:`io.writers` calls it on a temp file and renames.
    """
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write("\n".join(provenance_lines(adata)) + "\n")
        prediction_table(adata).to_csv(fh, index=False, lineterminator="\n", float_format="%.10g")


__all__ = ["prediction_table", "provenance_lines", "write_prediction_csv", "UNCERTAINTY_SUFFIX", "COORD_COLUMNS"]
