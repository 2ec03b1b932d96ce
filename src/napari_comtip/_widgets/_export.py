"""The Predict widget's export (Qt): the prediction as ``.h5ad`` (the layout of ``comtip predict``)
or CSV (io/export_csv.py), atomically, never over an input of the prediction and never under a
silently changed name. A mixin of :class:`~napari_comtip._widgets.predict.PredictWidget`."""

from __future__ import annotations

import os
from pathlib import Path

from qtpy.QtWidgets import QFileDialog

from ..errors import ComtipError, InputError
from ._progress import notify_info


class PredictionExport:
    """Export ``self.prediction`` (errors through ``self._error``)."""

    def _input_paths(self) -> list[str]:
        """Files the prediction was made from (slide, counts, checkpoint): never export over them."""
        if self.prediction is None:
            return []
        inputs = list(self.prediction.provenance.get("inputs") or [])
        inputs += list(self.prediction.sample.provenance.get("inputs") or [])
        return [str(p) for p in inputs if p]

    def _target(self, path, title: str, filt: str, suffix: str) -> tuple[Path, bool] | None:
        """(output path, whether the user already confirmed replacing it), or None after an error.

        An input of the prediction is refused first; a name without a suffix gets ``suffix``; a
        name with another suffix is refused (never silently renamed next to someone's data).
        """
        if self.prediction is None:
            self._error("no prediction to export: press Run first")
            return None
        confirmed = False
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(self, title, f"{self.prediction.sample.name}-predicted{suffix}",
                                                    filt)
            if not chosen:
                return None
            path, confirmed = chosen, True  # the dialog asked before replacing an existing file
        out = Path(path).expanduser()
        inputs = {Path(p).expanduser().resolve() for p in self._input_paths()}
        if out.resolve() in inputs:
            self._error(str(InputError("refusing to write over an input of this prediction", path=out,
                                       hint="choose another file name")))
            return None
        if not out.suffix:
            out = out.with_name(out.name + suffix)
        elif out.suffix.lower() != suffix:
            self._error(str(InputError(f"the export must be a {suffix} file", path=out,
                                       hint=f"name it e.g. {self.prediction.sample.name}-predicted{suffix}")))
            return None
        return out, confirmed

    def export_h5ad(self, path: str | os.PathLike | None = None, overwrite: bool = False) -> Path | None:
        """Write the prediction as ``.h5ad`` (same layout as ``comtip predict``)."""
        from ..io.writers import write_h5ad_atomic

        def done(written) -> str:
            adata = self.prediction.adata
            return f"wrote {adata.n_obs} spots x {adata.n_vars} genes to {written}"

        return self._export(path, overwrite, write_h5ad_atomic, "Export predictions", "AnnData (*.h5ad)", ".h5ad", done)

    def export_csv(self, path: str | os.PathLike | None = None, overwrite: bool = False) -> Path | None:
        """Write the prediction as a CSV table (io/export_csv.py: units, provenance lines, uncertainty)."""
        from ..io.writers import write_prediction_csv_atomic

        return self._export(path, overwrite, write_prediction_csv_atomic, "Export predictions as CSV",
                            "CSV table (*.csv)", ".csv", lambda written: f"wrote {written}")

    def _export(self, path, overwrite: bool, write, title: str, file_filter: str, suffix: str, done) -> Path | None:
        """Choose the target, write through ``write`` (atomic, inputs protected); errors as one line."""
        target = self._target(path, title, file_filter, suffix)
        if target is None:
            return None
        out, confirmed = target
        try:
            written = write(self.prediction.adata, out, overwrite=overwrite or confirmed, protect=self._input_paths())
        except ComtipError as exc:
            self._error(str(exc))
            return None
        except OSError as exc:  # disk full, read-only folder: one line naming the file
            self._error(f"{exc.filename or out}: {exc.strerror or exc}")
            return None
        notify_info(done(written))
        return Path(written)


__all__ = ["PredictionExport"]
