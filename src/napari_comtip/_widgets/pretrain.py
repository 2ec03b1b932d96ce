"""The "Pretrain CoMTIP" dock widget: a thin launcher over ``comtip pretrain``.

It assembles the same command line a user would type (``comtip pretrain --preset tiny ...``,
shown in the widget and in its log; the presets are the packaged ones, ``comtip presets``),
runs it as a subprocess (``python -m napari_comtip pretrain ...`` through :class:`QProcess`, so
napari stays responsive and a crash of the run cannot take napari down), follows the run's
``metrics.csv`` for live loss curves and its progress output for the progress bar, and can
cancel (terminate the process; the last checkpoint stays) and resume (``--resume`` with the
run's own ``config.yaml``). *Use in Predict* loads the finished ``model.pt`` into the Predict
expression widget.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QProcess, Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QListWidget, QPlainTextEdit,
    QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from ..constants import Default
from ._compat import guard_triton

guard_triton()  # engine.run_folder imports torch (see _compat.py)
from ..engine.run_folder import CONFIG_FILE as RUN_CONFIG
from ..engine.run_folder import FINAL_FILE, METRICS_FILE
from ..model.presets import DEFAULT_PRESET, preset_names, preset_purpose
from ._loss_plot import LossPlot, read_metrics_rows

if TYPE_CHECKING:  # pragma: no cover
    import napari

_YAML_ITEM = "YAML file…"
_TQDM = re.compile(r"pretrain:\s*\d+%.*?\|\s*(\d+)/(\d+)")
_ERROR = re.compile(r"^error: (.+)$", re.M)


_LAUNCH = [sys.executable, "-m", "napari_comtip"]  # how the widget runs `comtip` (this very Python)


def build_command(*, data: list[str], out: str | Path, preset: str | None = None, config: str | Path | None = None,
                  samples: list[str] | None = None, epochs: int | None = None, max_steps: int | None = None,
                  device: str = "auto", resume: bool = False, overwrite: bool = False) -> list[str]:
    """argv of ``comtip pretrain --preset NAME ...`` or ``--config FILE ...`` (run through this
    Python, as ``python -m napari_comtip``)."""
    if (preset is None) == (config is None):
        raise ValueError("build_command needs exactly one of preset and config")
    cmd = [*_LAUNCH, "pretrain", *(["--preset", preset] if preset is not None else ["--config", str(config)])]
    for d in data:
        cmd += ["--data", str(d)]
    for s in samples or []:
        cmd += ["--sample", s]
    cmd += ["--out", str(out)]
    if epochs and not resume:
        cmd += ["--epochs", str(int(epochs))]
    if max_steps:
        cmd += ["--max-steps", str(int(max_steps))]
    if device and device != "auto":
        cmd += ["--device", device]
    if resume:
        cmd.append("--resume")
    if overwrite:
        cmd.append("--overwrite")
    return cmd


def shown_command(cmd: list[str]) -> str:
    """The command as a user types it in a terminal: ``comtip pretrain --preset tiny ...``."""
    return shlex.join(["comtip", *cmd[len(_LAUNCH):]] if cmd[:len(_LAUNCH)] == _LAUNCH else cmd)


def parse_progress(text: str) -> tuple[int, int] | None:
    """(step, total) from the last progress line ``comtip pretrain`` printed, if any."""
    hits = _TQDM.findall(text)
    return (int(hits[-1][0]), int(hits[-1][1])) if hits else None


class PretrainWidget(QWidget):
    """Launch, follow, cancel and resume a pretraining run."""

    def __init__(self, napari_viewer: "napari.Viewer", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.command: list[str] = []
        self.output = ""
        self._progress_tail = ""
        self._cancelling = False
        self.timer = QTimer(self)
        self.timer.setInterval(Default.PRETRAIN_POLL_MS)
        self.timer.timeout.connect(self.poll)
        self._build()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        from ..engine.device import available_devices

        self.data_list = QListWidget()
        self.data_list.setMaximumHeight(90)
        self.data_list.setToolTip("datasets to train on: her2st/ST folders, Space Ranger outs/, HEST folders, .h5ad")
        add_dir = QPushButton("Add folder…")
        add_dir.clicked.connect(self._add_folder)
        add_file = QPushButton("Add file…")
        add_file.clicked.connect(self._add_file)
        remove = QPushButton("Remove")
        remove.clicked.connect(lambda: [self.data_list.takeItem(self.data_list.row(i))
                                        for i in self.data_list.selectedItems()])
        data_row = QHBoxLayout()
        for b in (add_dir, add_file, remove):
            data_row.addWidget(b)
        self.samples_edit = QLineEdit()
        self.samples_edit.setPlaceholderText("all (or e.g. B4, C2, C3)")
        self.preset_box = QComboBox()
        for i, name in enumerate(preset_names()):  # the one list of presets (package data)
            self.preset_box.addItem(name)
            self.preset_box.setItemData(i, preset_purpose(name), Qt.ItemDataRole.ToolTipRole)
        self.preset_box.addItem(_YAML_ITEM)
        self.preset_box.setToolTip("a packaged recipe (comtip presets lists them), or a YAML config file")
        self.preset_box.activated.connect(self._preset_chosen)
        self.config_path: str | None = None
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(0, 10000)
        self.epochs_spin.setSpecialValueText("from the preset / file")
        self.epochs_spin.setValue(0)
        self.max_steps_spin = QSpinBox()
        self.max_steps_spin.setRange(0, 10**7)
        self.max_steps_spin.setSpecialValueText("no limit")
        self.device_box = QComboBox()
        self.device_box.addItems(available_devices())
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("run folder (checkpoints, metrics.csv, model.pt)")
        out_browse = QPushButton("Browse…")
        out_browse.clicked.connect(self._browse_out)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit)
        out_row.addWidget(out_browse)

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(lambda: self.start())
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button = QPushButton("Use in Predict")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(lambda: self.use_in_predict())
        run_row = QHBoxLayout()
        for b in (self.start_button, self.resume_button, self.cancel_button, self.use_button):
            run_row.addWidget(b)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.command_edit = QLineEdit()
        self.command_edit.setReadOnly(True)
        self.command_edit.setToolTip("the same run from a terminal (the widget runs it with napari's own Python)")
        self.plot = LossPlot()
        self.plot.setMinimumHeight(220)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        self.log.setMinimumHeight(80)

        form = QFormLayout()
        form.addRow("Data", self.data_list)
        form.addRow("", data_row)
        form.addRow("Samples", self.samples_edit)
        form.addRow("Preset", self.preset_box)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Max steps", self.max_steps_spin)
        form.addRow("Device", self.device_box)
        form.addRow("Output", out_row)
        outer = QVBoxLayout(self)
        outer.addLayout(form)
        outer.addLayout(run_row)
        outer.addWidget(self.progress_bar)
        outer.addWidget(self.status_label)
        outer.addWidget(QLabel("Command"))
        outer.addWidget(self.command_edit)
        outer.addWidget(self.plot, stretch=2)
        outer.addWidget(self.log, stretch=1)

    def _add_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder")
        if path:
            self.add_data(path)

    def _add_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Dataset file", "", "AnnData (*.h5ad);;All files (*)")
        if path:
            self.add_data(path)

    def add_data(self, path: str | Path) -> None:
        self.data_list.addItem(str(path))

    def _preset_chosen(self, _index: int) -> None:
        if self.preset_box.currentText() == _YAML_ITEM:
            path, _ = QFileDialog.getOpenFileName(self, "Training config", "", "YAML (*.yaml *.yml)")
            if path:
                self.set_config(path)
            else:
                self.preset_box.setCurrentIndex(0)

    def set_config(self, path: str | Path) -> None:
        """Train with a YAML config file instead of a preset."""
        self.config_path = str(path)
        self.preset_box.setCurrentText(_YAML_ITEM)
        self.preset_box.setToolTip(self.config_path)

    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Run folder")
        if path:
            self.out_edit.setText(path)

    # ------------------------------------------------------------------ state
    @property
    def out_dir(self) -> Path | None:
        text = self.out_edit.text().strip()
        return Path(text).expanduser() if text else None

    def data_paths(self) -> list[str]:
        return [self.data_list.item(i).text() for i in range(self.data_list.count())]

    def samples(self) -> list[str]:
        return [s.strip() for s in re.split(r"[,\s]+", self.samples_edit.text()) if s.strip()]

    def _recipe_for(self, resume: bool) -> dict[str, str]:
        """``{"config": FILE}`` or ``{"preset": NAME}`` for :func:`build_command`."""
        out = self.out_dir
        if resume and out is not None and (out / RUN_CONFIG).is_file():
            return {"config": str(out / RUN_CONFIG)}  # a resumed run must use its own resolved config
        if self.preset_box.currentText() == _YAML_ITEM and self.config_path:
            return {"config": self.config_path}
        preset = self.preset_box.currentText()
        return {"preset": preset if preset in preset_names() else DEFAULT_PRESET}

    # ------------------------------------------------------------------ run
    def start(self, resume: bool = False, overwrite: bool = False) -> bool:
        """Start ``comtip pretrain``; returns False (with a notification) when the form is incomplete."""
        from napari.utils.notifications import show_error

        if self.process is not None:
            return False
        if not self.data_paths():
            show_error("Pretrain: add at least one dataset (Add folder… / Add file…)")
            return False
        if self.out_dir is None:
            show_error("Pretrain: choose an output folder for the run")
            return False
        max_steps = self.max_steps_spin.value() or None
        self.command = build_command(**self._recipe_for(resume), data=self.data_paths(), out=self.out_dir,
                                     samples=self.samples(), epochs=self.epochs_spin.value() or None,
                                     max_steps=max_steps,
                                     device=self.device_box.currentText(), resume=resume, overwrite=overwrite)
        shown = shown_command(self.command)
        self.command_edit.setText(shown)
        self.log.appendPlainText(f"$ {shown}")
        self.output = ""
        self._progress_tail = ""
        self._cancelling = False
        self.plot.n_rows = -1
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.process.readyReadStandardOutput.connect(self._read_output)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._process_error)
        self.process.start(self.command[0], self.command[1:])
        self.start_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.use_button.setEnabled(False)
        self.progress_bar.setRange(0, 0)
        self.status_label.setText("resuming …" if resume else "starting …")
        self.timer.start()
        return True

    def cancel(self) -> None:
        """Stop the run (SIGTERM, then kill after 5 s); its last checkpoint stays for Resume."""
        if self.process is None:
            return
        self._cancelling = True
        self.status_label.setText("cancelling …")
        proc = self.process
        proc.terminate()
        QTimer.singleShot(5000, lambda: self._kill_if_running(proc))

    @staticmethod
    def _kill_if_running(proc: QProcess) -> None:
        """Kill ``proc`` (this very run, never a later one) if SIGTERM did not end it."""
        try:
            if proc.state() != QProcess.ProcessState.NotRunning:
                proc.kill()
        except RuntimeError:  # the Qt object is gone: nothing left to kill
            pass

    def _read_output(self) -> None:
        if self.process is None:
            return
        chunk = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        self.output += chunk
        self._progress_tail = (self._progress_tail + chunk)[-4000:]
        # progress bars redraw with \r: log only finished lines, not every redraw
        for line in re.split(r"\n", chunk.replace("\r\n", "\n")):
            line = line.split("\r")[-1].rstrip()
            if line and not _TQDM.search(line):
                self.log.appendPlainText(line)
        prog = parse_progress(self._progress_tail)
        if prog is not None:
            step, total = prog
            self.progress_bar.setRange(0, max(total, 1))
            self.progress_bar.setValue(min(step, total))

    def poll(self) -> None:
        """Re-read metrics.csv: loss curves and the status line."""
        out = self.out_dir
        if out is None:
            return
        rows = read_metrics_rows(out / METRICS_FILE)
        self.plot.update_rows(rows)
        if rows and self.process is not None and not self._cancelling:
            last = rows[-1]
            self.status_label.setText(
                f"step {int(last.get('step', 0))}, epoch {int(last.get('epoch', 0))}: loss {last.get('loss', 0):.3f} "
                f"(InfoNCE {last.get('infonce', 0):.3f}, MFM {last.get('mfm', 0):.3f}, PAAT {last.get('paat', 0):.3f}), "
                f"{last.get('samples_per_s', 0):.0f} spots/s")

    def _process_error(self, err) -> None:
        if err == QProcess.ProcessError.FailedToStart:
            from napari.utils.notifications import show_error

            show_error(f"Pretrain: could not start {self.command[0]}")
            self._finished(-1, None)

    def _finished(self, code: int, _status=None) -> None:
        from napari.utils.notifications import show_error, show_info

        if self.process is None:
            return
        self._read_output()
        self.timer.stop()
        self.poll()
        self.process = None
        self.start_button.setEnabled(True)
        self.resume_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        final = self.final_checkpoint()
        if code == 0 and final is not None:
            self.progress_bar.setValue(1)
            self.use_button.setEnabled(True)
            self.status_label.setText(f"finished: {final}")
            show_info(f"Pretraining finished: {final}")
            return
        self.progress_bar.setValue(0)
        errors = _ERROR.findall(self.output)
        if errors:
            self.status_label.setText(f"failed: {errors[-1]}")
            show_error(errors[-1])
        elif self._cancelling:
            self.status_label.setText("cancelled; press Resume to continue from the last checkpoint")
            show_info("Pretraining cancelled")
        else:
            tail = self.output.strip().splitlines()[-1:] or [f"exit status {code}"]
            self.status_label.setText(f"failed (exit status {code}): {tail[0]}")
            show_error(f"Pretraining failed (exit status {code}): {tail[0]}")

    # ------------------------------------------------------------------ result
    def final_checkpoint(self) -> Path | None:
        out = self.out_dir
        if out is None:
            return None
        p = out / FINAL_FILE
        return p if p.is_file() else None

    def use_in_predict(self):
        """Dock (or find) the Predict expression widget and point it at the finished model."""
        final = self.final_checkpoint()
        if final is None:
            from napari.utils.notifications import show_error

            show_error("Pretrain: no finished model.pt in the run folder yet")
            return None
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-comtip", "Predict expression")
        widget.set_checkpoint(final)
        return widget


__all__ = ["PretrainWidget", "build_command", "parse_progress", "shown_command"]
