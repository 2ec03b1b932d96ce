"""The embedding signature and the on-disk embedding cache.

One signature says which embeddings a sample gets from a model: the sample's image identity, a
hash of its spot centres, the number of spots, its microns per pixel, the digest of the weights
in memory, the patch size in µm, the encoder's input size, the pad value of patches past the
edge and the compute precision (:func:`embedding_signature`). It serves every place embeddings
are kept or handed over:

* the disk cache: an entry lives in ``cache_dir("embeddings")/<name>-<key>/`` (key =
  :func:`signature_key`) with its ``signature.json``, compared field by field before reuse
  (:func:`load_entry`); any difference (or an unreadable or short array) means the entry is
  recomputed and replaced, never silently reused. Entries appear atomically (written in a
  temporary folder, then renamed: :func:`publish_entry`);
* the Predict widget's in-memory session (``_widgets/_session.py``), keyed by the same key;
* embeddings passed in to ``predict_sample(embeddings=...)``, compared in full
  (:func:`check_signature`).

:class:`Sink` holds a run's outputs: preallocated arrays in memory, or ``.npy`` files written
with positional writes when the results are streamed to disk (not a writable memory map, whose
dirty pages would count as resident memory); they come back as read-only memory maps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..constants import Default
from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..io.record import SpatialSample

log = logging.getLogger(__name__)

#: Version of the cache layout and of what is hashed into a signature; bump to invalidate.
CACHE_FORMAT = 1


# =========================================================================== what is hashed
def model_img_size(model: torch.nn.Module) -> int:
    """The side in pixels patches are read at for this model: ``config.vision.img_size``, or
    ``vision.morphology_px`` when the probe reads full-resolution morphology (``input_px``)."""
    from ..model.reading import input_px

    return input_px(model.config)


def model_patch_um(model: torch.nn.Module) -> float:
    """The physical side of a spot patch the model was trained with (``config.patch_um``)."""
    return float(model.config.patch_um)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (names, shapes, dtypes, bytes), 16 hex digits.

    This is the "checkpoint digest" of the embedding signature: it identifies the weights
    actually in memory, so a model that was fine-tuned after loading never reuses its old
    embeddings. The digest is memoised on the module and recomputed when any tensor's in-place
    version counter moves (an optimizer step, ``load_state_dict``) or a tensor is replaced.
    """
    state = model.state_dict()
    stamp = tuple((k, id(v), v._version) for k, v in state.items())
    memo = model.__dict__.get("_comtip_weights_digest")
    if memo is not None and memo[0] == stamp:
        return memo[1]
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()[:16]
    model.__dict__["_comtip_weights_digest"] = (stamp, digest)
    return digest


def coords_digest(sample: "SpatialSample") -> str:
    """SHA-256 of the spot centres (row, col, float64, in spot order), 16 hex digits."""
    rc = np.ascontiguousarray(sample.centers_rc(), dtype=np.float64)
    h = hashlib.sha256(str(rc.shape).encode())
    h.update(rc.tobytes())
    return h.hexdigest()[:16]


# =========================================================================== the signature
def embedding_signature(sample: "SpatialSample", model: torch.nn.Module, *, precision: str) -> dict[str, Any]:
    """Everything the embeddings of ``sample`` under ``model`` at ``precision`` depend on."""
    return {
        "format": CACHE_FORMAT,
        "sample_identity": str(sample.identity),
        "coords_sha256": coords_digest(sample),
        "n_spots": int(sample.n_spots),
        "mpp": float(sample.mpp),
        "weights_digest": weights_digest(model),
        "patch_um": model_patch_um(model),
        "img_size": model_img_size(model),
        "features": str(getattr(model, "probe_feature_spec", "vit")),
        "pad_value": int(Default.PAD_VALUE),
        "precision": str(precision),
    }


