"""The Predict widget's checkpoint chooser (Qt): bundled checkpoints by name, or a file.

:func:`checkpoint_box` builds the chooser; :class:`CheckpointChoice` is the Predict widget's part
that reads and sets it (a mixin of :class:`~napari_comtip._widgets.predict.PredictWidget`)."""

from __future__ import annotations

import os

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog

from ..errors import ComtipError


def checkpoint_box() -> QComboBox:
    """The checkpoint chooser: the bundled checkpoints by name (the default first, each with what
    it was trained on as its tooltip); a file chosen with Browse… or typed in is added to it."""
    from ..model.bundled import bundled_names
    from ..model.catalogue import checkpoint_info

    box = QComboBox()
    box.setEditable(True)
    box.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
    # narrow whatever the items: a long path must not widen the dock (the full text scrolls)
    box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(6)
    box.lineEdit().setPlaceholderText("bundled name or path of a .pt file")
    box.setToolTip("a checkpoint bundled with the plugin (comtip checkpoints lists them), or a CoMTIP .pt file "
                   "(Browse…, or type its path)")
    for i, name in enumerate(bundled_names()):
        box.addItem(name)
        try:
            r = checkpoint_info(name)
            tip = f"{r['species']}, {r['technology']}, {r['tissue']}: {r['n_genes']} genes, trained on {r['data']}"
        except ComtipError as exc:  # a broken installation: say so where the name is chosen
            tip = str(exc)
        box.setItemData(i, tip, Qt.ItemDataRole.ToolTipRole)
    box.setCurrentIndex(0)
    return box



class CheckpointChoice:
    """The checkpoint of the next Run: ``self.checkpoint_box`` (a :func:`checkpoint_box`) and Browse…."""

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "CoMTIP checkpoint", "", "CoMTIP checkpoint (*.pt);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def set_checkpoint(self, checkpoint: str | os.PathLike | None) -> None:
        """Use ``checkpoint`` (a bundled name or a file; None: the default bundled one) for the next Run."""
        from ..model.bundled import DEFAULT_NAME

        text = DEFAULT_NAME if checkpoint is None or not str(checkpoint).strip() else str(checkpoint).strip()
        if self.checkpoint_box.findText(text) < 0:
            self.checkpoint_box.addItem(text)
            self.checkpoint_box.setItemData(self.checkpoint_box.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
        self.checkpoint_box.setCurrentText(text)

    def checkpoint(self) -> str | None:
        """The chosen checkpoint: a bundled name or a path (None: the field is empty, the default one)."""
        return self.checkpoint_box.currentText().strip() or None


__all__ = ["checkpoint_box", "CheckpointChoice"]
