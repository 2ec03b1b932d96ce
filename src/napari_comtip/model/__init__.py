"""The CoMTIP model: config and presets, masked ViT, Gene-Text Encoder, losses, checkpoints.

Import the public API from here::

    from napari_comtip.model import get_preset, build_model, save_checkpoint, load_checkpoint
"""

from __future__ import annotations

from .bundled import bundled_names, default_checkpoint_path, resolve_checkpoint
from .catalogue import checkpoint_info, list_bundled
from .checkpoint import (
    FORMAT_VERSION,
    Bank,
    Checkpoint,
    StoredProbe,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .checkpoint_file import checkpoint_digest
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
    "Checkpoint",
    "CoMTIP",
    "ComtipConfig",
    "StoredProbe",
    "build_model",
    "bundled_names",
    "checkpoint_digest",
    "checkpoint_info",
    "clip_loss",
    "default_checkpoint_path",
    "describe_presets",
    "embed_gene_names",
    "get_preset",
    "list_bundled",
    "load_checkpoint",
    "permute_values",
    "preset_names",
    "read_checkpoint",
    "resolve_checkpoint",
    "sample_gene_subsets",
    "save_checkpoint",
]
