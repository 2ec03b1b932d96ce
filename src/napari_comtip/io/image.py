"""A lazy multiscale RGB image in full-resolution pixel coordinates.

:class:`MultiscaleImage` is the one image type the rest of the package sees, whatever the file:

* pyramidal TIFF / OME-TIFF / SVS: every level lazily through ``tiffslide`` (zarr arrays);
* a large single-level image (JPEG/PNG/TIFF whose longer side exceeds ``Default.PYRAMID_MIN_SIDE``,
  e.g. the 92 MP her2st JPEGs): decoded once, a pyramid (factor 2) built and written as zarr into
  ``cache_dir("pyramids")/<key>`` (key = hash of absolute path, size, mtime), reopened from there
  on later loads;
* a small image: one in-memory numpy level;
* a scaled-down image standing in for an unseen full-resolution slide (Visium hires/lowres PNG):
  one level whose downsample is ``1 / scalef``.

Coordinates.  The image is addressed in *full-resolution* pixels.  ``downsamples[i]`` is the number
of full-resolution pixels per pixel of level ``i``; ``downsamples[0]`` is 1.0 for a real slide and
``1 / tissue_hires_scalef`` (e.g. 6.67) for a Visium hires PNG.  ``shape`` is the full-resolution
extent (H, W, 3) that the image covers, ``level_shapes`` the array shapes.  Continuous coordinates
put pixel ``i``'s centre at ``i + 0.5``; full-resolution continuous ``y`` lies at ``y / d`` in a
level of downsample ``d``.  A pixel index ``r`` of a spot centre (as in the spot tables) is the
continuous coordinate ``r + 0.5``.  For napari, show ``as_dask()`` with ``scale = (base_scale,
base_scale)`` (the layer's level-0 scale); napari derives the coarser levels from their shapes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import Default
from ..errors import InputError
from ..progress import Progress
from .cache import cache_dir, file_identity, identity_key

#: Bumped when the layout of cached pyramids changes (old caches are then rebuilt).
PYRAMID_CACHE_VERSION = 1
TIFFSLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
IMAGE_SUFFIXES = TIFFSLIDE_SUFFIXES + (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The largest image we deliberately decode in one piece (PIL's decompression-bomb guard is
# raised to this for our own calls only): 2 gigapixels.
MAX_DECODE_PIXELS = 2_000_000_000



# --------------------------------------------------------------------------- pixel helpers
def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any integer/float type -> (H, W, 3) uint8.

    RGBA is composited over white; 16-bit is scaled to 8-bit; floats are taken as 0..1 when
    their maximum is <= 1, else as 0..255.
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image array (H, W[, C]), got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind == "f":
            mx = float(np.nanmax(a)) if a.size else 1.0
            a = np.nan_to_num(a * (255.0 if mx <= 1.0 else 1.0))
            a = np.clip(a, 0, 255).astype(np.uint8)
        elif a.dtype.kind in "ui":
            mx = np.iinfo(a.dtype).max
            a = (np.clip(a, 0, mx).astype(np.float64) * (255.0 / mx)).round().astype(np.uint8) if mx > 255 \
                else np.clip(a, 0, 255).astype(np.uint8)
        elif a.dtype == bool:
            a = a.astype(np.uint8) * 255
        else:
            raise ValueError(f"unsupported image dtype {a.dtype}")
    c = a.shape[2]
    if c == 3:
        return a
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        if np.all(alpha == 1.0):
            return np.ascontiguousarray(a[..., :3])
        rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if c > 4:
        return np.ascontiguousarray(a[..., :3])
    return np.repeat(a[..., :1], 3, axis=2)  # pragma: no cover - c == 2 (grey + alpha)


def is_blank(arr: np.ndarray, tol: float = 2.0) -> bool:
    """True when an image is (nearly) one flat colour, e.g. the all-black placeholder hires PNG."""
    a = np.asarray(arr)
    if a.size == 0:
        return True
    step = max(1, int(max(a.shape[:2]) // 512))
    a = to_rgb_uint8(a[::step, ::step])
    return float(a.astype(np.float32).std()) < tol


class _RGBLevel:
    """Array-like adapter: a lazily sliced level that is not (H, W, 3) uint8 yet."""

    def __init__(self, arr):
        self._arr = arr
        self.shape = (int(arr.shape[0]), int(arr.shape[1]), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.chunks = getattr(arr, "chunks", None)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key[:2]) + (slice(None),) * (2 - min(2, len(key)))
        out = to_rgb_uint8(np.asarray(self._arr[key[0], key[1]]))
        rest = key[2:] if len(key) > 2 else ()
        return out[(slice(None), slice(None)) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


def _as_rgb_level(arr):
    shape = tuple(arr.shape)
    if len(shape) == 3 and shape[2] == 3 and np.dtype(arr.dtype) == np.uint8:
        return arr
    if isinstance(arr, np.ndarray):
        return to_rgb_uint8(arr)
    return _RGBLevel(arr)


# --------------------------------------------------------------------------- the image
class MultiscaleImage:
    """A pyramid of (H, W, 3) uint8 levels addressed in full-resolution pixels (see module docs)."""

    def __init__(
        self,
        levels: Sequence[Any],
        downsamples: Sequence[float] | None = None,
        *,
        identity: str = "",
        full_shape: tuple[int, int] | None = None,
        source: str | None = None,
        kind: str = "in-memory",
        info: dict[str, Any] | None = None,
        keepalive: Any = None,
    ):
        if not levels:
            raise ValueError("a MultiscaleImage needs at least one level")
        self.levels = [_as_rgb_level(lv) for lv in levels]
        if downsamples is None:
            h0, w0 = self.levels[0].shape[:2]
            downsamples = [1.0] + [
                float(np.mean([h0 / lv.shape[0], w0 / lv.shape[1]])) for lv in self.levels[1:]
            ]
        self.downsamples = [float(d) for d in downsamples]
        if len(self.downsamples) != len(self.levels):
            raise ValueError("one downsample per level")
        if any(not (d > 0 and math.isfinite(d)) for d in self.downsamples):
            raise ValueError(f"downsamples must be positive: {self.downsamples}")
        if any(b < a for a, b in zip(self.downsamples, self.downsamples[1:])):
            raise ValueError(f"levels must go from fine to coarse: {self.downsamples}")
        if full_shape is None:
            h, w = self.levels[0].shape[:2]
            d0 = self.downsamples[0]
            full_shape = (int(round(h * d0)), int(round(w * d0)))
        self._full_shape = (int(full_shape[0]), int(full_shape[1]), 3)
        self.identity = identity or f"in-memory:{id(self)}"
        self.source = source
        self.kind = kind
        self.info = dict(info or {})
        self._keepalive = keepalive  # e.g. the TiffSlide object whose zarr store we read

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_array(cls, arr: np.ndarray, *, pyramid: bool = False, downsample: float = 1.0,
                   full_shape: tuple[int, int] | None = None, identity: str = "", source: str | None = None,
                   **kw) -> "MultiscaleImage":
        """Wrap an in-memory array; with ``pyramid=True`` also build coarser levels in memory."""
        rgb = to_rgb_uint8(arr)
        if pyramid:
            levels = build_pyramid_levels(rgb)
            downs = [downsample * Default.PYRAMID_FACTOR ** i for i in range(len(levels))]
        else:
            levels, downs = [rgb], [downsample]
        return cls(levels, downs, identity=identity, full_shape=full_shape, source=source, **kw)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Full-resolution extent (H, W, 3) covered by the image."""
        return self._full_shape

    @property
    def level_shapes(self) -> list[tuple[int, int, int]]:
        return [tuple(int(s) for s in lv.shape[:2]) + (3,) for lv in self.levels]

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def base_scale(self) -> float:
        """Full-resolution pixels per level-0 pixel (the napari layer's ``scale``)."""
        return self.downsamples[0]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (level 0 when none is)."""
        best = 0
        for i, d in enumerate(self.downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    # ------------------------------------------------------------------ reopening elsewhere
    def reopen_spec(self) -> tuple | None:
        """A small picklable recipe to open this same image in another process, or None.

        Only file-backed images have one (a slide read through tiffslide, a cached zarr pyramid):
        another process reopens the file instead of receiving the pixels. In-memory images
        (small by construction) and napari layers have none. See :func:`reopen_image`.
        """
        if self.kind == "tiffslide" and self.source:
            return ("tiffslide", str(self.source), self.identity)
        if self.kind == "cached pyramid" and self.info.get("cache"):
            return ("cached pyramid", str(self.info["cache"]), self.identity, str(self.source or ""))
        return None

    # ------------------------------------------------------------------ reading
    def read_level_window(self, level: int, row0: int, col0: int, height: int, width: int,
                          pad_value: int = Default.PAD_VALUE) -> np.ndarray:
        """A (height, width, 3) window of level ``level`` in that level's own integer pixels, padded."""
        lv = self.levels[level]
        H, W = lv.shape[:2]
        height, width = int(height), int(width)
        out = np.full((height, width, 3), pad_value, dtype=np.uint8)
        r0, c0 = max(int(row0), 0), max(int(col0), 0)
        r1, c1 = min(int(row0) + height, H), min(int(col0) + width, W)
        if r1 > r0 and c1 > c0:
            block = np.asarray(lv[r0:r1, c0:c1])
            if block.ndim == 3 and block.shape[2] != 3:
                block = to_rgb_uint8(block)
            out[r0 - int(row0):r1 - int(row0), c0 - int(col0):c1 - int(col0)] = block
        return out

    def read_region(self, level: int, row0: float, col0: float, height: int, width: int,
                    pad_value: int = Default.PAD_VALUE) -> np.ndarray:
        """A (height, width, 3) uint8 region of level ``level``.

        ``row0``/``col0`` are the region's top-left corner in *full-resolution* pixels (as in
        OpenSlide's ``read_region``); ``height``/``width`` are in pixels of ``level``. Parts of the
        region outside the image are filled with ``pad_value``.
        """
        d = self.downsamples[level]
        return self.read_level_window(level, int(math.floor(row0 / d + 1e-9)), int(math.floor(col0 / d + 1e-9)),
                                      height, width, pad_value)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole image, resized so that its longer side is ``max_side`` (aspect of the full extent)."""
        from PIL import Image

        H, W = self.shape[:2]
        scale = max_side / max(H, W)
        th, tw = max(1, int(round(H * scale))), max(1, int(round(W * scale)))
        # finest level that is still no smaller than the thumbnail: read it whole
        idx = 0
        for i, (h, w, _) in enumerate(self.level_shapes):
            if h >= th and w >= tw:
                idx = i
        lv = self.levels[idx]
        arr = np.asarray(lv[:, :])
        return np.asarray(Image.fromarray(arr).resize((tw, th), Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR))

    def as_dask(self) -> list:
        """The levels as dask arrays (napari multiscale layer data), chunked like the store."""
        import dask.array as da

        out = []
        for lv in self.levels:
            chunks = getattr(lv, "chunks", None)
            if not chunks or len(chunks) != 3 or not all(isinstance(c, int) for c in chunks):
                chunks = (Default.PYRAMID_TILE, Default.PYRAMID_TILE, 3)
            out.append(da.from_array(lv, chunks=chunks, asarray=True, fancy=False))
        return out

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        shapes = ", ".join(f"{s[1]}x{s[0]}" for s in self.level_shapes)
        return (f"MultiscaleImage({self.kind}, full {self.shape[1]}x{self.shape[0]}, levels [{shapes}], "
                f"downsamples {[round(d, 3) for d in self.downsamples]})")


# --------------------------------------------------------------------------- pyramid building
def build_pyramid_levels(rgb: np.ndarray, smallest: int | None = None,
                         factor: int | None = None) -> list[np.ndarray]:
    """Level 0 plus box-averaged levels (``factor`` per step; odd edges: ceil) down to ``smallest``.

    Level ``i`` pixel ``j`` covers level-0 pixels ``[j*f**i, (j+1)*f**i)``, so its downsample is
    exactly ``f**i``.
    """
    from PIL import Image

    smallest = Default.PYRAMID_SMALLEST if smallest is None else int(smallest)
    factor = Default.PYRAMID_FACTOR if factor is None else int(factor)
    levels = [rgb]
    cur = Image.fromarray(rgb)
    while max(cur.size) // factor >= smallest:
        cur = cur.reduce(factor)
        levels.append(np.asarray(cur))
    return levels


@contextlib.contextmanager
def _pil_limit():
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(old or 0, MAX_DECODE_PIXELS)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() in TIFFSLIDE_SUFFIXES:
        try:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                s = tf.series[0].levels[0] if tf.series else tf.pages[0]
                shp = s.shape
                axes = getattr(s, "axes", "YXS")
                h = shp[axes.index("Y")] if "Y" in axes else shp[0]
                w = shp[axes.index("X")] if "X" in axes else shp[1]
                return int(w), int(h)
        except Exception:  # noqa: BLE001 - fall through to PIL
            pass
    try:
        with _pil_limit(), Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the image header ({exc})", path=path,
                         hint="the file is damaged or not an image; re-export or re-download it") from None


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a whole image file to (H, W, 3) uint8, refusing truncated or damaged files."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    path = Path(path)
    suffix = path.suffix.lower()
    hint = "the file is damaged or truncated; re-export or re-download it"
    try:
        if suffix in (".jpg", ".jpeg"):
            # libjpeg-turbo through imagecodecs decodes straight into numpy (PIL's asarray copies
            # the 92 MP her2st images slowly); a truncated stream is an error, not a grey tail.
            import imagecodecs

            data = path.read_bytes()
            # libjpeg fills a truncated stream with grey and only warns: require the end-of-image
            # marker after the last start-of-scan (0xFF bytes inside scans are stuffed, so these
            # two byte pairs are markers; an EXIF thumbnail's EOI comes before the main scan).
            if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda") or b"\xff\xd9" not in data:
                raise InputError("the JPEG file is truncated (no end-of-image marker)", path=path, hint=hint)
            try:
                arr = imagecodecs.jpeg8_decode(data)
            except Exception:  # noqa: BLE001 - e.g. CMYK/arithmetic coding: let PIL try
                arr = None
            if arr is not None:
                return to_rgb_uint8(arr)
        if suffix in TIFFSLIDE_SUFFIXES:
            import tifffile

            return to_rgb_uint8(tifffile.imread(path, level=0) if _has_levels(path) else tifffile.imread(path))
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with _pil_limit(), Image.open(path) as im:
                im.load()
                if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I", "F"):
                    im = im.convert("RGB")
                elif im.mode == "LA":
                    im = im.convert("RGBA")
                arr = np.asarray(im)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old
        return to_rgb_uint8(arr)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, RuntimeError) as exc:
        raise InputError(f"cannot decode the image ({type(exc).__name__}: {exc})", path=path, hint=hint) from None
    except Exception as exc:  # noqa: BLE001 - codec libraries raise their own error types
        raise InputError(f"cannot decode the image ({type(exc).__name__}: {exc})", path=path, hint=hint) from None


def _has_levels(path: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return bool(tf.series) and len(tf.series[0].levels) > 1
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- pyramid cache (zarr)
def _zarr_open_read(path: Path):
    import zarr

    return zarr.open_array(str(path), mode="r")


def _zarr_write(path: Path, arr: np.ndarray, chunks: tuple[int, int, int]) -> None:
    import zarr

    z = zarr.open_array(str(path), mode="w", shape=arr.shape, chunks=chunks, dtype="uint8")
    z[...] = arr


def pyramid_cache_path(path: str | os.PathLike) -> Path:
    """Where the pyramid of ``path`` is (or would be) cached."""
    return cache_dir("pyramids") / identity_key(file_identity(path))


def _open_cached_pyramid(folder: Path, identity: str, source: str) -> MultiscaleImage | None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != PYRAMID_CACHE_VERSION or meta.get("identity") != identity:
            return None
        levels = [_zarr_open_read(folder / str(i)) for i in range(int(meta["n_levels"]))]
        if [list(lv.shape) for lv in levels] != [list(s) for s in meta["level_shapes"]]:
            return None
    except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt, never trusted
        return None
    return MultiscaleImage(levels, meta["downsamples"], identity=identity, source=source,
                           kind="cached pyramid", info={"cache": str(folder), "decoded": False})


def _build_cached_pyramid(path: Path, identity: str, folder: Path, progress: Progress | None,
                          rgb: np.ndarray | None = None) -> MultiscaleImage:
    t0 = time.perf_counter()
    if progress:
        progress(0, 3, f"decoding {path.name}")
    if rgb is None:
        rgb = decode_image(path)
    t_decode = time.perf_counter() - t0
    if progress:
        progress(1, 3, "building pyramid")
    levels = build_pyramid_levels(rgb)
    downs = [float(Default.PYRAMID_FACTOR ** i) for i in range(len(levels))]
    if progress:
        progress(2, 3, "writing pyramid cache")
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tile = Default.PYRAMID_TILE
    try:
        tmp.mkdir(parents=True)
        for i, lv in enumerate(levels):
            _zarr_write(tmp / str(i), lv, (tile, tile, 3))
        meta = {
            "version": PYRAMID_CACHE_VERSION,
            "identity": identity,
            "source": str(path),
            "n_levels": len(levels),
            "level_shapes": [list(lv.shape) for lv in levels],
            "downsamples": downs,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        if folder.exists() and _open_cached_pyramid(folder, identity, str(path)) is not None:
            # another process (e.g. another DDP rank) finished the same pyramid first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if folder.exists():  # a broken entry (killed before meta.json): replace it
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(tmp, folder)
            except OSError:
                # someone renamed theirs into place between our check and our rename: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    img = _open_cached_pyramid(folder, identity, str(path))
    if img is None:  # pragma: no cover - cache folder not writable/readable: keep it in memory
        warnings.warn(f"could not use the pyramid cache at {folder}; keeping the pyramid in memory", stacklevel=2)
        img = MultiscaleImage(levels, downs, identity=identity, source=str(path), kind="in-memory pyramid")
    img.info.update({"decoded": True, "decode_s": round(t_decode, 3),
                     "build_s": round(time.perf_counter() - t0, 3)})
    if progress:
        progress(3, 3, "pyramid ready")
    return img


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
        img = _open_cached_pyramid(folder, identity, str(path))
        if img is None:
            img = _build_cached_pyramid(path, identity, folder, progress)
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
        img = _open_cached_pyramid(Path(folder), identity, source)
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
        try:
            np.asarray(lv[h // 2: h // 2 + 16, w // 2: w // 2 + 16])
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read pyramid level {i} ({type(exc).__name__}: {exc})", path=path,
                             hint="the file is damaged or truncated; re-export or re-download it") from None


__all__ = [
    "MultiscaleImage",
    "open_image",
    "reopen_image",
    "decode_image",
    "image_size",
    "build_pyramid_levels",
    "pyramid_cache_path",
    "to_rgb_uint8",
    "is_blank",
    "IMAGE_SUFFIXES",
]
