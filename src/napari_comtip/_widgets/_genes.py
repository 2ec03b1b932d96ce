"""The Predict widget's gene view (Qt): the gene list of a finished prediction, recolouring the
layers by the chosen gene, Pearson r against the measured expression, and the one-line error for
a gene outside the checkpoint's panel. A mixin of
:class:`~napari_comtip._widgets.predict.PredictWidget` (its ``gene_box``, ``display``,
``status_label``, ``pcc_label`` and export buttons)."""

from __future__ import annotations

import numpy as np

from ..errors import ComtipError, InputError
from ._display import GeneView
from ._progress import notify_warning
from ._session import Prediction


class GeneChoice:
    """Show a prediction gene by gene."""

    def set_prediction(self, prediction: Prediction, gene: str | None = None) -> None:
        """Show a finished prediction: fill the gene list and colour the layers."""
        self.prediction = prediction
        reused = "encoder reused" if not prediction.encoder_ran else "encoder ran"
        self.status_label.setText(f"{prediction.sample.name}: {prediction.adata.n_obs} spots x "
                                  f"{prediction.adata.n_vars} genes, {prediction.mode}, ran on {prediction.device}, "
                                  f"{prediction.seconds:.1f} s ({reused})"
                                  + "".join(f"\nwarning: {w}" for w in prediction.warnings))
        for w in prediction.warnings:
            notify_warning(w)
        previous = self.gene_box.currentText()
        genes = sorted(prediction.genes, key=str.upper)
        self.gene_box.blockSignals(True)
        self.gene_box.clear()
        self.gene_box.addItems(genes)
        self.gene_box.blockSignals(False)
        self.gene_box.setEnabled(True)
        for b in (self.export_h5ad_button, self.export_csv_button):
            b.setEnabled(True)
        chosen = gene or (previous if previous in prediction.adata.var_names else None) or self._default_gene(prediction)
        self.show_gene(chosen)

    @staticmethod
    def _default_gene(prediction: Prediction) -> str:
        """The gene whose prediction varies most across the slide (the most informative map)."""
        x = prediction.adata.X
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        return str(prediction.adata.var_names[int(np.nanargmax(np.nanvar(x, axis=0)))])

    def show_gene(self, gene: str) -> GeneView | None:
        """Recolour the prediction layers by ``gene``; unknown genes give a notification."""
        if self.prediction is None:
            self._error("no prediction yet: press Run first")
            return None
        gene = gene.strip()
        expr = self.prediction.sample.expression
        if expr is not None:  # a feature id (e.g. ENSMUSG...) names its symbol
            from ..io.expression import symbols_for

            gene = symbols_for([gene], expr.var)[0]
        match = [g for g in self.prediction.genes if g.upper() == gene.upper()]
        try:
            if not match:
                raise self._not_in_panel(gene)
            view = self.display.show(self.prediction, match[0])
        except ComtipError as exc:
            self._error(str(exc))
            return None
        if self.gene_box.currentText() != view.gene:
            self.gene_box.setCurrentText(view.gene)
        self.last_view = view
        lo, hi = view.limits
        if view.measured:
            self.pcc_label.setText(f"{view.gene}: Pearson r = {view.pearson_r:.3f} between predicted and measured "
                                   f"over {view.n_spots} spots (colour scale {lo:.2f}–{hi:.2f}, shared)")
        else:
            self.pcc_label.setText(f"{view.gene}: not measured on this slide (colour scale {lo:.2f}–{hi:.2f})")
        return view

    def _not_in_panel(self, gene: str) -> InputError:
        """A gene outside the panel; names the bundled checkpoint that has it (another species or panel)."""
        from ..model.catalogue import bundled_with_gene

        ck = self.prediction.checkpoint
        other = (bundled_with_gene(gene, exclude=ck) if ck else [])[:1]
        has = f"; the bundled checkpoint {other[0][0]} has it as {other[0][1]}" if other else ""
        return InputError(f"gene '{gene}' is not in the checkpoint's panel ({self.prediction.adata.n_vars} genes){has}",
                          hint=f"choose {other[0][0]} under Checkpoint and press Run" if other
                          else "pick one from the list (type to search)")

    def _toggle_heatmap(self, on: bool) -> None:
        self.display.heatmap = bool(on)
        if self.prediction is not None and self.last_view is not None:
            self.show_gene(self.last_view.gene)


__all__ = ["GeneChoice"]
