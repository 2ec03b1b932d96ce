"""Frozen-encoder feature cache: a fixed ViT's pooled features, computed once per patch and view.

With ``model.vision.freeze: true`` the ViT never changes, so running it on every training step
repeats the same work each epoch. Here each spot patch gets ``training.feature_views`` augmented
views; the view of spot ``i`` in epoch ``e`` is ``e mod views``, its augmentation is seeded from
``(training.seed, i, view)`` only (not from the step), and its pooled ViT features are computed
the first time that (spot, view) is drawn and stored on disk. From epoch ``views + 1`` on no
ViT pass is left; a later run with the same signature (another ``lr``, more epochs, a resume)
reuses the file from its first step.

The store is a folder under ``cache_dir("features")`` named by a signature of everything the
features depend on: the ViT's weights (a digest of every tensor), its settings (architecture,
input size, pooling, normalisation), the patch pixels and spot ids (the data files and the patch
geometry), the augmentation settings, the seed, the number of views, and the precision (bf16 on
CUDA). ``features.npy`` (views, spots, F) float32 and ``done.npy`` (views, spots) are memory maps;
a row is marked done only after its features are flushed, so a killed run leaves no half-written
row behind. Hook in the training loop: :func:`open_feature_cache` (None when the ViT trains),
then ``features(spot_idx, epoch)`` in place of ``preprocess`` + ViT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.foundation import fully_frozen

FORMAT = 1
_SALT = 48_271


def view_seed(seed: int, spot: int, view: int) -> int:
    """The augmentation seed of one (spot, view): independent of the step, so the view repeats."""
    return (int(seed) * 1_000_003 + int(spot) * 7919 + int(view) * 104_729 + _SALT * 15_485_863) % (2**63 - 1)


def view_images(patches, idx: np.ndarray, view: int, seed: int, augment) -> torch.Tensor:
    """(B, S, S, 3) uint8: view ``view`` of the patches ``idx``, each augmented with its own generator."""
    idx = np.asarray(idx, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    raw = np.asarray(patches[idx[order]])  # sorted: sequential reads of a memory-mapped patch file
    raw = raw[np.argsort(order, kind="stable")]
    out = []
    for i, spot in enumerate(idx):
        g = torch.Generator().manual_seed(view_seed(seed, int(spot), view))
        out.append(augment(torch.from_numpy(np.ascontiguousarray(raw[i:i + 1])), g))
    return torch.cat(out) if out else torch.zeros((0, *raw.shape[1:]), dtype=torch.uint8)


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor of ``module`` (names, shapes, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _array_digest(arr) -> str:
    h = hashlib.blake2b(digest_size=16)
    n = len(arr)
    h.update(repr((n, tuple(np.shape(arr)[1:]), str(np.asarray(arr[:0]).dtype))).encode())
    for s in range(0, n, 4096):  # chunks: a memory-mapped patch file is never read whole
        h.update(np.ascontiguousarray(arr[s:s + 4096]).tobytes())
    return h.hexdigest()


def signature(model, ts, cfg, *, use_bf16: bool) -> dict[str, Any]:
    """Everything the cached features depend on (see the module docstring)."""
    v = model.config.vision
    d = cfg.data
    return {
        "format": FORMAT,
        "weights": weights_digest(model.vision.vit),
        "vision": {"name": v.name, "overrides": v.overrides, "img_size": v.img_size, "pool": v.pool,
                   "mean": list(v.mean or []), "std": list(v.std or [])},
        "patch_um": float(model.config.patch_um),
        "patches": _array_digest(ts.patches),
        "spots": hashlib.blake2b("\n".join(ts.spot_ids).encode(), digest_size=16).hexdigest(),
        "augment": {k: getattr(d, k) for k in ("flips", "rot90", "hed_sigma", "hed_bias", "brightness",
                                                "contrast", "saturation")},
        "seed": int(cfg.training.seed),
        "views": int(cfg.training.feature_views),
        "precision": "bf16" if use_bf16 else "fp32",
    }


class FeatureCache:
    """Pooled features of a fixed ViT per (view, spot), on disk; see the module docstring."""

    def __init__(self, model, ts, cfg, device: torch.device, *, use_bf16: bool = False,
                 root: str | os.PathLike | None = None):
        from ..io.cache import cache_dir

        self.model, self.ts, self.device, self.use_bf16 = model, ts, torch.device(device), use_bf16
        self.seed, self.views = int(cfg.training.seed), int(cfg.training.feature_views)
        self.batch = max(1, int(cfg.training.batch_size))
        from .batches import Augment

        self.augment = Augment(cfg.data)
        self.signature = signature(model, ts, cfg, use_bf16=use_bf16)
        key = hashlib.blake2b(json.dumps(self.signature, sort_keys=True).encode(), digest_size=12).hexdigest()
        self.dir = Path(root if root is not None else cache_dir("features")) / key
        self.shape = (self.views, ts.n_spots, int(model.feature_dim))
        self._open()
        self.computed = 0
        self.reused = 0

    # ------------------------------------------------------------------ store
    def _valid(self, d: Path) -> bool:
        try:
            sig = json.loads((d / "signature.json").read_text())
            f = np.load(d / "features.npy", mmap_mode="r")
            done = np.load(d / "done.npy", mmap_mode="r")
        except (OSError, ValueError):
            return False
        return sig == json.loads(json.dumps(self.signature)) and f.shape == self.shape and done.shape == self.shape[:2]

    def _open(self) -> None:
        if not self._valid(self.dir):
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}-", dir=self.dir.parent))
            np.lib.format.open_memmap(tmp / "features.npy", "w+", np.float32, self.shape).flush()
            np.lib.format.open_memmap(tmp / "done.npy", "w+", np.uint8, self.shape[:2]).flush()
            (tmp / "signature.json").write_text(json.dumps(self.signature, indent=1, sort_keys=True))
            if self.dir.exists() and not self._valid(self.dir):  # damaged (or another process's, half made)
                shutil.rmtree(self.dir, ignore_errors=True)
            try:
                os.replace(tmp, self.dir)
            except OSError:  # another process (a DDP rank) created it first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        self.feats = np.load(self.dir / "features.npy", mmap_mode="r+")
        self.done = np.load(self.dir / "done.npy", mmap_mode="r+")

    # ------------------------------------------------------------------ use
    @torch.no_grad()
    def compute(self, idx: np.ndarray, view: int) -> np.ndarray:
        """Features of view ``view`` of spots ``idx``, computed now (nothing stored)."""
        out = []
        for s in range(0, len(idx), self.batch):
            imgs = view_images(self.ts.patches, idx[s:s + self.batch], view, self.seed, self.augment)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                f = self.model.image_features(self.model.preprocess(imgs.to(self.device)))
            out.append(f.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.shape[2]), np.float32)

    def features(self, idx, epoch: int) -> torch.Tensor:
        """(B, F) pooled features of the spots ``idx`` in ``epoch`` (view ``epoch mod views``), on the device."""
        idx = np.asarray(idx, dtype=np.int64)
        view = int(epoch) % self.views
        miss = idx[self.done[view, idx] == 0]
        if len(miss):
            miss = np.unique(miss)
            self.feats[view, miss] = self.compute(miss, view)
            self.feats.flush()
            self.done[view, miss] = 1
            self.done.flush()
        self.computed += len(miss)
        self.reused += len(idx) - len(miss)
        return torch.from_numpy(np.asarray(self.feats[view, idx])).to(self.device)

    def stats(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "views": self.views, "computed": int(self.computed), "reused": int(self.reused)}


def open_feature_cache(model, ts, cfg, device, *, use_bf16: bool = False) -> FeatureCache | None:
    """The cache of a run whose ViT is fixed (``model.vision.freeze: true``) and
    ``training.feature_cache`` is on; None otherwise (the loop then runs the ViT)."""
    if not cfg.training.feature_cache or not fully_frozen(cfg.model.vision.freeze):
        return None
    return FeatureCache(model, ts, cfg, device, use_bf16=use_bf16)


__all__ = ["FeatureCache", "open_feature_cache", "signature", "view_images", "view_seed", "weights_digest"]
