"""npe2 reader: File > Open of a slide or a spatial transcriptomics dataset.

What opens here (everything :func:`napari_comtip.io.load_sample` reads):

* a her2st / legacy ST dataset folder (``ST-cnts/``, ``ST-spotfiles/``, ``ST-imgs/``). Such a
  folder holds several sections; napari's File > Open cannot ask which one, so the **first
  section opens** and a notification names the others and how to open one of them: open the
  section's own folder ``ST-imgs/<patient>/<section>``, its H&E image, or its count file
  ``ST-cnts/<section>.tsv.gz``. (Opening every section at once would stack several full slides
  on top of each other and take minutes on a 36-section dataset.)
* a Space Ranger ``outs/`` folder (or its feature-barcode ``.h5``), a folder of several such runs
  (e.g. ``visium_mouse_brain/`` with ``A1/``, ``B1/``), a HEST folder, an ``.h5ad`` file (with
  several samples: the first opens, the notification names the others, their folders for Visium,
  and the ``comtip view ... --sample`` command that opens one);
* a bare slide (``.svs``, ``.tif``/``.tiff``/``.ome.tif``, ``.ndpi`` and the other formats
  tiffslide reads, and ``.jpg``/``.png`` files at least ``Default.READER_MIN_PLAIN_IMAGE_SIDE``
  pixels on a side; smaller photos are left to napari's own reader) with a spot grid laid over
  the tissue. A file that does not record its microns per pixel (a JPEG, a PNG) opens as the
  slide alone, with a notification: the Predict widget lays the grid once the user sets
  "µm per pixel".

Each sample becomes a multiscale RGB image layer plus a Points layer of its spots (see
``_layers.py``). A path that is not one of these gets ``None`` (napari tries other readers); a
path that looks right but cannot be read shows the core's one-line message as a napari
notification and opens nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..constants import Default

_PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_HER2ST_DIRS = ("ST-cnts", "ST-spotfiles")


# --------------------------------------------------------------------------- path recognition
def her2st_root(path: Path) -> Path | None:
    """The her2st-style dataset folder ``path`` is or lies in, else None."""
    for p in (path, *path.parents):
        if p.is_dir() and all((p / d).is_dir() for d in _HER2ST_DIRS):
            return p
    return None


def her2st_member(path: Path) -> tuple[Path, str | None] | None:
    """(dataset root, section) for a path inside a her2st-style dataset (section None = the root)."""
    root = her2st_root(path)
    if root is None:
        return None
    if path == root:
        return root, None
    rel = path.relative_to(root).parts
    if rel[0] == "ST-cnts" and len(rel) == 2:
        return root, rel[1].split(".")[0]
    if rel[0] == "ST-spotfiles" and len(rel) == 2:
        return root, rel[1].split(".")[0].removesuffix("_selection")
    if rel[0] == "ST-imgs" and len(rel) >= 3:
        return root, rel[2]
    return root, None


def _plain_image_is_large(path: Path) -> bool:
    try:
        from ..io.decode import image_size

        return max(image_size(path)) >= Default.READER_MIN_PLAIN_IMAGE_SIDE
    except Exception:  # not an image we can size: not ours
        return False


def recognise(path: str | os.PathLike) -> tuple[Path, str | None] | None:
    """(path to give ``load_sample``, section name) if this reader should open ``path``, else None.

    Recognition is the IO layer's own format detection (``io.detect_format``), plus: a path
    inside a her2st-style dataset opens that section, and small .jpg/.png photos stay napari's.
    """
    from ..errors import ComtipError
    from ..io import detect_format

    p = Path(path).expanduser()
    if not p.exists():
        return None
    member = her2st_member(p)
    if member is not None:
        return member
    try:
        fmt = detect_format(p)
    except ComtipError:
        return None
    if fmt == "bare" and p.suffix.lower() in _PLAIN_SUFFIXES and not _plain_image_is_large(p):
        return None
    return p, None


# --------------------------------------------------------------------------- napari entry point
def get_reader(path):
    """npe2 reader hook: a reader function for ``path``, or None when it is not ours."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    targets = [recognise(p) for p in paths]
    if not paths or any(t is None for t in targets):
        return None
    return lambda _paths, stack=False: read_targets(targets)  # noqa: ARG005 - napari passes stack


def read_targets(targets):
    """Load each (path, sample) and return its layers; errors become notifications."""
    from napari.utils import progress as napari_progress
    from napari.utils.notifications import show_error, show_info

    from ..errors import ComtipError
    from ..io import detect_format, list_samples, load_sample
    from ..io.slide import open_image
    from ._layers import sample_layers, slide_only_layer

    layers = []
    for path, section in targets:
        try:
            fmt = detect_format(path)
            if section is None and fmt != "bare":
                names = list_samples(path)
                if len(names) > 1:  # several samples: open the first, name the others
                    section = names[0]
                    if her2st_root(path) == path:
                        how = "open its folder ST-imgs/<patient>/<section> or its count file ST-cnts/<section>.tsv.gz"
                    elif fmt == "visium" and path.is_dir():
                        how = f"open its run folder (e.g. {path / names[1]}) or run: comtip view {path} --sample <name>"
                    else:
                        how = f"run: comtip view {path} --sample <name>"
                    show_info(f"{path.name}: opened {section}; this dataset also holds {', '.join(names[1:])}. "
                              f"To open another, {how}.")
            with napari_progress(total=0, desc=f"opening {path.name}") as pbar:
                def progress(done, total=None, message=None, _p=pbar):
                    if total is not None and _p.total != total:
                        _p.total = total
                    _p.n = done
                    if message:
                        _p.set_description(f"opening {path.name}: {message}")
                    _p.refresh()

                if fmt == "bare":
                    image, mpp = open_image(path, progress=progress)
                    if mpp is None:  # a JPEG/PNG: no resolution recorded in the file
                        layers.append(slide_only_layer(image, path, name=path.name.split(".")[0]))
                        show_info(f"{path.name}: the file does not record its resolution. Set 'µm per pixel' in "
                                  f"Plugins > CoMTIP spatial expression > Predict expression and press Run: spots are "
                                  f"then laid over the tissue.")
                        continue
                sample = load_sample(path, sample=section, progress=progress)
        except ComtipError as exc:
            show_error(str(exc))
            continue
        layers.extend(sample_layers(sample))
    # napari's "read fine, nothing to add" sentinel: no traceback, no second reader tried
    return layers or [(None,)]


__all__ = ["get_reader", "recognise", "her2st_root", "her2st_member", "read_targets"]
