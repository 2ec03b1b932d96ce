"""The CoMTIP model: config and presets, masked ViT, Gene-Text Encoder, losses, checkpoints.

Import the public API from here::

    from napari_comtip.model import get_preset, build_model, save_checkpoint, load_checkpoint
"""

from __future__ import annotations

from .checkpoint import (
    FORMAT_VERSION,
    Bank,
    LoadedCheckpoint,
    checkpoint_digest,
    default_checkpoint_path,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .comtip import CoMTIP, clip_loss
from .config import MODEL_VERSION, ComtipConfig
from .factory import build_model, embed_gene_names
from .presets import PRESETS, describe_presets, get_preset, preset_names
from .sentences import permute_values, sample_gene_subsets

__all__ = [
    "FORMAT_VERSION",
    "MODEL_VERSION",
    "PRESETS",
    "Bank",
    "CoMTIP",
    "ComtipConfig",
    "LoadedCheckpoint",
    "build_model",
    "checkpoint_digest",
    "clip_loss",
    "default_checkpoint_path",
    "describe_presets",
    "embed_gene_names",
    "get_preset",
    "load_checkpoint",
    "permute_values",
    "preset_names",
    "read_checkpoint",
    "sample_gene_subsets",
    "save_checkpoint",
]
