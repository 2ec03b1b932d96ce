"""The one internal record for a loaded sample, whatever the input format.

A :class:`SpatialSample` holds

* ``image``: a :class:`~napari_comtip.io.image.MultiscaleImage` (lazy pyramid of RGB uint8
  levels, level 0 = full resolution);
* ``mpp``: microns per full-resolution pixel, and ``mpp_source``: where that figure came from;
* ``spots``: a :class:`pandas.DataFrame` indexed by spot id (barcodes, or ``<x>x<y>`` for the
  legacy ST layout) with columns ``Key.ROW``, ``Key.COL`` (spot centre in full-resolution pixels,
  float) and ``Key.DIAMETER`` (pixels), plus optional array coordinates;
* ``expression``: an :class:`anndata.AnnData` (spots x genes, ``obs_names`` == ``spots.index``,
  ``X`` = raw counts as float32 CSR, ``layers[Key.LOGNORM]`` = library-size-normalised log1p,
  ``var_names`` = gene symbols, ``obsm[Key.SPATIAL]`` = (x, y) centres) or ``None``;
* ``format`` and ``provenance`` (source files, reader, notes such as spots dropped).

Coordinates: napari and this record use (row, col) = (y, x); AnnData's ``obsm['spatial']`` uses
(x, y). Convert only through :meth:`SpatialSample.centers_rc` / :meth:`SpatialSample.centers_xy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..constants import Key

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from .image import MultiscaleImage


@dataclass
class SpatialSample:
    name: str
    image: "MultiscaleImage"
    mpp: float
    mpp_source: str
    spots: pd.DataFrame
    expression: "anndata.AnnData | None" = None
    format: str = "unknown"
    provenance: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ geometry
    @property
    def n_spots(self) -> int:
        return int(len(self.spots))

    @property
    def n_genes(self) -> int:
        return 0 if self.expression is None else int(self.expression.n_vars)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def spot_ids(self) -> list[str]:
        return [str(s) for s in self.spots.index]

    def centers_rc(self) -> np.ndarray:
        """Spot centres as an (N, 2) float array of (row, col) full-resolution pixels."""
        return self.spots[[Key.ROW, Key.COL]].to_numpy(dtype=np.float64)

    def centers_xy(self) -> np.ndarray:
        """Spot centres as an (N, 2) float array of (x, y) full-resolution pixels (AnnData order)."""
        return self.spots[[Key.COL, Key.ROW]].to_numpy(dtype=np.float64)

    def spot_diameter_px(self) -> float:
        return float(np.median(self.spots[Key.DIAMETER].to_numpy())) if len(self.spots) else float("nan")

    @property
    def identity(self) -> str:
        """A string that identifies the image content (used as a cache key)."""
        return str(self.provenance.get("image_identity", self.image.identity))

    def summary(self) -> dict[str, Any]:
        """What ``comtip inspect --json`` prints."""
        return {
            "name": self.name,
            "format": self.format,
            "n_spots": self.n_spots,
            "n_genes": self.n_genes,
            "width": self.width,
            "height": self.height,
            "mpp": float(self.mpp),
            "mpp_source": self.mpp_source,
            "levels": [list(map(int, lvl_shape[:2])) for lvl_shape in self.image.level_shapes],
            "spot_diameter_px": self.spot_diameter_px(),
            "image": self.provenance.get("image"),
            "dropped_spots": self.provenance.get("dropped_spots", 0),
        }


# --------------------------------------------------------------------------- reader helpers
def drop_spots_outside(spots: pd.DataFrame, image: "MultiscaleImage", path, scale_note: str,
                       provenance: dict[str, Any]) -> pd.DataFrame:
    """Drop spots whose centre lies off the image; refuse when too many do (a mis-scaled overlay).

    A spot whose centre is inside but whose disc/patch reaches past the edge is kept (patches
    are padded). ``scale_note`` says which scale was applied, for the message.
    """
    import warnings

    from ..constants import Default
    from ..errors import InputError

    if len(spots) == 0:
        return spots
    H, W = image.shape[:2]
    r = spots[Key.ROW].to_numpy(dtype=np.float64)
    c = spots[Key.COL].to_numpy(dtype=np.float64)
    inside = (r >= -0.5) & (r <= H - 0.5) & (c >= -0.5) & (c <= W - 0.5) & np.isfinite(r) & np.isfinite(c)
    n_out = int((~inside).sum())
    if n_out == 0:
        return spots
    frac = n_out / len(spots)
    if frac > Default.SPOTS_OUTSIDE_MAX:
        raise InputError(
            f"{n_out} of {len(spots)} spot centres ({frac:.0%}) fall outside the {W} x {H} px image "
            f"(x up to {np.nanmax(c):.0f}, y up to {np.nanmax(r):.0f}; {scale_note})",
            path=path,
            hint="the spot coordinates and the image do not match: check the scale factors or pass the right --slide",
        )
    msg = f"{n_out} spot(s) with centres outside the image were dropped ({scale_note})"
    warnings.warn(msg, stacklevel=3)
    provenance.setdefault("warnings", []).append(msg)
    provenance["spots_outside_image"] = n_out
    return spots.loc[inside]


def mpp_with_override(mpp: float | None, source: str, override: float | None, path=None) -> tuple[float, str]:
    """Apply a user ``--mpp`` (which wins and says so); refuse when there is no usable figure."""
    from ..errors import InputError

    if override is not None:
        if not (override > 0 and np.isfinite(override)):
            raise InputError(f"--mpp must be a positive number, got {override}", path=path)
        was = f"; the data said {mpp:.4f} from {source}" if mpp else ""
        return float(override), f"--mpp override{was}"
    if mpp is None or not (mpp > 0 and np.isfinite(mpp)):
        raise InputError("the image resolution (microns per pixel) is unknown", path=path,
                         hint="pass --mpp with the slide's microns per pixel")
    return float(mpp), source
