"""Opening a slide or image file as a :class:`~napari_comtip.io.image.MultiscaleImage`.

* pyramidal TIFF / OME-TIFF / SVS: every level lazily through ``tiffslide`` (zarr arrays), after
  a cheap structural check of the file (:func:`check_tiff_structure`: every tile or strip of
  every page lies inside the file, so a truncated slide is refused up front with one line);
* a large single-level image: a cached zarr pyramid (``io/pyramid.py``);
* a small image: one in-memory numpy level (``io/decode.py``).

:func:`reopen_image` opens the same file in another process (the GPU path's reader processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from ..constants import Default
from ..errors import InputError
from ..progress import Progress
from .cache import file_identity
from .decode import TIFFSLIDE_SUFFIXES, decode_image, image_size
from .image import MultiscaleImage
from .pyramid import build_cached_pyramid, open_cached_pyramid, pyramid_cache_path

# --------------------------------------------------------------------------- TIFF structure
_TRUNCATED_HINT = "the copy or download is incomplete or the file is damaged; copy it again or re-export it"


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs every damaged tag it skips; our own check reports the damage in one line."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_page(page, size: int, where: str, path: Path) -> None:
    """Every tile or strip of ``page`` lies inside the file's ``size`` bytes."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.shape != counts.shape:
        raise InputError(f"the TIFF is damaged: {where} has {offsets.size} tile offsets but {counts.size} byte counts",
                         path=path, hint=_TRUNCATED_HINT)
    ends = offsets + counts
    bad = np.flatnonzero((ends > size) | (offsets < 0) | (counts < 0))
    if bad.size == 0:
        return
    i = int(bad[0])
    if getattr(page, "is_tiled", False):
        ntx = max(1, -(-int(page.imagewidth) // int(page.tilewidth)))
        part = f"tile {divmod(i, ntx)} (row, col)"
    else:
        part = f"strip {i}"
    raise InputError(f"the slide is truncated: {part} of {where} ends at byte {int(ends[i]):,} but the file has "
                     f"{size:,} bytes ({bad.size} of {ends.size} {'tiles' if 'tile' in part else 'strips'} "
                     f"of that level lie past its end)", path=path, hint=_TRUNCATED_HINT)


def check_tiff_structure(path: str | os.PathLike) -> None:
    """Refuse a truncated or damaged TIFF up front, from its directory alone (no pixel decoded).

    For every level of every series, and every page of the file, the tile (or strip) offsets
    plus byte counts must lie within the file, and SubIFD levels must start inside it. Raises
    :class:`InputError` naming the file, the level and the first tile that lies past the end.
    """
    import tifffile

    path = Path(path)
    size = path.stat().st_size
    with _quiet_tifffile():
        try:
            tf = tifffile.TiffFile(path)
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on damaged headers
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            raise InputError(f"cannot read the TIFF structure ({type(exc).__name__}: {first})", path=path,
                             hint=_TRUNCATED_HINT) from None
        with tf:
            try:
                series = list(tf.series)
            except Exception:  # noqa: BLE001 - no series: the pages below are all there is
                series = []
            for si, ser in enumerate(series):
                for li, lvl in enumerate(getattr(ser, "levels", [ser])):
                    for page in lvl.pages:
                        if page is None:
                            raise InputError(f"the TIFF is damaged: a page of level {li} cannot be read", path=path,
                                             hint=_TRUNCATED_HINT)
                        _check_page(page, size, f"level {li}" + (f" of series {si}" if si else ""), path)
            for k, page in enumerate(tf.pages):
                for j, off in enumerate(getattr(page, "subifds", None) or ()):
                    if int(off) >= size:
                        where = f"level {j + 1}" if k == 0 else f"SubIFD {j} of page {k}"
                        raise InputError(f"the slide is truncated: {where} starts at byte {int(off):,} but the file "
                                         f"has {size:,} bytes", path=path, hint=_TRUNCATED_HINT)
                _check_page(page, size, f"page {k}", path)


# --------------------------------------------------------------------------- tiffslide
def _open_tiffslide(path: Path) -> tuple[MultiscaleImage | None, float | None] | None:
    """Open a TIFF-family slide lazily as ``(image, mpp)``.

    ``image`` is None for a large single-level TIFF (the caller builds a cached pyramid); the
    whole result is None when tiffslide is not installed.
    """
    try:
        import tiffslide
    except ImportError:  # pragma: no cover
        return None
    try:
        with _quiet_tifffile():
            slide = tiffslide.TiffSlide(str(path))
    except Exception as exc:  # noqa: BLE001 - tiffslide/tifffile raise many types
        raise InputError(f"cannot open the slide ({type(exc).__name__}: {exc})", path=path,
                         hint="the file is damaged or not a supported slide (TIFF, OME-TIFF, SVS)") from None
    props = slide.properties
    mpp = props.get("tiffslide.mpp-x")
    try:
        mpp = float(mpp) if mpp not in (None, "", 0) else None
    except (TypeError, ValueError):
        mpp = None
    dims = slide.level_dimensions  # (w, h) per level
    if len(dims) == 1 and max(dims[0]) > Default.PYRAMID_MIN_SIDE:
        slide.close()
        return None, mpp
    grp = slide.zarr_group
    levels = []
    for i in range(len(dims)):
        arr = grp[str(i)]
        levels.append(arr)
    downs = [float(d) for d in slide.level_downsamples]
    downs[0] = 1.0
    identity = file_identity(path)
    img = MultiscaleImage(levels, downs, identity=identity, source=str(path), kind="tiffslide",
                          info={"decoded": False, "vendor": props.get("tiffslide.vendor")}, keepalive=slide)
    return img, mpp


# --------------------------------------------------------------------------- entry point
def open_image(path: str | os.PathLike, progress: Progress | None = None) -> tuple[MultiscaleImage, float | None]:
    """Open any supported slide/image as a :class:`MultiscaleImage`.

    Returns ``(image, mpp)`` where ``mpp`` is the microns per pixel recorded in the file (TIFF
    family through tiffslide) or None.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError("image file not found", path=path, hint="check the path")
    if path.is_dir():
        raise InputError("expected an image file, got a folder", path=path, hint="give the slide file itself")
    if path.stat().st_size == 0:
        raise InputError("the image file is empty", path=path, hint="re-export or re-download it")
    suffix = path.suffix.lower()
    mpp: float | None = None
    if suffix in TIFFSLIDE_SUFFIXES:
        check_tiff_structure(path)
        opened = _open_tiffslide(path)
        if opened is not None and opened[0] is not None:
            img, mpp = opened
            _probe(img, path)
            return img, mpp
        if opened is not None:
            mpp = opened[1]
    w, h = image_size(path)
    identity = file_identity(path)
    if max(w, h) > Default.PYRAMID_MIN_SIDE:
        folder = pyramid_cache_path(path)
        img = open_cached_pyramid(folder, identity, str(path))
        if img is None:
            img = build_cached_pyramid(path, identity, folder, progress)
        return img, mpp
    rgb = decode_image(path)
    img = MultiscaleImage([rgb], [1.0], identity=identity, source=str(path), kind="in-memory",
                          info={"decoded": True})
    return img, mpp


def reopen_image(spec: tuple) -> MultiscaleImage:
    """Open the image described by :meth:`MultiscaleImage.reopen_spec` (e.g. in a reader process).

    Raises :class:`InputError` when the file is gone or is no longer the file that was opened
    (its identity, which covers size and modification time, changed).
    """
    kind = spec[0]
    if kind == "tiffslide":
        _, source, identity = spec
        opened = _open_tiffslide(Path(source))
        img = opened[0] if opened else None
    elif kind == "cached pyramid":
        _, folder, identity, source = spec
        img = open_cached_pyramid(Path(folder), identity, source)
    else:
        raise ValueError(f"unknown image spec {spec!r}")
    if img is None or img.identity != identity:
        raise InputError("the slide changed or disappeared while it was being read", path=spec[1],
                         hint="run again on the current file")
    return img


def _probe(img: MultiscaleImage, path: Path) -> None:
    """Read one small tile of every level so that a damaged slide fails here, with a clear message."""
    for i, lv in enumerate(img.levels):
        h, w = lv.shape[:2]
        img.read_level_window(i, h // 2, w // 2, 16, 16)  # a decode error names the file, level and tile


__all__ = ["open_image", "reopen_image", "check_tiff_structure"]
