"""Shows one gene of a prediction in a napari viewer (the Predict widget and ``comtip view``).

Layers it owns (created on first use, updated in place afterwards, re-created if the user
deleted one):

* ``<sample> predicted``: Points coloured by the predicted value of the chosen gene
  (``features[<gene>]``, ``face_color=<gene>``, shared colormap and contrast limits);
* ``<sample> predicted heatmap``: optional rasterised Image of the same values, with a colour bar;
* ``<sample> <gene> uncertainty (<predictor>)``: when the prediction has ``layers[Key.UNCERTAINTY]``,
  the predictor's spread for the gene as a heatmap over the predicted one, in its own colormap
  from 0 (sure) up; hidden when first made (switch it on with its eye), then left as the user set it;
* when the slide has measured expression for the gene: ``<sample> measured`` (+ heatmap) on the
  **same** colour scale, beside the predicted view (a second, lazily shared copy of the tissue to
  the right of the slide), so the two maps are read side by side at one zoom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import Key
from ..engine.evaluation import pearson_r
from . import _layers as L

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from ..io.record import SpatialSample
    from ._session import Prediction


ROLE_POINTS_OF = {L.ROLE_HEAT_PREDICTED: L.ROLE_PREDICTED, L.ROLE_HEAT_MEASURED: L.ROLE_MEASURED}


@dataclass
class GeneView:
    """What the widget reports after showing a gene."""

    gene: str
    limits: tuple[float, float]
    measured: bool
    pearson_r: float
    n_spots: int
    uncertainty: tuple[float, float] | None = None  # its colour scale, when the prediction has one


def measured_values(sample: "SpatialSample", gene: str) -> np.ndarray | None:
    """Log-normalised measured expression of ``gene`` per spot, or None when not measured."""
    adata = sample.expression
    if adata is None or gene not in adata.var_names:
        return None
    layer = Key.LOGNORM if Key.LOGNORM in adata.layers else None
    return L.gene_values(adata, gene, sample.spot_ids, layer=layer)


class ExpressionDisplay:
    """Owns the prediction layers of one viewer."""

    def __init__(self, viewer: "napari.Viewer") -> None:
        self.viewer = viewer
        self._layers: dict[str, Any] = {}
        self._raster_index: tuple[str, L.RasterIndex] | None = None
        self.heatmap = True

    # ------------------------------------------------------------------ helpers
    def layer(self, role: str):
        """The live layer of ``role`` or None (also when the user deleted it)."""
        lyr = self._layers.get(role)
        if lyr is not None and lyr in self.viewer.layers:
            return lyr
        self._layers.pop(role, None)
        return None

    def _set(self, role: str, ldt: L.LayerDataTuple):
        """Create the layer for ``ldt`` or update the existing one of ``role`` in place."""
        data, kwargs, kind = ldt
        lyr = self.layer(role)
        if lyr is not None and lyr.metadata.get(Key.LAYER_SAMPLE) is not kwargs["metadata"][Key.LAYER_SAMPLE]:
            self.viewer.layers.remove(lyr)
            lyr = None
        if lyr is None:
            add = getattr(self.viewer, f"add_{kind}")
            lyr = add(data, **kwargs)
            self._layers[role] = lyr
            return lyr, True
        return lyr, False

    def _remove(self, role: str) -> None:
        lyr = self.layer(role)
        if lyr is not None:
            self.viewer.layers.remove(lyr)
        self._layers.pop(role, None)

    def _index(self, sample: "SpatialSample") -> L.RasterIndex:
        key = f"{sample.identity}|{id(sample.spots)}"
        if self._raster_index is None or self._raster_index[0] != key:
            self._raster_index = (key, L.raster_index(sample.centers_rc(), sample.spot_diameter_px()))
        return self._raster_index[1]

    # ------------------------------------------------------------------ points
    def _points(self, role: str, sample, gene: str, values, limits, name: str, offset) -> None:
        ldt = L.values_layer(sample, name=name, column=gene, values=values, limits=limits, role=role,
                             offset=offset)
        lyr, created = self._set(role, ldt)
        if created:
            return
        lyr.name = name
        feats = ldt[1]["features"]
        if gene not in lyr.features.columns:  # add the new column before dropping the one coloured now
            both = lyr.features.copy()
            both[gene] = feats[gene].to_numpy()
            lyr.features = both
        lyr.face_color = gene  # colour by this feature column
        lyr.features = feats
        lyr.face_colormap = ldt[1]["face_colormap"]
        lyr.face_contrast_limits = limits
        lyr.refresh_colors(update_color_mapping=False)

    def _raster(self, role: str, sample, values, limits, name: str, offset) -> None:
        raster = self._index(sample).paint(values)
        ldt = L.heatmap_layer(raster, name=name, limits=limits, sample=sample, role=role, offset=offset)
        lyr, created = self._set(role, ldt)
        if not created:
            lyr.name = name
            lyr.data = raster.data
            lyr.contrast_limits = limits
        lyr.colorbar.visible = True
        pts = self.layer(ROLE_POINTS_OF[role])
        if pts is not None:  # the heatmap lies under its spots (hovering a spot shows its value)
            i, j = self.viewer.layers.index(lyr), self.viewer.layers.index(pts)
            if i > j:
                self.viewer.layers.move(i, j)

    # ------------------------------------------------------------------ entry point
    def show(self, prediction: "Prediction", gene: str) -> GeneView:
        """Colour the predicted (and measured) layers by ``gene``; return limits and Pearson r."""
        if gene not in prediction.adata.var_names:
            from ..errors import InputError

            raise InputError(f"gene '{gene}' is not in the checkpoint's panel",
                             hint="pick a gene from the list (type to search)")
        sample = prediction.sample
        pred = L.gene_values(prediction.adata, gene, sample.spot_ids)
        meas = measured_values(sample, gene)
        limits = L.shared_limits(pred, meas)
        title = f"{sample.name} predicted {gene} ({prediction.mode})"
        self._points(L.ROLE_PREDICTED, sample, gene, pred, limits, title, (0.0, 0.0))
        if self.heatmap:
            self._raster(L.ROLE_HEAT_PREDICTED, sample, pred, limits, f"{title} heatmap", (0.0, 0.0))
        else:
            self._remove(L.ROLE_HEAT_PREDICTED)

        r = float("nan")
        if meas is not None:
            off = L.side_offset(sample)
            ldt = L.image_layer(sample, name=f"{sample.name} tissue (measured side)", role=L.ROLE_TISSUE_COPY,
                                translate=off)
            copy, created = self._set(L.ROLE_TISSUE_COPY, ldt)
            if created:  # at the bottom: it lies beside the slide, under the measured layers
                self.viewer.layers.move(self.viewer.layers.index(copy), 0)
            mtitle = f"{sample.name} measured {gene}"
            self._points(L.ROLE_MEASURED, sample, gene, meas, limits, mtitle, off)
            if self.heatmap:
                self._raster(L.ROLE_HEAT_MEASURED, sample, meas, limits, f"{mtitle} heatmap", off)
            else:
                self._remove(L.ROLE_HEAT_MEASURED)
            r = pearson_r(pred, meas)
        else:
            for role in (L.ROLE_MEASURED, L.ROLE_HEAT_MEASURED, L.ROLE_TISSUE_COPY):
                self._remove(role)
        # keep the colour bar of the predicted heatmap on top, and the spots outline hidden
        for lyr in self.viewer.layers:
            if lyr.metadata.get(Key.LAYER_ROLE) == L.ROLE_SPOTS and lyr.metadata.get(Key.LAYER_SAMPLE) is sample:
                lyr.visible = False
        heat_m = self.layer(L.ROLE_HEAT_MEASURED)
        if heat_m is not None:
            heat_m.colorbar.visible = False  # one colour bar: both maps share the scale
        ulim = self._uncertainty(prediction, sample, gene)
        self._caption(sample, gene, prediction.mode, limits, meas is not None, r, ulim)
        pts = self.layer(L.ROLE_PREDICTED)
        if pts is not None:  # hovering shows the predicted value of the spot under the cursor
            self.viewer.layers.selection.active = pts
        return GeneView(gene=gene, limits=limits, measured=meas is not None, pearson_r=r, n_spots=len(pred),
                        uncertainty=ulim)

    def _uncertainty(self, prediction: "Prediction", sample, gene: str) -> tuple[float, float] | None:
        """The uncertainty heatmap of ``gene`` (see the module docstring); its limits, or None."""
        if Key.UNCERTAINTY not in prediction.adata.layers:
            self._remove(L.ROLE_UNCERTAINTY)
            return None
        unc = L.gene_values(prediction.adata, gene, sample.spot_ids, layer=Key.UNCERTAINTY)
        limits = L.uncertainty_limits(unc)
        raster = self._index(sample).paint(unc)
        lyr, created = self._set(L.ROLE_UNCERTAINTY, L.uncertainty_layer(raster, gene=gene, mode=prediction.mode,
                                                                          limits=limits, sample=sample))
        if not created:  # keep the user's visibility and opacity
            lyr.name = L.uncertainty_name(sample, gene, prediction.mode)
            lyr.data = raster.data
            lyr.contrast_limits = limits
        lyr.colorbar.visible = True  # drawn only while the layer is shown
        top = len(self.viewer.layers) - 1
        i = self.viewer.layers.index(lyr)
        if i != top:  # above the predicted spots, so that switching it on shows it
            self.viewer.layers.move(i, top)
        return limits

    def _caption(self, sample, gene: str, mode: str, limits, measured: bool, r: float,
                 uncertainty: tuple[float, float] | None = None) -> None:
        """What the canvas shows, in words (also in every screenshot)."""
        lines = [f"{sample.name}  {gene}: log-normalised expression",
                 f"colour scale {limits[0]:.2f} to {limits[1]:.2f}" + (" (shared)" if measured else "")]
        if measured:
            corr = f", Pearson r = {r:.2f}" if np.isfinite(r) else ""
            lines.append(f"left: predicted ({mode}), right: measured{corr}")
        else:
            lines.append(f"predicted ({mode}); not measured on this slide")
        if uncertainty is not None:
            lines.append(f"uncertainty map: layer '{gene} uncertainty', SD 0 to {uncertainty[1]:.2f}")
        text = "\n".join(x for x in lines if x)
        overlay = self.viewer.text_overlay
        overlay.text = text
        overlay.position = "bottom_left"
        overlay.font_size = 11
        overlay.color = "white"
        overlay.visible = True

    def clear(self) -> None:
        for role in list(self._layers):
            self._remove(role)


__all__ = ["ExpressionDisplay", "GeneView", "measured_values"]
