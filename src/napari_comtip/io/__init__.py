"""The IO layer: any slide with (or without) spatial transcriptomics -> :class:`SpatialSample`.

:func:`load_sample` detects the input format and dispatches to one reader. The formats are one
table, :data:`READERS` (one :class:`Reader` each: ``matches``, ``list_samples``, ``read``);
:func:`detect_format`, :func:`list_samples` and :func:`load_sample` walk it in order:

========================  ==================================================================
input                     reader
========================  ==================================================================
``@demo``                 the bundled her2st section C2 (:func:`bundled_sample_path`)
her2st-style folder       :mod:`.legacy_st` (``ST-cnts/``, ``ST-spotfiles/``, ``ST-imgs/``)
Space Ranger ``outs/``    :mod:`.visium` (``spatial/`` + a feature-barcode matrix)
folder of ``outs/``       :mod:`.visium`, one sample per run subfolder (``--sample A1``)
``*.h5ad``                :mod:`.h5ad` (``obsm['spatial']`` + ``uns['spatial']``)
HEST-1k sample folder     :mod:`.hest` (``st/``, ``wsis/``, ``metadata/``)
slide / image file        :mod:`.bare` (tissue detection + a regular spot grid)
========================  ==================================================================

No Qt or napari here. See ``docs/data-formats.md`` for what is read from each input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .decode import IMAGE_SUFFIXES
from .record import SpatialSample

#: Aliases accepted wherever a sample path is (CLI, widgets, training data specs).
DEMO_ALIAS = "@demo"
_DEMO_FOLDER = "her2st_C2"
_DEMO_SAMPLE = "C2"


def bundled_sample_path() -> Path:
    """The bundled demo data set: her2st section C2, downsampled (legacy ST layout)."""
    return Path(__file__).resolve().parent.parent / "sample_data" / _DEMO_FOLDER


def _resolve_alias(path: str | os.PathLike, sample: str | None) -> tuple[Path, str | None]:
    s = str(path)
    if s.startswith("@"):
        if s == DEMO_ALIAS:
            return bundled_sample_path(), sample or _DEMO_SAMPLE
        raise InputError(f"unknown alias {s!r}", hint=f"the only alias is {DEMO_ALIAS} (the bundled her2st section)")
    return Path(s).expanduser(), sample


# --------------------------------------------------------------------------- the table of formats
@dataclass(frozen=True)
class Reader:
    """One input format: whether a path is one, the samples it holds, and how to read one.

    ``read(path, *, sample, slide, pitch_um, mpp, progress)``; ``expects`` describes the input
    for the error that no format fits; ``folder``: the format is a folder (else a file).
    """

    format: str
    folder: bool
    matches: Callable[[Path], bool]
    list_samples: Callable[[Path], list[str]]
    read: Callable[..., SpatialSample]
    expects: str


def _legacy_matches(p: Path) -> bool:
    from .legacy_st import is_legacy_st

    return is_legacy_st(p)


def _legacy_list(p: Path) -> list[str]:
    from .legacy_st import list_samples as ls

    return ls(p)


def _legacy_read(p: Path, *, sample, slide, pitch_um, mpp, progress) -> SpatialSample:  # noqa: ARG001
    from .legacy_st import read_legacy_st

    return read_legacy_st(p, sample=sample, slide=slide, mpp=mpp, progress=progress)


def _outs_folder(p: Path) -> Path:
    return p if p.is_dir() else p.parent  # a feature-barcode .h5 inside outs/ stands for its run


def _visium_matches(p: Path) -> bool:
    from .visium import find_outs, visium_runs

    if p.is_dir():
        return find_outs(p) is not None or bool(visium_runs(p))
    return p.name.lower().endswith(".h5") and find_outs(p.parent) is not None


def _visium_list(p: Path) -> list[str]:
    from .visium import find_outs, run_name, visium_runs

    runs = visium_runs(p) if p.is_dir() else {}
    return list(runs) if runs else [run_name(find_outs(_outs_folder(p)))]


def _visium_read(p: Path, *, sample, slide, pitch_um, mpp, progress) -> SpatialSample:  # noqa: ARG001
    from .visium import read_visium

    return read_visium(_outs_folder(p), sample=sample, slide=slide, mpp=mpp, progress=progress)


def _hest_matches(p: Path) -> bool:
    from .hest import is_hest

    return is_hest(p)


def _hest_list(p: Path) -> list[str]:
    from .hest import list_samples as ls

    return ls(p)


def _hest_read(p: Path, *, sample, slide, pitch_um, mpp, progress) -> SpatialSample:  # noqa: ARG001
    from .hest import read_hest

    return read_hest(p, sample=sample, slide=slide, mpp=mpp, progress=progress)


def _h5ad_list(p: Path) -> list[str]:
    from .h5ad import list_samples as ls

    return ls(p)


def _h5ad_read(p: Path, *, sample, slide, pitch_um, mpp, progress) -> SpatialSample:  # noqa: ARG001
    from .h5ad import read_h5ad

    return read_h5ad(p, sample=sample, slide=slide, mpp=mpp, progress=progress)


def _bare_matches(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES or p.name.lower().endswith((".ome.tif", ".ome.tiff"))


def _bare_read(p: Path, *, sample, slide, pitch_um, mpp, progress) -> SpatialSample:  # noqa: ARG001
    from .bare import read_bare

    return read_bare(slide or p, pitch_um=pitch_um, mpp=mpp, progress=progress)


#: Every input format, in the order :func:`detect_format` tries them.
READERS: tuple[Reader, ...] = (
    Reader("legacy-st", True, _legacy_matches, _legacy_list, _legacy_read,
           "a her2st-style folder (ST-cnts/, ST-spotfiles/, ST-imgs/)"),
    Reader("visium", True, _visium_matches, _visium_list, _visium_read,
           "a Space Ranger outs/ folder (spatial/ + filtered_feature_bc_matrix.h5) or a folder of such outs/ "
           "folders"),
    Reader("hest", True, _hest_matches, _hest_list, _hest_read, "a HEST folder (st/, wsis/, metadata/)"),
    Reader("h5ad", False, lambda p: p.name.lower().endswith(".h5ad"), _h5ad_list, _h5ad_read, "an .h5ad file"),
    Reader("visium", False, _visium_matches, _visium_list, _visium_read,
           "the feature-barcode .h5 inside a Space Ranger outs/ folder"),
    Reader("bare", False, _bare_matches, lambda p: [p.stem], _bare_read,
           "a slide (.svs, .tif, .ome.tif, .jpg, .png)"),
)


def _reader_for(path: str | os.PathLike) -> Reader:
    p = Path(path)
    if not p.exists():
        raise InputError("path not found", path=p, hint="check the spelling, or use @demo for the bundled sample")
    folder = p.is_dir()
    for reader in READERS:
        if reader.folder == folder and reader.matches(p):
            return reader
    expects = [r.expects for r in READERS if r.folder == folder]
    if folder:
        raise InputError("not a recognised data folder", path=p,
                         hint="expected " + ", ".join(expects[:-1]) + ", or " + expects[-1])
    raise InputError(f"unsupported file type {p.suffix or p.name!r}", path=p,
                     hint="give a data folder, an .h5ad file, or a slide (.svs, .tif, .ome.tif, .jpg, .png)")


# --------------------------------------------------------------------------- the entry points
def detect_format(path: str | os.PathLike) -> str:
    """``legacy-st``, ``visium``, ``h5ad``, ``hest`` or ``bare``; :class:`InputError` when none fits."""
    return _reader_for(path).format


def list_samples(path: str | os.PathLike) -> list[str]:
    """Names of the samples of a (multi-sample) data set, e.g. ``["B4", "C2", "C3", "C4"]`` for her2st."""
    p, _ = _resolve_alias(path, None)
    return _reader_for(p).list_samples(p)


def load_sample(
    path: str | os.PathLike,
    sample: str | None = None,
    slide: str | os.PathLike | None = None,
    pitch_um: float | None = None,
    mpp: float | None = None,
    progress=None,
) -> SpatialSample:
    """Load one sample of any supported format (see the module table) into a :class:`SpatialSample`.

    ``sample`` names a section of a multi-sample data set, ``slide`` replaces the image found next
    to the data (e.g. the full-resolution slide of a Visium run), ``pitch_um`` sets the grid pitch
    of a bare slide, ``mpp`` overrides the microns per pixel (it wins over everything and the
    sample's ``mpp_source`` says so). Errors a user can fix raise :class:`InputError`.
    """
    p, sample = _resolve_alias(path, sample)
    if slide is not None and not Path(slide).expanduser().is_file():
        raise InputError("slide file not found", path=slide, hint="check the --slide path")
    if pitch_um is not None and not (pitch_um > 0):
        raise InputError(f"--pitch-um must be positive, got {pitch_um}")
    return _reader_for(p).read(p, sample=sample, slide=slide, pitch_um=pitch_um, mpp=mpp, progress=progress)


__all__ = [
    "load_sample",
    "list_samples",
    "detect_format",
    "bundled_sample_path",
    "READERS",
    "Reader",
    "SpatialSample",
    "DEMO_ALIAS",
]
