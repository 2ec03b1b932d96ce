"""The "Predict expression" dock widget.

Choose a slide (and optionally another spots layer), a checkpoint (a bundled one by name, or a
.pt file), a predictor, a device and a batch size; *Run* embeds every spot patch off the GUI
thread (progress bar, *Cancel*) and predicts the checkpoint's whole gene panel through the same
engine call as ``comtip predict``. Then pick a gene (type to search): the predicted layers are
recoloured at once, the measured expression (when the slide has it) is shown beside on the same
colour scale, with the gene's Pearson r. *Export* writes the prediction as ``.h5ad`` (the format
of ``comtip predict``) or CSV, atomically and never over an input.

Image embeddings are cached per (slide, spot grid, checkpoint, patch size) in
:class:`~napari_comtip._widgets._session.PredictSession`: changing the gene re-runs nothing,
changing the predictor re-runs only the predictor. The checkpoint chooser's part is in
``_checkpoints.py``, the gene view in ``_genes.py`` and the export in ``_export.py`` (mixins).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image, Points
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QCompleter, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel,
    QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from ..constants import PREDICT_MODES, Default, Key
from ..errors import Cancelled, ComtipError, InputError
from ..progress import CancelToken
from . import _layers as L
from ._checkpoints import CheckpointChoice, checkpoint_box as _checkpoint_box
from ._compat import preload_model_stack
from ._display import ExpressionDisplay, GeneView
from ._export import PredictionExport
from ._genes import GeneChoice
from ._progress import ProgressRelay, notify_error, notify_info
from ._session import Prediction, PredictSession

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from ..io.record import SpatialSample

_OWN_SPOTS = "(spots of the slide)"


@dataclasses.dataclass
class _Failure:
    error: ComtipError


def spots_from_points(layer, sample: "SpatialSample") -> "SpatialSample":
    """``sample`` with its spots replaced by a (user-drawn or edited) Points layer's points."""
    if len(layer.data) == 0:
        raise InputError(f"the spots layer '{layer.name}' has no points", hint="add points or choose another layer")
    return dataclasses.replace(sample, name=f"{sample.name}/{layer.name}", spots=L.spots_table(layer),
                               expression=None)