def signature_key(signature: dict[str, Any]) -> str:
    """A short hash of the whole signature: the cache entry's and the widget session's key."""
    blob = json.dumps(signature, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def signature_diff(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The fields in which two signatures differ (sorted)."""
    return sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))


def check_signature(given: dict[str, Any] | None, expected: dict[str, Any], *, sample_name: str) -> None:
    """Refuse embeddings whose signature is not ``expected`` in every field (:class:`InputError`)."""
    if not given:
        raise InputError(f"the given embeddings of '{sample_name}' carry no signature",
                         hint="pass embeddings made by embed_sample, or none (they are then computed)")
    diff = signature_diff(given, expected)
    if diff:
        parts = ", ".join(f"{k} {given.get(k)!r} instead of {expected.get(k)!r}" for k in diff)
        raise InputError(f"the given embeddings do not belong to sample '{sample_name}' with this model "
                         f"({parts})", hint="recompute them for this sample, checkpoint and device")


# =========================================================================== cache entries
def embeddings_cache_root() -> Path:
    from ..io.cache import cache_dir

    root = Path(cache_dir("embeddings"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    return keep[:40] or "sample"


def entry_path(sample_name: str, signature: dict[str, Any]) -> Path:
    """The cache folder of the embeddings with this signature."""
    return embeddings_cache_root() / f"{_safe_name(sample_name)}-{signature_key(signature)}"


def load_entry(path: Path, signature: dict[str, Any], *, features: bool, stream: bool) -> dict[str, Any] | None:
    """Arrays of a cache entry if its stored signature and shapes match, else ``None`` (with a log line).

    ``stream``: return read-only memory maps instead of arrays in memory. The entry's record of
    how it was computed comes back under ``"_computed"``.
    """
    sig_file = path / "signature.json"
    if not sig_file.is_file():
        return None
    try:
        stored = json.loads(sig_file.read_text())
    except (OSError, ValueError):
        log.warning("embedding cache %s: unreadable signature, recomputing", path)
        return None
    if not isinstance(stored, dict):
        return None
    meta = stored.pop("arrays", {})
    computed = stored.pop("computed", {})
    diff = signature_diff(stored, signature)
    if diff:
        log.warning("embedding cache %s: signature differs in %s, recomputing", path, ", ".join(diff))
        return None
    wanted = ["image"] + (["features"] if features else [])
    out: dict[str, Any] = {}
    for name in wanted:
        f = path / f"{name}.npy"
        if name not in meta or not f.is_file():
            return None  # e.g. features requested but only image embeddings were cached
        try:
            arr = np.load(f, mmap_mode="r")
        except (OSError, ValueError):
            log.warning("embedding cache %s: %s.npy unreadable, recomputing", path, name)
            return None
        if arr.shape != (signature["n_spots"], meta[name]) or arr.dtype != np.float32:
            log.warning("embedding cache %s: %s.npy has shape %s, recomputing", path, name, arr.shape)
            return None
        out[name] = arr if stream else np.array(arr)
    out["_computed"] = computed if isinstance(computed, dict) else {}
    return out


def publish_entry(tmp_dir: Path, entry: Path, signature: dict[str, Any], arrays: dict[str, int],
                  computed: dict[str, Any]) -> None:
    """Write ``signature.json`` into the finished ``tmp_dir`` and rename it to ``entry`` (atomic)."""
    meta = dict(signature)
    meta["arrays"] = arrays
    meta["computed"] = computed
    (tmp_dir / "signature.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp_dir, entry)


# =========================================================================== a run's outputs
def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    if hasattr(os, "pwrite"):
        while data:
            k = os.pwrite(fd, data, pos)
            data, pos = data[k:], pos + k
    else:  # pragma: no cover - Windows
        os.lseek(fd, pos, os.SEEK_SET)
        os.write(fd, data)


class Sink:
    """Preallocated outputs: numpy arrays in memory, or ``.npy`` files written with ``pwrite``."""

    def __init__(self, n: int, directory: Path | None):
        self.n = n
        self.dir = directory
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, tuple[int, int, int]] = {}  # name -> (fd, data offset, row bytes)

    def allocate(self, name: str, dim: int) -> None:
        if self.dir is None:
            self.arrays[name] = np.empty((self.n, dim), dtype=np.float32)
            return
        path = self.dir / f"{name}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                    "shape": (self.n, dim)})
            offset = f.tell()
            f.truncate(offset + self.n * dim * 4)
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        self.files[name] = (fd, offset, dim * 4)

    def has(self, name: str) -> bool:
        return name in self.arrays or name in self.files

    def write(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (len(rows), dim) at the output rows ``rows`` (any order)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        if self.dir is None:
            self.arrays[name][rows] = values
            return
        fd, offset, row = self.files[name]
        # runs of consecutive rows become one positional write each
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            _pwrite_all(fd, values[a:b].tobytes(), offset + int(rows[a]) * row)

    def close(self) -> None:
        for fd, _, _ in self.files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files = {k: (-1, o, r) for k, (_, o, r) in self.files.items()}

    def save(self, directory: Path) -> dict[str, int]:
        """Make sure every array exists as ``directory/<name>.npy``; return their widths."""
        dims = {}
        for name, arr in self.arrays.items():
            np.save(directory / f"{name}.npy", arr)
            dims[name] = int(arr.shape[1])
        for name, (_, _, row) in self.files.items():
            dims[name] = row // 4
        return dims

    def result(self, directory: Path | None) -> dict[str, np.ndarray]:
        if self.dir is None:
            return dict(self.arrays)
        assert directory is not None
        return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in self.files}


__all__ = ["CACHE_FORMAT", "embedding_signature", "signature_key", "signature_diff", "check_signature",
           "weights_digest", "coords_digest", "model_img_size", "model_patch_um", "embeddings_cache_root",
           "entry_path", "load_entry", "publish_entry", "Sink"]
