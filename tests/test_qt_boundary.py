"""The package's import structure (docs/architecture.md), read from the sources with ``ast``:

* only ``napari_comtip/_widgets/`` may import Qt, napari or magicgui;
* no import runs back up a layer: top-level modules (``constants``, ``errors``, ``progress``)
  < ``io`` < ``model`` < ``engine`` < {``cli``, ``_widgets``};
* no import circle among the package's modules (module-level and function-level imports alike);
* no source file is over ``MAX_LINES`` lines (files small and single-purpose: about 400 at most).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_comtip"
GUI_ROOTS = {"qtpy", "napari", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "vispy", "npe2"}

#: Layer of each part of the package: a module may import its own layer and the ones below.
LAYERS = {"base": 0, "io": 1, "model": 2, "engine": 3, "cli": 4, "_widgets": 4}
#: Top-level modules that belong to the command line's layer (everything else top-level is base).
CLI_MODULES = {"cli", "_cli_support", "__main__"}
#: The most lines a source file of the package may have (about 400, with a little slack).
MAX_LINES = 420


# --------------------------------------------------------------------------- GUI imports
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


# --------------------------------------------------------------------------- the import graph
def module_names(root: Path, package: str = "napari_comtip") -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (packages by their ``__init__``)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the imports inside ``if TYPE_CHECKING:`` blocks (they never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        lines.add(n.lineno)
    return lines


def import_edges(modules: dict[str, Path]) -> dict[str, list[tuple[str, int]]]:
    """For each module, the package modules it imports (``(target, line)``), at module or function level.

    ``from X import a`` counts as an import of ``X.a`` when that is a module, else of ``X``;
    relative imports are resolved against the importing module's package. Imports under
    ``if TYPE_CHECKING:`` are left out (they never run).
    """
    edges: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: list[tuple[str, int]] = []
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules and "." in t:  # import a.b.c where c is an attribute
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    found.append((t, node.lineno))
        edges[name] = found
    return edges


def layer_of(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "base"
    if len(parts) == 1 and parts[0] in CLI_MODULES:
        return "cli"
    return parts[0] if parts[0] in ("io", "model", "engine", "_widgets") else "base"


def upward_imports(modules: dict[str, Path], edges) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst, line in targets:
            if LAYERS[layer_of(dst)] > LAYERS[layer_of(src)]:
                bad.append(f"{src} (line {line}, layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})")
    return bad


def import_circles(edges) -> list[list[list[str]]]:
    """The import circles: for each strongly connected group of modules (Tarjan), the shortest
    cycle through each of its members (``[a, b, ..., a]``), without repeats."""
    graph = {k: sorted({t for t, _ in v}) for k, v in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the package's size
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for g in groups:
        cycles, seen = [], set()
        for member in g:
            c = _shortest_cycle(graph, set(g), member)
            key = frozenset(zip(c, c[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(c)
        out.append(cycles)
    return out


def _shortest_cycle(graph: dict[str, list[str]], group: set[str], start: str) -> list[str]:
    """A shortest cycle inside ``group`` through ``start`` (breadth-first)."""
    prev: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in group and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - impossible in a strong group


def _describe(cycle: list[str], edges) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        line = min(ln for t, ln in edges[a] if t == b)
        steps.append(f"{a.removeprefix('napari_comtip.')} (line {line})")
    return " -> ".join(steps + [cycle[-1].removeprefix("napari_comtip.")])


def _report(groups, edges) -> str:
    return "import circles:\n  " + "\n  ".join(_describe(c, edges) for g in groups for c in g)


@pytest.fixture(scope="module")
def graph():
    modules = module_names(PACKAGE)
    return modules, import_edges(modules)


def test_graph_sees_the_package(graph):
    modules, edges = graph
    assert {"napari_comtip.cli", "napari_comtip.engine.training", "napari_comtip.io.record"} <= set(modules)
    # relative, absolute, from-package and function-level imports are all seen
    assert any(t == "napari_comtip.engine.predict_file" for t, _ in edges["napari_comtip.cli"])
    assert any(t == "napari_comtip.errors" for t, _ in edges["napari_comtip.engine.training"])


def test_no_import_runs_back_up_a_layer(graph):
    modules, edges = graph
    bad = upward_imports(modules, edges)
    assert not bad, "imports running back up a layer (io < model < engine < cli, _widgets):\n  " + "\n  ".join(bad)


def test_no_import_circles(graph):
    _, edges = graph
    circles = import_circles(edges)
    assert not circles, _report(circles, edges)


# --------------------------------------------------------------------------- the checks can fail
def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "napari_comtip"
    for rel, text in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in [pkg, *(p for p in pkg.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    return pkg


def test_checks_catch_an_upward_import_and_a_circle(tmp_path):
    pkg = _write_package(tmp_path, {
        "errors.py": "",
        "cli.py": "from .engine import run\n",
        "io/record.py": "from ..errors import x\n",
        "io/reader.py": "def f():\n    from ..model.config import C\n",  # io -> model: upward
        "model/config.py": "from ..io.record import R\n",
        "engine/run.py": "import napari_comtip.engine.loop\n",
        "engine/loop.py": "def g():\n    from . import run\n",  # run <-> loop, function level
        "engine/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import main\n",
    })
    modules = module_names(pkg)
    edges = import_edges(modules)
    up = upward_imports(modules, edges)
    assert up == ["napari_comtip.io.reader (line 2, layer io) imports napari_comtip.model.config (layer model)"]
    circles = import_circles(edges)
    assert circles == [[["napari_comtip.engine.loop", "napari_comtip.engine.run", "napari_comtip.engine.loop"]]]
    assert _describe(circles[0][0], edges) == "engine.loop (line 2) -> engine.run (line 1) -> engine.loop"


def test_every_circle_of_a_group_is_reported():
    """a <-> b <-> c is one strongly connected group; both circles are named, not only the first."""
    edges = {"p.a": [("p.b", 1)], "p.b": [("p.a", 2), ("p.c", 3)], "p.c": [("p.b", 4)]}
    assert import_circles(edges) == [[["p.a", "p.b", "p.a"], ["p.c", "p.b", "p.c"]]]


# --------------------------------------------------------------------------- file sizes
def long_files(root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """``{path relative to root: lines}`` of every ``.py`` file under ``root`` over ``limit`` lines."""
    sizes = {str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines()) for p in root.rglob("*.py")}
    return {name: n for name, n in sorted(sizes.items()) if n > limit}


def test_no_source_file_is_too_long():
    assert len(list(PACKAGE.rglob("*.py"))) > 10  # the scan sees the package
    over = long_files(PACKAGE)
    assert not over, (f"source files over {MAX_LINES} lines (split them by role, docs/architecture.md): "
                      + ", ".join(f"{name} ({n} lines)" for name, n in over.items()))


def test_the_length_check_names_a_long_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert long_files(tmp_path) == {str(Path("sub") / "long.py"): MAX_LINES + 1}
