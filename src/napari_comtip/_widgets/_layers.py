"""SpatialSample -> napari layer data, and expression -> colours. No Qt, no napari import.

Every function here returns plain napari ``LayerDataTuple``s ``(data, kwargs, layer_type)`` or
numpy arrays, so the reader, the Predict widget and ``comtip view`` build identical layers, and
the geometry is unit-tested without a display.

Coordinates: napari uses (row, col) world coordinates; every layer made here is placed in
*full-resolution slide pixels* (the frame of ``SpatialSample.spots``). An image whose level 0 is
not the full-resolution slide (e.g. a Visium folder that ships only the hires PNG) gets
``scale = full-res px per level-0 px`` so that spots and tissue align.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..constants import Default, Key

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from ..io.record import SpatialSample

LayerDataTuple = tuple[Any, dict[str, Any], str]

# layer roles (values of ``metadata[Key.LAYER_ROLE]``)
ROLE_TISSUE = "tissue"
ROLE_SPOTS = "spots"
ROLE_PREDICTED = "predicted"
ROLE_MEASURED = "measured"
ROLE_HEAT_PREDICTED = "heatmap-predicted"
ROLE_HEAT_MEASURED = "heatmap-measured"
ROLE_TISSUE_COPY = "tissue-measured"
ROLE_UNCERTAINTY = "uncertainty"


# --------------------------------------------------------------------------- geometry
def image_scale(sample: "SpatialSample") -> float:
    """Full-resolution pixels per level-0 pixel of ``sample.image`` (1.0 for a real full-res slide).

    A Visium folder without the full-resolution TIFF offers only the hires PNG as level 0; its
    ``MultiscaleImage.downsamples[0]`` is then ``1 / tissue_hires_scalef`` and the napari layer
    needs it as ``scale`` so that the image and the spots (full-res px) align.
    """
    f = float(getattr(sample.image, "base_scale", sample.image.downsamples[0]))
    return f if np.isfinite(f) and f > 0 else 1.0


def spot_pitch_px(centers_rc: np.ndarray) -> float:
    """Median centre-to-nearest-centre distance in pixels (NaN for fewer than two spots)."""
    if len(centers_rc) < 2:
        return float("nan")
    from scipy.spatial import cKDTree

    d, _ = cKDTree(centers_rc).query(centers_rc, k=2)
    return float(np.median(d[:, 1]))


def side_offset(sample: "SpatialSample") -> tuple[float, float]:
    """Translation (rows, cols) that puts a second copy of the slide to the right of the first."""
    return (0.0, float(sample.width * (1.0 + Default.SIDE_BY_SIDE_GAP)))


# --------------------------------------------------------------------------- layers of a sample
def _meta(sample: "SpatialSample", role: str) -> dict[str, Any]:
    return {Key.LAYER_SAMPLE: sample, Key.LAYER_ROLE: role}


def image_layer(sample: "SpatialSample", *, name: str | None = None, role: str = ROLE_TISSUE,
                translate: tuple[float, float] = (0.0, 0.0)) -> LayerDataTuple:
    """The slide as a (multiscale) RGB image layer, lazily read level by level."""
    levels = sample.image.as_dask()
    s = image_scale(sample)
    kwargs: dict[str, Any] = {
        "name": name or f"{sample.name} tissue",
        "rgb": True,
        "scale": (s, s),
        "translate": translate,
        "metadata": _meta(sample, role),
    }
    if len(levels) > 1:
        kwargs["multiscale"] = True
        data: Any = list(levels)
    else:
        kwargs["multiscale"] = False
        data = levels[0]
    return data, kwargs, "image"


def slide_only_layer(image, path, *, name: str) -> LayerDataTuple:
    """A slide whose resolution is unknown, without spots: a plain RGB layer that remembers its
    file (``metadata[Key.LAYER_SOURCE]``) so the Predict widget can lay the spot grid over the
    tissue once the user gives the microns per pixel."""
    levels = image.as_dask()
    s = float(image.base_scale)
    kwargs: dict[str, Any] = {"name": name, "rgb": True, "scale": (s, s), "metadata": {Key.LAYER_SOURCE: str(path)},
                              "multiscale": len(levels) > 1}
    return (list(levels) if len(levels) > 1 else levels[0]), kwargs, "image"


def spot_features(sample: "SpatialSample") -> pd.DataFrame:
    """The light per-spot table shown in napari (spot id, array position, library size).

    The full expression matrix stays on ``metadata[Key.LAYER_SAMPLE]``: putting 15,000 gene
    columns into ``features`` would copy the matrix into pandas for nothing.
    """
    spots = sample.spots
    feats = pd.DataFrame({"spot": np.asarray(spots.index, dtype=str)})
    for col in (Key.ARRAY_ROW, Key.ARRAY_COL, Key.IN_TISSUE):
        if col in spots.columns:
            feats[col] = spots[col].to_numpy()
    counts = _aligned_counts(sample)
    if counts is not None:
        feats["total_counts"] = counts
    return feats


def _aligned_counts(sample: "SpatialSample") -> np.ndarray | None:
    adata = sample.expression
    if adata is None:
        return None
    x = adata.layers[Key.COUNTS] if Key.COUNTS in adata.layers else adata.X
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    s = pd.Series(totals, index=np.asarray(adata.obs_names, dtype=str))
    return s.reindex(np.asarray(sample.spots.index, dtype=str)).to_numpy()


def spots_layer(sample: "SpatialSample", *, name: str | None = None) -> LayerDataTuple:
    """All spots as hollow circles (diameter = spot diameter in full-resolution px)."""
    return (
        sample.centers_rc(),
        {
            "name": name or f"{sample.name} spots",
            "size": sample.spots[Key.DIAMETER].to_numpy(dtype=np.float64),
            "features": spot_features(sample),
            "face_color": "transparent",
            "border_color": "#00e5ff",
            "border_width": 0.08,
            "border_width_is_relative": True,
            "opacity": 0.7,
            "metadata": _meta(sample, ROLE_SPOTS),
        },
        "points",
    )


def sample_layers(sample: "SpatialSample") -> list[LayerDataTuple]:
    """What the reader gives napari for one sample: the tissue and its spots."""
    return [image_layer(sample), spots_layer(sample)]


# --------------------------------------------------------------------------- layers -> sample
def points_world_rc(points_layer) -> np.ndarray:
    """(N, 2) world (row, col) coordinates of a Points layer's points."""
    data = np.asarray(points_layer.data, dtype=np.float64)[:, -2:]
    return data * np.asarray(points_layer.scale, dtype=np.float64)[-2:] + np.asarray(points_layer.translate)[-2:]


