"""The IO layer: any slide with (or without) spatial transcriptomics -> :class:`SpatialSample`.

:func:`load_sample` detects the input format and dispatches to one reader:

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
from pathlib import Path

from ..errors import InputError
from .decode import IMAGE_SUFFIXES
from .image import MultiscaleImage
from .patches import iter_patch_batches, patch_geometry, read_patch
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


def detect_format(path: str | os.PathLike) -> str:
    """``legacy-st``, ``visium``, ``h5ad``, ``hest`` or ``bare``; :class:`InputError` when none fits."""
    from . import hest, legacy_st, visium

    p = Path(path)
    if not p.exists():
        raise InputError("path not found", path=p, hint="check the spelling, or use @demo for the bundled sample")
    if p.is_dir():
        if legacy_st.is_legacy_st(p):
            return legacy_st.FORMAT
        if visium.find_outs(p) is not None or visium.visium_runs(p):
            return visium.FORMAT
        if hest.is_hest(p):
            return hest.FORMAT
        raise InputError(
            "not a recognised data folder",
            path=p,
            hint="expected a her2st-style folder (ST-cnts/, ST-spotfiles/, ST-imgs/), a Space Ranger outs/ "
                 "folder (spatial/ + filtered_feature_bc_matrix.h5), a folder of such outs/ folders, or a HEST folder (st/, wsis/, metadata/)",
        )
    name = p.name.lower()
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".h5") and visium.find_outs(p.parent) is not None:
        return visium.FORMAT
    if p.suffix.lower() in IMAGE_SUFFIXES or name.endswith((".ome.tif", ".ome.tiff")):
        return "bare"
    raise InputError(
        f"unsupported file type {p.suffix or p.name!r}",
        path=p,
        hint="give a data folder, an .h5ad file, or a slide (.svs, .tif, .ome.tif, .jpg, .png)",
    )


def list_samples(path: str | os.PathLike) -> list[str]:
    """Names of the samples of a (multi-sample) data set, e.g. ``["B4", "C2", "C3", "C4"]`` for her2st."""
    p, _ = _resolve_alias(path, None)
    fmt = detect_format(p)
    if fmt == "legacy-st":
        from .legacy_st import list_samples as _ls

        return _ls(p)
    if fmt == "hest":
        from .hest import list_samples as _ls

        return _ls(p)
    if fmt == "h5ad":
        from .h5ad import list_samples as _ls

        return _ls(p)
    if fmt == "visium":
        from .visium import find_outs, run_name, visium_runs

        runs = visium_runs(p)
        if runs:
            return list(runs)
        return [run_name(find_outs(p if p.is_dir() else p.parent))]
    return [p.stem]


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
    fmt = detect_format(p)
    if fmt == "legacy-st":
        from .legacy_st import read_legacy_st

        return read_legacy_st(p, sample=sample, slide=slide, mpp=mpp, progress=progress)
    if fmt == "visium":
        from .visium import read_visium

        return read_visium(p if p.is_dir() else p.parent, sample=sample, slide=slide, mpp=mpp, progress=progress)
    if fmt == "h5ad":
        from .h5ad import read_h5ad

        return read_h5ad(p, sample=sample, slide=slide, mpp=mpp, progress=progress)
    if fmt == "hest":
        from .hest import read_hest

        return read_hest(p, sample=sample, slide=slide, mpp=mpp, progress=progress)
    from .bare import read_bare

    return read_bare(slide or p, pitch_um=pitch_um, mpp=mpp, progress=progress)


__all__ = [
    "load_sample",
    "list_samples",
    "detect_format",
    "bundled_sample_path",
    "SpatialSample",
    "MultiscaleImage",
    "read_patch",
    "iter_patch_batches",
    "patch_geometry",
    "DEMO_ALIAS",
]
