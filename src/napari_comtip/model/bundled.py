"""The checkpoints bundled with the package (one table), and which file a checkpoint argument means.

A bundled checkpoint is addressed by its *name* (``--checkpoint comtip-tiny-mouse-brain``, the
Predict widget's dropdown) anywhere a checkpoint is taken: :func:`resolve_checkpoint` turns None
(the default), a name or a path into a file; it is the one place a checkpoint's existence is
checked, with one message. The facts a checkpoint file does not hold itself (species,
the data set in words, the model card) are written here; everything else (gene panel, recipe,
held-out evaluation) is read from the file (:mod:`model.catalogue`). Every ``.pt`` file of the
``checkpoints`` folder has a row here (a test checks it).

No torch import here: the table is read by ``comtip --help`` and the widget's dropdown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

#: The folder of the bundled checkpoint files (package data, see pyproject.toml).
FOLDER = Path(__file__).resolve().parent.parent / "checkpoints"


@dataclass(frozen=True)
class Bundled:
    """One bundled checkpoint: its name, file, and what its file does not say about itself."""

    name: str
    file: str
    species: str
    technology: str
    tissue: str
    data: str  # the training data set, in words (sections, study)
    card: str  # the model card, relative to the repository root
    default: bool = False

    @property
    def path(self) -> Path:
        return FOLDER / self.file


BUNDLED: tuple[Bundled, ...] = (
    Bundled(name="comtip-tiny-her2st", file="comtip-tiny-her2st.pt", species="human",
            technology="legacy Spatial Transcriptomics", tissue="HER2+ breast cancer",
            data="her2st sections B4, C2, C3, C4 (Andersson et al. 2021)", card="docs/model-card.md",
            default=True),
    Bundled(name="comtip-tiny-mouse-brain", file="comtip-tiny-mouse-brain.pt", species="mouse",
            technology="10x Visium (FFPE)", tissue="coronal mouse brain",
            data="visium_mouse_brain sections A1, B1 (Gracia Villacampa et al. 2021)",
            card="docs/model-card-mouse-brain.md"),
)

#: The name used when no checkpoint is given.
DEFAULT_NAME: str = next(b.name for b in BUNDLED if b.default)


def bundled_names() -> list[str]:
    """The bundled names, the default first."""
    return [b.name for b in sorted(BUNDLED, key=lambda b: not b.default)]


def bundled_entry(name: str) -> Bundled | None:
    """The bundled checkpoint called ``name`` (also accepted: its file name), else None."""
    for b in BUNDLED:
        if name in (b.name, b.file):
            return b
    return None


def _by_path(path: str | os.PathLike) -> Bundled | None:
    """The bundled checkpoint whose file ``path`` is, else None."""
    try:
        p = Path(path).expanduser().resolve()
    except OSError:  # pragma: no cover
        return None
    return next((b for b in BUNDLED if b.path.resolve() == p), None)


def default_checkpoint_path() -> Path:
    """The file of the default bundled checkpoint (whether or not it is installed)."""
    return bundled_entry(DEFAULT_NAME).path


def resolve_checkpoint(checkpoint: str | os.PathLike | None = None) -> Path:
    """The checkpoint file for ``checkpoint``: None (the default bundled one), a bundled name
    (``comtip-tiny-mouse-brain``, or its file name) or a path; the one existence check.

    A path that exists wins over a bundled file name; a bundled name (without ``.pt``) always
    means the bundled file.
    """
    spec = DEFAULT_NAME if checkpoint is None or str(checkpoint).strip() == "" else checkpoint
    text = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if text is None:
        raise CheckpointError(f"a checkpoint is a bundled name or a path, not {type(spec).__name__}",
                              hint=names_hint())
    path = Path(text).expanduser()
    entry = bundled_entry(text)
    if entry is not None and (text == entry.name or not path.is_file()):
        path = entry.path
    if not path.is_file():
        if entry is not None:
            raise CheckpointError(f"the bundled checkpoint '{entry.name}' is missing from this installation",
                                  path=path, hint="reinstall napari-comtip, or pass the path of a checkpoint file")
        what = "is a folder, not a checkpoint file" if path.is_dir() else "checkpoint not found (no such file, nor a bundled name)"
        raise CheckpointError(what, path=text, hint=names_hint())
    return path


def checkpoint_name(path: str | os.PathLike) -> str | None:
    """The bundled name of the checkpoint file ``path``, or None for any other file."""
    entry = _by_path(path)
    return None if entry is None else entry.name


def names_hint() -> str:
    """One clause naming the bundled checkpoints and that a path works too (for error hints)."""
    names = ", ".join(f"{n} (default)" if n == DEFAULT_NAME else n for n in bundled_names())
    return f"bundled checkpoints: {names} (`comtip checkpoints` lists them); a path to a .pt file also works"


__all__ = ["BUNDLED", "Bundled", "DEFAULT_NAME", "FOLDER", "bundled_entry", "bundled_names", "checkpoint_name", "default_checkpoint_path",
           "names_hint", "resolve_checkpoint"]