def spots_table(points_layer, origin=(0.0, 0.0), prefix: str | None = None) -> pd.DataFrame:
    """A spot table from a (user-drawn) Points layer: centres relative to ``origin`` (world px)."""
    rc = points_world_rc(points_layer) - np.asarray(origin, dtype=np.float64)
    size = np.asarray(points_layer.size, dtype=np.float64).reshape(len(rc), -1)[:, -1]
    size = size * float(np.asarray(points_layer.scale)[-1])
    name = prefix or points_layer.name
    return pd.DataFrame({Key.ROW: rc[:, 0], Key.COL: rc[:, 1], Key.DIAMETER: size},
                        index=pd.Index([f"{name}-{i}" for i in range(len(rc))], name="spot"))


def _content_identity(level) -> str:
    import hashlib

    shape = tuple(int(v) for v in level.shape)
    k = max(1, int(np.ceil(np.sqrt(shape[0] * shape[1] / 4_000_000))))  # hash at most ~4 Mpx
    h = hashlib.sha256(str(shape).encode())
    h.update(np.ascontiguousarray(np.asarray(level[::k, ::k])).tobytes())
    return f"napari-layer:{h.hexdigest()[:16]}"


def sample_from_layers(image_layer, points_layer, mpp: float) -> "SpatialSample":
    """A SpatialSample from a plain RGB Image layer and a Points layer (no reader involved).

    Full-resolution pixels are the image layer's world units minus its translation (level 0 at
    ``scale``); the spot centres and diameters are taken from the Points layer in the same world.
    """
    from ..errors import InputError
    from ..io.image import MultiscaleImage
    from ..io.record import SpatialSample

    if not getattr(image_layer, "rgb", False):
        raise InputError(f"the image layer '{image_layer.name}' is not an RGB image",
                         hint="choose an H&E slide (RGB) layer")
    if not (mpp and mpp > 0 and np.isfinite(mpp)):
        raise InputError(f"the resolution of the image layer '{image_layer.name}' is unknown",
                         hint="set 'µm per pixel' in the widget (or open the slide with File > Open)")
    if points_layer is None or len(points_layer.data) == 0:
        raise InputError(f"no spots chosen for the image layer '{image_layer.name}'",
                         hint="choose a Points layer with the spot centres (draw one with the Points tool)")
    levels = list(image_layer.data) if image_layer.multiscale else [image_layer.data]
    s = float(np.asarray(image_layer.scale)[-1])
    h0 = levels[0].shape[0]
    downs = [s * h0 / lv.shape[0] for lv in levels]
    image = MultiscaleImage(levels, downs, identity=_content_identity(levels[-1]), kind="napari-layer",
                            source=image_layer.name)
    origin = np.asarray(image_layer.translate, dtype=np.float64)[-2:]
    spots = spots_table(points_layer, origin=origin)
    name = f"{image_layer.name}/{points_layer.name}"
    return SpatialSample(name=name, image=image, mpp=float(mpp), mpp_source="set in the Predict widget",
                         spots=spots, format="napari-layers",
                         provenance={"image": image_layer.name, "inputs": [], "image_identity": image.identity})


