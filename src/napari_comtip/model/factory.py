"""The one place a CoMTIP model is built.

``build_model(config, gene_panel)`` embeds the panel's gene names with the configured frozen
text model (cached on disk), builds the network and, if ``vision.weights`` names a local file,
loads it into the ViT. Loading a checkpoint passes the stored name embeddings instead, so
inference never needs the text model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from .comtip import CoMTIP
from .config import ComtipConfig
from .presets import get_preset
from .text import embed_gene_names as _embed_gene_names
from .vision import load_vision_weights


def embed_gene_names(genes: Sequence[str], text_model: str | os.PathLike | None = None, **kwargs) -> torch.Tensor:
    """(G, d) float32 name embeddings of ``genes`` from a local text model (default all-MiniLM-L6-v2),
    cached on disk per (text model, panel)."""
    return _embed_gene_names(genes, text_model, **kwargs)


def check_panel(gene_panel: Sequence[str]) -> list[str]:
    panel = [str(g) for g in gene_panel]
    if not panel:
        raise ConfigError("the gene panel is empty", hint="give at least one gene symbol")
    seen: set[str] = set()
    dups = [g for g in panel if g in seen or seen.add(g)]
    if dups:
        raise ConfigError(f"the gene panel lists genes twice: {', '.join(sorted(set(dups))[:10])}", hint="make gene symbols unique")
    return panel


def build_model(
    config: ComtipConfig | str,
    gene_panel: Sequence[str],
    name_embeddings: torch.Tensor | None = None,
    *,
    load_weights: bool = True,
) -> CoMTIP:
    """Build a CoMTIP model for ``gene_panel`` (symbols, in order).

    ``config`` may be a preset name. ``name_embeddings`` (G, d) skips the text model (used when
    loading a checkpoint); ``load_weights=False`` skips ``vision.weights`` (the checkpoint has them).
    """
    if isinstance(config, str):
        config = get_preset(config)
    if not isinstance(config, ComtipConfig):
        raise TypeError(f"config must be a ComtipConfig or a preset name, got {type(config).__name__}")
    config.validate()
    panel = check_panel(gene_panel)
    needs_names = config.text.mode != "values" and config.text.use_name_embedding
    if needs_names and name_embeddings is None:
        name_embeddings = embed_gene_names(panel, config.text.model_path, template=config.text.name_template)
    if not needs_names:
        name_embeddings = None
    model = CoMTIP(config, panel, name_embeddings)
    if load_weights and config.vision.weights:
        model.weights_report = load_vision_weights(model.vision.vit, config.vision.weights, config.vision.name)
    return model
