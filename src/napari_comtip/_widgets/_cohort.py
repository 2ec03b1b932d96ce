"""The Predict widget's "Predict all samples of this data set": the cohort engine off the GUI thread.

The same :func:`napari_comtip.engine.cohort.predict_cohort` as ``comtip predict --out FOLDER``
(one .h5ad per sample and ``summary.csv`` in the chosen folder, resumable, a failing sample fails
alone), with the widget's checkpoint, predictor, device and batch size, its progress bar (samples)
and its Cancel button (checked between samples and inside each one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..constants import Cohort, Key
from ..errors import ComtipError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from .predict import PredictWidget


def dataset_of(widget: "PredictWidget") -> str:
    """The data set the chosen slide layer was opened from (raises :class:`InputError` otherwise)."""
    name = widget.slide_box.currentText()
    if not name or name not in widget.viewer.layers:
        raise InputError("no slide is open", hint="open a data set with File > Open")
    sample = widget.viewer.layers[name].metadata.get(Key.LAYER_SAMPLE)
    root = sample.provenance.get("root") if sample is not None else None
    if not root:
        raise InputError(f"'{name}' was not opened from a data set",
                         hint="open the data set folder with File > Open, or use comtip predict --manifest")
    return str(root)


def _ask_folder(widget: "PredictWidget") -> str | None:
    from qtpy.QtWidgets import QFileDialog

    return QFileDialog.getExistingDirectory(widget, "Folder for the predictions (one .h5ad per sample)") or None


def start_cohort(widget: "PredictWidget", out_dir: str | os.PathLike | None = None):
    """Start predicting every sample of the slide's data set into ``out_dir``; the worker, or None."""
    if widget.worker is not None:
        return None
    from ..io.manifest import check_items, expand_paths

    try:
        root = dataset_of(widget)
        out_dir = out_dir if out_dir is not None else _ask_folder(widget)
        if out_dir is None:
            return None
        items = expand_paths([root], out_dir)
        check_items(items, out_dir)
    except ComtipError as exc:
        widget._error(str(exc))
        return None
    from napari.qt.threading import create_worker

    from ..engine.cohort import predict_cohort

    ckpt, mode, device = widget.checkpoint(), widget.mode_box.currentText(), widget.device_box.currentText()
    batch = widget.batch_spin.value() or None
    widget._cancel.clear()
    widget.last_error = None
    relay = widget._relay

    def job():
        try:
            return predict_cohort(items, out_dir, checkpoint=ckpt, mode=mode, device=device, batch_size=batch,
                                  distributed=False, cancel=widget._cancel,
                                  progress=relay.callback(lambda d, t, m: f"sample {int(d) + 1}/{t}: {m}"
                                                          if t and d < t else (m or "")))
        except ComtipError as exc:
            return exc

    worker = create_worker(job, _start_thread=False, _connect={"errored": widget._on_crash})
    worker.returned.connect(lambda result: _on_returned(widget, result))
    worker.finished.connect(widget._on_finished)
    widget.worker = worker
    widget.cohort_result = None
    widget.run_button.setEnabled(False)
    widget.predict_all_button.setEnabled(False)
    widget.cancel_button.setEnabled(True)
    widget.progress_bar.setRange(0, len(items))
    widget.progress_bar.setValue(0)
    widget.status_label.setText(f"predicting {len(items)} samples of {Path(root).name} …")
    worker.start()
    return worker


def _on_returned(widget: "PredictWidget", result) -> None:
    from ._progress import notify_info

    if isinstance(result, ComtipError):
        widget.status_label.setText("failed: see the notification")
        widget._error(str(result))
        return
    widget.cohort_result = result
    c = result.counts
    text = (f"{len(result.rows)} samples: {c[Cohort.OK]} predicted, {c[Cohort.SKIPPED]} already done, "
            f"{c[Cohort.FAILED]} failed" + (", cancelled" if result.cancelled else "")
            + f"; summary in {result.summary}")
    widget.status_label.setText(text)
    if result.n_failed:
        widget._error(text)
    else:
        notify_info(text)


__all__ = ["start_cohort", "dataset_of"]