# --------------------------------------------------------------------------- expression -> colour
def gene_values(adata: "anndata.AnnData", gene: str, spot_ids, layer: str | None = None) -> np.ndarray:
    """One gene's values for ``spot_ids`` (NaN where a spot has no row), as float64.

    ``layer=None`` reads ``X`` (predictions); measured samples pass ``Key.LOGNORM``.
    """
    j = adata.var_names.get_loc(gene)
    m = adata.layers[layer] if layer is not None else adata.X
    col = m[:, j]
    col = np.asarray(col.toarray() if hasattr(col, "toarray") else col, dtype=np.float64).ravel()
    s = pd.Series(col, index=np.asarray(adata.obs_names, dtype=str))
    return s.reindex(np.asarray(list(spot_ids), dtype=str)).to_numpy()


def shared_limits(*arrays: np.ndarray, percentiles=Default.HEATMAP_PERCENTILES) -> tuple[float, float]:
    """One pair of contrast limits for all arrays (robust percentiles of the finite values)."""
    vals = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays if a is not None])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    if not hi > lo:
        lo, hi = float(vals.min()), float(vals.max())
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def uncertainty_limits(values: np.ndarray, percentile: float = Default.HEATMAP_PERCENTILES[1]) -> tuple[float, float]:
    """Contrast limits of an uncertainty map: from 0 (sure) to a robust maximum, so that the colour
    is proportional to the spread itself (a map of nearly equal spreads looks nearly uniform)."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    hi = float(np.percentile(vals, percentile)) if vals.size else 1.0
    return 0.0, hi if hi > 0 else 1.0


@dataclass
class Raster:
    """A spot heatmap resampled to a regular grid: ``data[i, j]`` is the value at world
    ``(translate[0] + i * step, translate[1] + j * step)``; NaN (drawn transparent) off-tissue."""

    data: np.ndarray
    step: float
    translate: tuple[float, float]


@dataclass
class RasterIndex:
    """Which spot paints each cell of the heatmap grid (-1: none). Built once per spot grid, so
    painting another gene is one fancy-indexing operation."""

    index: np.ndarray  # (H, W) int32
    step: float
    translate: tuple[float, float]

    def paint(self, values: np.ndarray) -> Raster:
        values = np.asarray(values, dtype=np.float32)
        out = np.full(self.index.shape, np.nan, np.float32)
        hit = self.index >= 0
        out[hit] = values[self.index[hit]]
        return Raster(out, self.step, self.translate)


def raster_geometry(centers_rc: np.ndarray, diameter_px: float) -> tuple[float, float]:
    """(grid step, fill radius) in full-res px for a spot grid."""
    ok_d = bool(np.isfinite(diameter_px) and diameter_px > 0)
    pitch = spot_pitch_px(centers_rc)
    if not np.isfinite(pitch) or pitch <= 0:
        pitch = diameter_px if ok_d else 1.0
    radius = max(Default.HEATMAP_TILE_PITCHES * pitch, 0.5 * diameter_px if ok_d else 0.0)
    step = (diameter_px if ok_d else pitch) / Default.HEATMAP_PX_PER_SPOT
    return max(step, 1.0), radius


def raster_index(centers_rc: np.ndarray, diameter_px: float) -> RasterIndex:
    """Assign each grid cell to its nearest spot within the fill radius.

    The cells tile the tissue like the spots' Voronoi cells (a continuous heatmap a pathologist
    reads like an overlay), but never reach further than ``HEATMAP_TILE_PITCHES`` pitches from a
    spot, so the edge of the measured area stays visible. The grid never exceeds
    ``HEATMAP_MAX_SIDE`` cells per side.
    """
    centers_rc = np.asarray(centers_rc, dtype=np.float64)
    step, radius = raster_geometry(centers_rc, diameter_px)
    if len(centers_rc) == 0:
        return RasterIndex(np.full((1, 1), -1, np.int32), step, (0.0, 0.0))
    lo = centers_rc.min(axis=0) - radius
    hi = centers_rc.max(axis=0) + radius
    span = hi - lo
    step = max(step, float(span.max()) / (Default.HEATMAP_MAX_SIDE - 1))
    n = np.maximum(np.floor(span / step).astype(int) + 1, 1)
    # candidate cells: the squares around each spot that can lie within the fill radius
    k = int(np.ceil(radius / step))
    ci = np.rint((centers_rc - lo) / step).astype(np.int64)
    cand = np.zeros((n[0], n[1]), bool)
    for dr in range(-k, k + 1):
        rr = np.clip(ci[:, 0] + dr, 0, n[0] - 1)
        for dc in range(-k, k + 1):
            cand[rr, np.clip(ci[:, 1] + dc, 0, n[1] - 1)] = True
    cells = np.flatnonzero(cand)
    pts = np.stack([lo[0] + step * (cells // n[1]), lo[1] + step * (cells % n[1])], axis=1)
    from scipy.spatial import cKDTree

    dist, nearest = cKDTree(centers_rc).query(pts, k=1, distance_upper_bound=radius)
    index = np.full(n[0] * n[1], -1, np.int32)
    hit = np.isfinite(dist)
    index[cells[hit]] = nearest[hit]
    return RasterIndex(index.reshape(n[0], n[1]), float(step), (float(lo[0]), float(lo[1])))


def rasterize(centers_rc: np.ndarray, values: np.ndarray, diameter_px: float) -> Raster:
    """One-off heatmap of ``values`` (see :func:`raster_index`)."""
    return raster_index(centers_rc, diameter_px).paint(values)


def heatmap_layer(raster: Raster, *, name: str, limits: tuple[float, float], sample: "SpatialSample",
                  role: str, offset: tuple[float, float] = (0.0, 0.0),
                  colormap: str = Default.HEATMAP_COLORMAP) -> LayerDataTuple:
    """A rasterised heatmap as an Image layer with a colour bar."""
    return (
        raster.data,
        {
            "name": name,
            "scale": (raster.step, raster.step),
            "translate": (raster.translate[0] + offset[0], raster.translate[1] + offset[1]),
            "colormap": colormap,
            "contrast_limits": limits,
            "opacity": Default.HEATMAP_OPACITY,
            "interpolation2d": "nearest",
            "metadata": _meta(sample, role),
        },
        "image",
    )


def uncertainty_layer(raster: Raster, *, gene: str, mode: str, limits: tuple[float, float],
                      sample: "SpatialSample") -> LayerDataTuple:
    """The predictor's uncertainty of ``gene`` as a heatmap over the predicted one: its own colormap,
    hidden until the user switches it on (the layer list's eye)."""
    data, kwargs, kind = heatmap_layer(raster, name=uncertainty_name(sample, gene, mode), limits=limits,
                                       sample=sample, role=ROLE_UNCERTAINTY, colormap=Default.UNCERTAINTY_COLORMAP)
    kwargs["visible"] = False
    return data, kwargs, kind


def uncertainty_name(sample: "SpatialSample", gene: str, mode: str) -> str:
    return f"{sample.name} {gene} uncertainty ({mode})"


def values_layer(sample: "SpatialSample", *, name: str, column: str, values: np.ndarray,
                 limits: tuple[float, float], role: str,
                 offset: tuple[float, float] = (0.0, 0.0)) -> LayerDataTuple:
    """Spots filled with a colour per value (``face_color=<feature>``, shared colormap/limits)."""
    feats = pd.DataFrame({"spot": np.asarray(sample.spots.index, dtype=str), column: values})
    return (
        sample.centers_rc(),
        {
            "name": name,
            "size": sample.spots[Key.DIAMETER].to_numpy(dtype=np.float64),
            "features": feats,
            "face_color": column,
            "face_colormap": Default.HEATMAP_COLORMAP,
            "face_contrast_limits": limits,
            "border_width": 0,
            "opacity": Default.SPOT_OPACITY,
            "translate": offset,
            "metadata": _meta(sample, role),
        },
        "points",
    )


__all__ = [
    "LayerDataTuple", "Raster", "image_scale", "spot_pitch_px", "side_offset", "image_layer",
    "spot_features", "spots_layer", "sample_layers", "gene_values", "shared_limits",
    "RasterIndex", "raster_index", "raster_geometry", "rasterize", "heatmap_layer", "values_layer",
    "uncertainty_limits", "uncertainty_layer",
]
