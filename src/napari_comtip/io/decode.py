"""Image files decoded in one piece, and their sizes read from the header.

``decode_image`` refuses truncated or damaged files with one :class:`InputError` line (a JPEG
without its end-of-image marker, a PNG cut short, a file that is not an image);
``image_size`` reads (width, height) without decoding the pixels.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .image import to_rgb_uint8

TIFFSLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
IMAGE_SUFFIXES = TIFFSLIDE_SUFFIXES + (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The largest image we deliberately decode in one piece (PIL's decompression-bomb guard is
# raised to this for our own calls only): 2 gigapixels.
MAX_DECODE_PIXELS = 2_000_000_000


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


__all__ = ["decode_image", "image_size", "IMAGE_SUFFIXES", "TIFFSLIDE_SUFFIXES"]
