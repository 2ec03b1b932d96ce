"""The Predict widget's checkpoint chooser (Qt): bundled checkpoints by name, or a file."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox

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


__all__ = ["checkpoint_box"]
