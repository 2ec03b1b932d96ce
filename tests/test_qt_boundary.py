"""Only ``napari_comtip/_widgets/`` may import Qt, napari or magicgui (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_comtip"
GUI_ROOTS = {"qtpy", "napari", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "vispy", "npe2"}


def gui_imports(path: Path) -> list[str]:
    """``module (line N)`` for every import of a GUI package in ``path``, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{n} (line {node.lineno})" for n in names if n.split(".")[0] in GUI_ROOTS]
    return found


def test_no_gui_import_outside_widgets():
    offenders = {}
    files = [p for p in PACKAGE.rglob("*.py") if "_widgets" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 10  # the scan sees the package
    for p in files:
        hits = gui_imports(p)
        if hits:
            offenders[str(p.relative_to(PACKAGE))] = hits
    assert not offenders, f"GUI imports outside _widgets/: {offenders}"


def test_scanner_sees_nested_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef f():\n    from qtpy.QtWidgets import QWidget\n    import napari.utils\n")
    assert gui_imports(f) == ["qtpy.QtWidgets (line 3)", "napari.utils (line 4)"]


def test_widgets_do_import_qt():
    """The scan would notice GUI code: the widget modules themselves use it."""
    assert gui_imports(PACKAGE / "_widgets" / "predict.py")
