"""Reader for a HEST-1k sample folder.

Layout (one or many sample ids)::

    st/<id>.h5ad          spots (obsm['spatial'] = (x, y) in pixels of the WSI) and counts
    wsis/<id>.tif         the pyramidal whole-slide image (read lazily through tiffslide)
    metadata/<id>.json    pixel size (``pixel_size_um_estimated``, else ``pixel_size_um_embedded``),
                          ``spot_diameter`` (um), ``st_technology``, ...

The microns per pixel come from the metadata (the figure HEST estimated for the WSI), falling
back to the slide's own TIFF metadata and then to the scale factors in the h5ad.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..constants import Default
from ..errors import InputError
from .h5ad import read_h5ad
from .record import SpatialSample

FORMAT = "hest"
_WSI_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".svs", ".ndpi")
_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded", "pixel_size_um")


def is_hest(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "st").is_dir() and ((path / "wsis").is_dir() or (path / "metadata").is_dir()) \
        and any((path / "st").glob("*.h5ad"))


def list_samples(root: str | os.PathLike) -> list[str]:
    return sorted(p.name[: -len(".h5ad")] for p in (Path(root) / "st").glob("*.h5ad"))


def _find_wsi(root: Path, sid: str) -> Path | None:
    for suf in _WSI_SUFFIXES:
        p = root / "wsis" / f"{sid}{suf}"
        if p.is_file():
            return p
    return None


def read_metadata(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot parse the sample metadata ({type(exc).__name__}: {exc})", path=path,
                         hint="re-download metadata/<id>.json from HEST") from None
    if not isinstance(meta, dict):
        raise InputError("the sample metadata is not a JSON object", path=path, hint="re-download it from HEST")
    return meta


def read_hest(root: str | os.PathLike, sample: str | None = None, slide: str | os.PathLike | None = None,
              mpp: float | None = None, progress=None) -> SpatialSample:
    root = Path(root)
    ids = list_samples(root)
    if sample is None:
        if len(ids) != 1:
            raise InputError(f"this HEST folder holds {len(ids)} samples ({', '.join(ids)})", path=root,
                             hint="choose one with --sample")
        sample = ids[0]
    if sample not in ids:
        raise InputError(f"unknown sample {sample!r}", path=root, hint=f"available samples: {', '.join(ids)}")
    h5 = root / "st" / f"{sample}.h5ad"
    wsi = Path(slide) if slide else _find_wsi(root, sample)
    if wsi is None:
        raise InputError(f"no whole-slide image for {sample}", path=root / "wsis",
                         hint=f"expected wsis/{sample}.tif, or pass --slide")
    meta_file = root / "metadata" / f"{sample}.json"
    meta = read_metadata(meta_file) if meta_file.is_file() else {}
    mpp_hint = None
    for key in _MPP_KEYS:
        v = meta.get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if v > 0 and math.isfinite(v):
            mpp_hint = (v, f"metadata/{sample}.json {key}")
            break
    spot_um = None
    try:
        spot_um = float(meta["spot_diameter"]) if meta.get("spot_diameter") else None
    except (TypeError, ValueError):
        spot_um = None
    if spot_um is None:
        tech = str(meta.get("st_technology", "")).lower()
        if "visium" in tech:
            spot_um = Default.VISIUM_SPOT_UM
        elif "spatial transcriptomics" in tech:
            spot_um = Default.LEGACY_ST_SPOT_UM
    s = read_h5ad(h5, sample=None, slide=wsi, mpp=mpp, progress=progress, mpp_hint=mpp_hint, spot_um=spot_um,
                  fmt=FORMAT, name=sample, extra_inputs=[str(meta_file)] if meta_file.is_file() else [])
    s.provenance.update({"root": str(root), "sample": sample, "metadata": str(meta_file) if meta_file.is_file() else None,
                         "st_technology": meta.get("st_technology")})
    return s


__all__ = ["read_hest", "list_samples", "is_hest", "FORMAT"]