class PredictWidget(CheckpointChoice, GeneChoice, PredictionExport, QWidget):
    """Predict expression for every spot of a slide and explore it gene by gene."""

    def __init__(self, napari_viewer: "napari.Viewer", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        preload_model_stack()  # before any worker thread touches torch (see _compat.py)
        self.viewer = napari_viewer
        self.session = PredictSession()
        self.display = ExpressionDisplay(napari_viewer)
        self.prediction: Prediction | None = None
        self.last_view: GeneView | None = None
        self.worker = None
        self.cohort_result = None  # the last "Predict all samples" run (engine.cohort.CohortResult)
        self.last_error: str | None = None  # the last message shown as an error notification
        self._bare_samples: dict[tuple[str, float], "SpatialSample"] = {}
        self._cancel = CancelToken()
        self._relay = ProgressRelay()
        self._relay.progress.connect(self._on_progress)
        self._build()
        self._refresh_layers()
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._refresh_layers)

    def _error(self, msg: str) -> None:
        self.last_error = msg
        notify_error(msg)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        from ..engine.device import available_devices

        self.slide_box = QComboBox()
        self.slide_box.setToolTip("the slide opened with File > Open (or File > Open Sample)")
        self.spots_box = QComboBox()
        self.spots_box.setToolTip("which spots to predict: the slide's own, or a Points layer you drew")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSpecialValueText("from the slide")
        self.mpp_spin.setToolTip("microns per pixel, needed only for an image layer not opened by this plugin")
        self.checkpoint_box = _checkpoint_box()
        browse = QPushButton("Browse…")
        browse.setToolTip("choose a checkpoint file (.pt), e.g. the model.pt of a run of Pretrain")
        browse.clicked.connect(self._browse_checkpoint)
        ck_row = QHBoxLayout()
        ck_row.addWidget(self.checkpoint_box, 1)
        ck_row.addWidget(browse)
        self.mode_box = QComboBox()
        self.mode_box.addItems(list(PREDICT_MODES))
        self.mode_box.setCurrentText(Default.PREDICT_MODE)
        self.mode_box.setToolTip("zero-shot: no reference data; retrieval: average of the most similar "
                                 "reference spots; probe: ridge regression on image features")
        self.device_box = QComboBox()
        self.device_box.addItems(available_devices())
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 4096)
        self.batch_spin.setSpecialValueText("auto")
        self.batch_spin.setValue(0)

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.predict_all_button = QPushButton("Predict all samples of this data set…")
        self.predict_all_button.setToolTip("every sample of the slide's data set into a folder (resumable; "
                                           "the same as comtip predict --out FOLDER)")
        self.predict_all_button.clicked.connect(lambda: self.predict_all())
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        self.gene_box = QComboBox()
        self.gene_box.setEditable(True)
        self.gene_box.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.gene_box.lineEdit().setPlaceholderText("type a gene symbol")
        completer = QCompleter(self.gene_box.model(), self.gene_box)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        self.gene_box.setCompleter(completer)
        self.gene_box.setEnabled(False)
        self.gene_box.activated.connect(lambda _i: self.show_gene(self.gene_box.currentText()))
        self.gene_box.lineEdit().returnPressed.connect(lambda: self.show_gene(self.gene_box.currentText()))
        self.heatmap_check = QCheckBox("heatmap image with colour bar")
        self.heatmap_check.setChecked(True)
        self.heatmap_check.toggled.connect(self._toggle_heatmap)
        self.pcc_label = QLabel("")
        self.pcc_label.setWordWrap(True)

        self.export_h5ad_button = QPushButton("Export .h5ad…")
        self.export_h5ad_button.clicked.connect(lambda: self.export_h5ad())
        self.export_csv_button = QPushButton("Export CSV…")
        self.export_csv_button.clicked.connect(lambda: self.export_csv())
        exp_row = QHBoxLayout()
        exp_row.addWidget(self.export_h5ad_button)
        exp_row.addWidget(self.export_csv_button)
        for b in (self.export_h5ad_button, self.export_csv_button):
            b.setEnabled(False)

        form = QFormLayout()
        form.addRow("Slide", self.slide_box)
        form.addRow("Spots", self.spots_box)
        form.addRow("µm per pixel", self.mpp_spin)
        form.addRow("Checkpoint", ck_row)
        form.addRow("Predictor", self.mode_box)
        form.addRow("Device", self.device_box)
        form.addRow("Batch size", self.batch_spin)
        form2 = QFormLayout()
        form2.addRow("Gene", self.gene_box)
        outer = QVBoxLayout(self)
        outer.addLayout(form)
        outer.addLayout(run_row)
        outer.addWidget(self.predict_all_button)
        outer.addWidget(self.progress_bar)
        outer.addWidget(self.status_label)
        outer.addLayout(form2)
        outer.addWidget(self.heatmap_check)
        outer.addWidget(self.pcc_label)
        outer.addLayout(exp_row)
        outer.addStretch(1)

    # ------------------------------------------------------------------ layer choices
    def _refresh_layers(self, *_: Any) -> None:
        slide, spots = self.slide_box.currentText(), self.spots_box.currentText()
        self.slide_box.clear()
        self.spots_box.clear()
        self.spots_box.addItem(_OWN_SPOTS)
        for lyr in self.viewer.layers:
            role = lyr.metadata.get(Key.LAYER_ROLE)
            if role == L.ROLE_TISSUE and lyr.metadata.get(Key.LAYER_SAMPLE) is not None:
                self.slide_box.addItem(lyr.name)
            elif role is None and isinstance(lyr, Image) and lyr.rgb:
                self.slide_box.addItem(lyr.name)  # a plain slide layer: needs spots and µm/px
            elif isinstance(lyr, Points) and role in (None, L.ROLE_SPOTS):
                self.spots_box.addItem(lyr.name)
        if slide and self.slide_box.findText(slide) >= 0:
            self.slide_box.setCurrentText(slide)
        if spots and self.spots_box.findText(spots) >= 0:
            self.spots_box.setCurrentText(spots)

    def current_sample(self) -> "SpatialSample":
        """The sample to predict, from the chosen slide layer (and spots layer)."""
        return self._sample_provider()()

    def _sample_provider(self):
        """A zero-argument function returning the sample; user errors are raised here, at once."""
        name = self.slide_box.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no slide is open",
                             hint="open a slide with File > Open, or the sample section with File > Open Sample")
        slide = self.viewer.layers[name]
        sample = slide.metadata.get(Key.LAYER_SAMPLE)
        spots = self.spots_box.currentText()
        if sample is None:  # a plain image layer
            source = slide.metadata.get(Key.LAYER_SOURCE)
            if source and spots == _OWN_SPOTS:
                return self._bare_sample(source)
            pts = self.viewer.layers[spots] if spots in self.viewer.layers else None
            made = L.sample_from_layers(slide, pts, self.mpp_spin.value())
            return lambda: made
        if spots and spots != _OWN_SPOTS and spots in self.viewer.layers:
            lyr = self.viewer.layers[spots]
            own = lyr.metadata.get(Key.LAYER_SAMPLE)
            if own is None:
                made = spots_from_points(lyr, sample)
                return lambda: made
            if own is not sample:
                raise InputError(f"the spots layer '{spots}' belongs to another slide ({own.name})",
                                 hint=f"choose the spots of {sample.name} or '{_OWN_SPOTS}'")
        return lambda: sample

    def _bare_sample(self, source: str):
        """Provider of the slide file with a spot grid over its tissue at the µm/px set here."""
        mpp = self.mpp_spin.value()
        if not mpp > 0:
            raise InputError(f"the resolution of {Path(source).name} is unknown",
                             hint="set 'µm per pixel' (e.g. 0.5 for a 20x scan), then press Run")
        key = (source, round(mpp, 6))

        def load():
            if key not in self._bare_samples:
                from ..io import load_sample

                self._bare_samples[key] = load_sample(source, mpp=mpp)
            return self._bare_samples[key]

        return load

    # ------------------------------------------------------------------ run / cancel
    def run(self):
        """Start a prediction off the GUI thread; returns the worker (None if nothing started)."""
        if self.worker is not None:
            return None
        try:
            get_sample = self._sample_provider()
        except ComtipError as exc:
            self._error(str(exc))
            return None
        from napari.qt.threading import create_worker

        preload_model_stack()
        ckpt, mode, device = self.checkpoint(), self.mode_box.currentText(), self.device_box.currentText()
        batch = self.batch_spin.value() or None
        self._cancel.clear()
        self.last_error = None
        relay = self._relay

        def job():
            try:
                sample = get_sample()  # a bare slide is gridded here, off the GUI thread
                return self.session.predict(sample, ckpt, mode=mode, device=device, batch_size=batch,
                                            progress=relay.callback(), cancel=self._cancel)
            except ComtipError as exc:  # shown as a notification, not a traceback; wrapped because
                return _Failure(exc)    # a worker that *returns* an exception re-raises it

        self.worker = create_worker(job, _start_thread=False, _connect={"errored": self._on_crash})
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, 0)
        self.status_label.setText(f"predicting {self.slide_box.currentText()} ({mode}) …")
        self.worker.start()
        return self.worker

    def predict_all(self, out_dir: str | os.PathLike | None = None):
        """Predict every sample of the slide's data set into ``out_dir`` (asked when None); the worker."""
        from ._cohort import start_cohort

        return start_cohort(self, out_dir)

    def cancel(self) -> None:
        """Ask the running prediction to stop at the next batch."""
        if self.worker is not None:
            self._cancel.set()
            self.status_label.setText("cancelling …")

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
        if message:
            self.status_label.setText(message)

    def _on_returned(self, result) -> None:
        if isinstance(result, _Failure):
            result = result.error
        if isinstance(result, Cancelled):
            self.status_label.setText("cancelled")
            notify_info(str(result))
            return
        if isinstance(result, ComtipError):
            self.status_label.setText("failed: see the notification")
            self._error(str(result))
            return
        self.set_prediction(result)

    def _on_crash(self, exc: BaseException) -> None:  # a bug: napari shows the traceback
        self.status_label.setText(f"failed: {type(exc).__name__}: {exc}")
        self._error(f"prediction failed: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.predict_all_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self.prediction is not None else 0)


__all__ = ["PredictWidget", "spots_from_points"]
