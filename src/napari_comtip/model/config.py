"""The CoMTIP configuration: one dataclass tree that names every hyperparameter.

A :class:`ComtipConfig` is what :func:`napari_comtip.model.factory.build_model` builds from and
what a checkpoint stores (``config.to_dict()``), so a checkpoint can always rebuild its own
network. ``from_dict`` refuses keys it does not know (a typo in a YAML file must not be silently
ignored) with a :class:`~napari_comtip.errors.ConfigError` that names the key.

The presets (``tiny`` for a CPU, ``base`` for a GPU, ...) are whole training recipes shipped as
package data and read by :mod:`napari_comtip.model.presets`, whose ``get_preset`` returns the
model part of one as an independent copy that callers may modify.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..constants import Default
from ..errors import ConfigError
from .config_checks import check_ranges, fully_frozen

#: Version of the network definition. Bump it when a change makes old weights meaningless.
MODEL_VERSION = 1

TEXT_MODES = ("names+values", "names", "values")
VALUE_ENCODINGS = ("fourier", "binned")
TOKEN_COMBINATIONS = ("sum", "concat")
POOLS_VISION = ("cls", "mean", "cls+mean")  # cls+mean: both concatenated (Virchow2's embedding)
#: test-time views a model may average its pooled features over (``vision.test_views``): the
#: patch itself; + its mirror image; + upside down and turned by 180 degrees; all 8 symmetries of
#: the square (H&E tissue has no preferred orientation; model/vision.py ``dihedral_view``)
TEST_VIEWS = (1, 2, 4, 8)
#: config keys that change how a trained model reads a patch at inference, never a training step:
#: a checkpoint may be switched after training (model/checkpoint.py ``update_checkpoint``; its
#: probe, bank and zero-shot spread are then re-fitted, engine/bank_probe.py ``refit_probe``)
READING_KEYS = ("vision.colour_features", "vision.test_views", "vision.morphology_px", "vision.probe_input")
#: what the probe reads (``vision.probe_input``): the pooled features (with the reading's statistics),
#: those and the image embedding side by side, or the image embedding alone (docs/model.md "Probe input")
PROBE_INPUTS = ("features", "features+embedding", "embedding")
MAX_MORPHOLOGY_PX = 1024  # largest side vision.morphology_px may read a patch at
POOLS_TEXT = ("attention", "mean")
VALUE_TRANSFORMS = ("lognorm", "spot_rank", "gene_z")
MFM_LOSSES = ("mse", "cosine")
SUBSET_SIZES = ("batch", "spot")


@dataclass
class VisionConfig:
    """Image encoder: a timm ViT, its input size and how its tokens are pooled."""

    name: str = "vit_tiny_patch16_224"  # any timm VisionTransformer by name
    img_size: int = 112  # square input side in pixels (patches are resized to this)
    overrides: dict = field(default_factory=dict)  # extra kwargs for timm.create_model (depth, embed_dim, ...)
    weights: str | None = None  # optional local weight file (.safetensors/.bin/.pth/.pt), a state dict
    pool: str = "mean"  # "mean" of the patch tokens, the "cls" token or "cls+mean" -> global image feature
    mean: list | None = None  # RGB normalisation; None = the weights' config.json, else timm's config for `name`
    std: list | None = None
    drop_path_rate: float = 0.0
    # bring-your-own foundation model (docs/foundation-models.md)
    freeze: Any = False  # true: the ViT is fixed (only heads + text train); false; N: train the last N blocks
    licence: str | None = None  # the backbone's licence terms, recorded in checkpoints and model cards
    # morphology prior of the probe: append the 70 colour-texture statistics of the encoder's own
    # input patch (model/colour.py, the floor's features) to the pooled features the probe and the
    # embedding cache read; training, the embedding and zero-shot are unchanged (docs/model.md)
    colour_features: bool = False
    # test-time views: at inference the pooled features (so the embedding, the probe's features,
    # zero-shot and retrieval) are the mean over this many flips/rotations of each patch
    # (TEST_VIEWS; training is unchanged; docs/model.md "Test-time views")
    test_views: int = 1
    # high-resolution morphology prior of the probe: 0 = off; else patches are read at this side
    # (224 = 0.69 um/px for a 155 um patch), the ViT still sees them at img_size, and the probe also
    # reads 92 statistics of the full-resolution patch: colour-texture, H/E/DAB colour deconvolution,
    # nuclear density, size and staining (model/morphology.py; training is unchanged; docs/model.md)
    morphology_px: int = 0
    probe_input: str = "features"  # PROBE_INPUTS: what the probe reads (training is unchanged)


@dataclass
class MaskConfig:
    """Masked Feature Modelling (MFM): the masked branch and its mask feature generator."""

    loss: str = "mse"  # "mse" or "cosine" (1 - cos) between predicted and target token features
    generator_heads: int = 0  # heads of the cross-attention generator; 0 = same as the ViT
    generator_mlp_ratio: float = 2.0
    normalize_target: bool = True  # layer-norm the (stop-gradient) target features, as in data2vec/MAE


@dataclass
class TextConfig:
    """Gene-Text Encoder: gene names + values -> spot text embedding."""

    mode: str = "names+values"  # "names+values" (CoMTIP), "names" (OmiCLIP-style), "values" (BLEEP-style)
    model_path: str | None = None  # local Hugging Face text model; None = bundled all-MiniLM-L6-v2
    name_template: str = "{gene}"  # the text embedded for each gene symbol
    use_name_embedding: bool = True  # ablation switch: drop the pretrained name embedding
    use_gene_embedding: bool = True  # the learnable per-gene embedding
    value_encoding: str = "fourier"  # "fourier" (continuous) or "binned"
    fourier_features: int = 16  # number of log-spaced frequencies
    fourier_max_freq: float = 8.0  # highest frequency (cycles per unit of log-normalised value)
    value_bins: int = 32  # "binned": bins over (0, value_max]; bin 0 is exactly zero
    value_max: float = 8.0  # "binned": upper edge of the last bin (log1p of TARGET_SUM-normalised counts)
    combination: str = "sum"  # "sum" of the three parts, or "concat" -> linear
    width: int = 192  # token width of the set transformer
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    pool: str = "attention"  # "attention" (learned query) or "mean" over valid tokens
    # True: a sentence's gene tokens attend to each other (a set transformer). False: each token
    # passes the blocks on its own (DeepSets): a sentence is the pool of per-gene terms, so the
    # one-gene sentences of zero-shot read exactly the terms a long training sentence is made of
    # and sentences can be long at a cost linear in their length (docs/model.md)
    token_mixing: bool = True
    # names+values: each gene also gets a learned value direction d_g, and its token adds v * d_g to
    # the shared value embedding f(v), so a token's value part depends on its gene directly (the
    # linear term of the profile head's first layer, restricted to the sentence's genes); False:
    # gene and value meet only inside the blocks (docs/model.md)
    gene_value_direction: bool = False
    # names+values: a second pathway beside the set transformer that scatters the sentence into a
    # dense panel vector (its values, and a flag per gene it names; the genes it does not name at 0)
    # and reads it with the profile head's MLP; the two pooled states are added before the
    # projection. Each input position is one gene, so a value is bound to its gene by construction
    # (docs/model.md, "Sparse pathway")
    sparse_pathway: bool = False
    top_k: int = 50  # "names" mode: the k most expressed genes make the sentence (OmiCLIP)
    min_genes: int = 1  # training gene subsets: size drawn log-uniformly in [min_genes, max_genes]
    max_genes: int = 64
    p_single: float = 0.1  # extra probability that a training subset is one gene (zero-shot sentences)
    subset_sizes: str = "batch"  # "batch": one size per batch (no padding, ~4x cheaper); "spot": one per spot
    expressed_weight: float = 10.0  # sampling weight of an expressed gene in a subset (a zero has 1; 1 = uniform)
    values_mlp_layers: int = 2  # "values" mode: depth of the expression MLP
    # names+values: one extra token per sentence carrying the spot's library size (log total counts,
    # standardised over the training spots); zero-shot sentences carry the training mean (0), so a
    # gene's value is read at a typical depth instead of standing in for it (docs/model.md)
    library_token: bool = False
    # names+values: what a token's value is. "lognorm": log1p(counts / library x 10,000);
    # "spot_rank": the gene's mid-rank among the spot's detected genes / their number (0 = not
    # detected, 1 = the spot's most expressed gene), scGPT-style within-spot normalisation, so a
    # value says how high the gene is *in this spot*, whatever its depth; zero-shot maps the
    # expected rank back to log-normalised units by a per-gene line fitted on the training spots;
    # "gene_z": the value standardised per gene over the training spots ((x - mean) / sd, clamped to
    # Default.GENE_Z_RANGE), so a token says how high the gene is *compared with other spots*
    # (the genes of a sentence are still drawn by the lognorm values: expressed ones weighted)
    value_transform: str = "lognorm"


@dataclass
class PaatConfig:
    """Pair-aware Adversarial Training: negatives that keep genes and values but break the pairing."""

    n_negatives: int = 4  # value permutations per spot
    discriminator: bool = False  # add a pair-consistency discriminator (BCE) to the PAAT term
    w_discriminator: float = 1.0
    adversarial: bool = False  # FGSM perturbation of the value embeddings + consistency term
    adv_epsilon: float = 0.05  # step size, relative to the RMS of the value embeddings
    w_adversarial: float = 1.0


@dataclass
class ZeroShotConfig:
    """Zero-shot prediction: a grid of candidate values per gene and a softmax temperature."""

    grid: int = Default.ZERO_SHOT_GRID  # number of candidate values v per gene
    temperature: float | None = None  # None = the learned CLIP temperature (1 / logit_scale)
    default_max: float = 5.0  # grid upper end when the model has not recorded a value range
    chunk: int = 8192  # sentences encoded per batch
    # the value-grid training term (ComtipConfig.w_grid, model/grid_term.py): genes drawn per batch
    # (by their variance in the batch) and the width of the soft label, in grid steps
    train_genes: int = 16
    train_sigma: float = 1.0


@dataclass
class ImageSSLConfig:
    """Image self-distillation against an EMA teacher (ComtipConfig.w_image_ssl, model/image_ssl.py)."""

    momentum: float = 0.99  # the teacher's EMA momentum per step
    dim: int = 128  # projector and predictor output (their hidden layers: twice that)
    crop_scale: float = 0.5  # the second view is a random crop of at least this fraction of the patch's area


@dataclass
class ComtipConfig:
    """Every hyperparameter of a CoMTIP model; stored inside each checkpoint."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    paat: PaatConfig = field(default_factory=PaatConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    image_ssl: ImageSSLConfig = field(default_factory=ImageSSLConfig)
    embed_dim: int = 256  # shared image/text space
    mask_ratio: float = 0.5  # fraction of patch tokens hidden from the masked branch
    w_mfm: float = 1.0  # weight of the MFM loss (0 = off: the masked branch is not run)
    w_paat: float = 0.5  # weight of the PAAT loss (0 = off)
    # weight of the profile term (0 = off): a second InfoNCE between the image embedding and the
    # spot's whole log-normalised expression vector through an MLP of the text branch (ProfileHead,
    # model/text.py). Gene sentences of a few genes carry too little of the spot for the image
    # side to learn from them alone (docs/results.md, "Round of 2026-12-03b"); the sentence term is
    # unchanged and still carries names, values and zero-shot
    w_profile: float = 0.0
    # weight of the value-grid term (0 = off; model/grid_term.py, docs/model.md): the zero-shot
    # readout trained directly, each image against the one-gene sentences of its genes' value grids
    w_grid: float = 0.0
    # weight of the expression-only term (0 = off; model/text_ssl.py, docs/model.md): two gene
    # sentences drawn from one spot's expression must find each other among the batch's spots
    # (InfoNCE), on the training spots and the expression-only spots of data.expression_only
    w_text_ssl: float = 0.0
    w_image_ssl: float = 0.0  # image self-distillation (0 = off; model/image_ssl.py): two views of a patch, EMA teacher
    init_temperature: float = 0.07  # CLIP's initial temperature
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    learn_temperature: bool = True
    patch_um: float = Default.PATCH_UM  # physical side of a spot patch
    target_sum: float = Default.TARGET_SUM  # expression normalisation: library size ...
    log1p: bool = True  # ... then log1p
    n_genes_hint: int = 1000  # panel size the preset was designed for (informative)
    version: int = MODEL_VERSION

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of primitives (JSON/YAML/torch ``weights_only`` safe)."""
        return _to_primitive(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ComtipConfig:
        """Build a config from a (possibly partial) dict; unknown keys raise ConfigError."""
        cfg = cls()
        if d:
            apply_mapping(cfg, d, prefix="")
        cfg.validate()
        return cfg

    def replace(self, **updates: Any) -> ComtipConfig:
        """A copy with dotted-key updates, e.g. ``cfg.replace(**{"vision.img_size": 64})``."""
        new = copy.deepcopy(self)
        for key, value in updates.items():
            nested: dict[str, Any] = {}
            cur = nested
            parts = key.replace("__", ".").split(".")
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = value
            apply_mapping(new, nested, prefix="")
        new.validate()
        return new

    def validate(self) -> None:
        """Raise ConfigError on values that cannot work."""
        t, v = self.text, self.vision
        _choice("text.mode", t.mode, TEXT_MODES)
        _choice("text.value_encoding", t.value_encoding, VALUE_ENCODINGS)
        _choice("text.combination", t.combination, TOKEN_COMBINATIONS)
        _choice("text.pool", t.pool, POOLS_TEXT)
        _choice("vision.pool", v.pool, POOLS_VISION)
        _choice("vision.probe_input", v.probe_input, PROBE_INPUTS)
        if v.morphology_px and not (v.img_size <= v.morphology_px <= MAX_MORPHOLOGY_PX):
            raise ConfigError(f"vision.morphology_px must be 0 (off) or between vision.img_size ({v.img_size}) and "
                              f"{MAX_MORPHOLOGY_PX}; got {v.morphology_px!r}", hint="use 224, the floor's resolution, or 0")
        if v.test_views not in TEST_VIEWS:
            raise ConfigError(f"vision.test_views must be one of {', '.join(map(str, TEST_VIEWS))}; got {v.test_views!r}",
                              hint="8 averages over every flip and quarter turn of a patch, 1 reads it as it is")
        _choice("mask.loss", self.mask.loss, MFM_LOSSES)
        _choice("text.subset_sizes", t.subset_sizes, SUBSET_SIZES)
        check_ranges(self)  # every numeric key against the table in config_checks.py
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}", hint="use e.g. 0.5")
        if t.width % t.heads:
            raise ConfigError(f"text.width ({t.width}) must be divisible by text.heads ({t.heads})")
        if not t.expressed_weight > 0:
            raise ConfigError(f"text.expressed_weight must be > 0, got {t.expressed_weight}")
        _choice("text.value_transform", t.value_transform, VALUE_TRANSFORMS)
        if t.value_transform != "lognorm" and t.mode != "names+values":
            raise ConfigError(f"text.value_transform {t.value_transform!r} needs text.mode names+values, got {t.mode!r}")
        if self.w_profile > 0 and t.mode != "names+values":
            raise ConfigError(f"w_profile needs text.mode names+values (the values mode already reads the whole vector), got {t.mode!r}")
        if t.library_token and t.mode != "names+values":
            raise ConfigError(f"text.library_token needs text.mode names+values, got {t.mode!r}")
        if t.sparse_pathway and t.mode != "names+values":
            raise ConfigError(f"text.sparse_pathway needs text.mode names+values, got {t.mode!r}",
                              hint="the values mode already reads the whole vector; set text.sparse_pathway: false")
        if not 1 <= t.min_genes <= t.max_genes:
            raise ConfigError(f"need 1 <= text.min_genes <= text.max_genes, got {t.min_genes}, {t.max_genes}")
        if self.embed_dim < 1 or v.img_size < 8:
            raise ConfigError("embed_dim and vision.img_size must be positive (img_size >= 8)")
        if self.w_grid > 0 and t.mode != "names+values":
            raise ConfigError(f"w_grid needs text.mode names+values (it trains the zero-shot readout), got {t.mode!r}",
                              hint="set w_grid: 0")
        for name in ("w_mfm", "w_paat", "w_profile", "w_grid", "w_text_ssl", "w_image_ssl"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.zero_shot.grid < 2:
            raise ConfigError(f"zero_shot.grid must be >= 2, got {self.zero_shot.grid}")
        if self.paat.n_negatives < 1:
            raise ConfigError(f"paat.n_negatives must be >= 1, got {self.paat.n_negatives}", hint="set w_paat: 0 to switch PAAT off")
        if not isinstance(v.freeze, bool) and (not isinstance(v.freeze, int) or v.freeze < 0):
            raise ConfigError(f"vision.freeze must be true, false or a number of blocks >= 0, got {v.freeze!r}")
        if self.w_image_ssl > 0 and fully_frozen(v.freeze):
            raise ConfigError(f"w_image_ssl trains the ViT, but vision.freeze is {v.freeze!r} (no block trains)", hint="set w_image_ssl: 0 or vision.freeze: false")
        for name in ("mean", "std"):
            val = getattr(v, name)
            if val is not None and len(val) != 3:
                raise ConfigError(f"vision.{name} must have 3 values (RGB), got {val}")
        if v.std is not None and min(v.std) <= 0:
            raise ConfigError(f"vision.std must be > 0, got {v.std}", hint="copy mean/std from the model card (0-1 scale)")
        if self.version != MODEL_VERSION:
            raise ConfigError(
                f"config is for model version {self.version}, this napari-comtip builds version {MODEL_VERSION}",
                hint="retrain or use the napari-comtip release that wrote it",
            )

    # convenience accessors used by the engines
    @property
    def uses_names(self) -> bool:
        return self.text.mode in ("names+values", "names")

    @property
    def uses_values(self) -> bool:
        return self.text.mode in ("names+values", "values")


def apply_reading(config: ComtipConfig, reading: dict[str, Any] | None) -> ComtipConfig:
    """``config`` with new values of ``READING_KEYS`` keys (dotted, e.g. ``{"vision.test_views": 8}``),
    validated; any other key is refused (it would change what the model learned)."""
    if not reading:
        return config
    bad = sorted(set(reading) - set(READING_KEYS))
    if bad:
        raise ConfigError(f"{', '.join(bad)} change(s) what the model learned, not how it reads a patch",
                          hint=f"only {', '.join(READING_KEYS)} can be set after training; train again for the others")
    return config.replace(**{k.replace(".", "__"): v for k, v in reading.items()})


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _to_primitive(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_primitive(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_primitive(v) for v in obj]
    return obj


def apply_mapping(target: Any, d: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of the dataclass ``target`` from ``d`` (nested dataclasses recursively), each
    value coerced to its field's type ('0.5' -> 0.5, 'yes' -> True, 'abc' for an int refused);
    ``prefix`` names the section in messages. The one coercion rule of every config section
    (the model here, ``data``/``training`` in ``engine/run_config.py``)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {full!r}", hint=f"known keys here: {known}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, value, prefix=f"{full}.")
        elif key == "freeze":
            setattr(target, key, _coerce_freeze(full, value))
        elif key == "overrides":
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping of timm.create_model arguments")
            setattr(target, key, dict(value))
        else:
            setattr(target, key, _coerce(full, current, fields[key], value))


def _coerce_freeze(name: str, value: Any) -> bool | int:
    """``vision.freeze``: true / false, or a number of last blocks to train (``"2"`` from YAML/--set too)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.strip().lower() in ("true", "yes", "on")
    try:
        n = int(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} has an invalid value {value!r}",
                          hint="use true (fixed encoder), false (train it all) or the number of last blocks to train") from None
    return n


def _coerce(name: str, current: Any, f: dataclasses.Field, value: Any) -> Any:
    """Light type checking so that '0.5' in a YAML file becomes 0.5 and 'abc' is refused."""
    if value is None:
        return None
    ann = str(f.type)
    try:
        if isinstance(current, bool) or ann == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if ann.startswith("int") or (isinstance(current, int) and not isinstance(current, bool)):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if ann.startswith("float"):
            return float(value)
        if ann.startswith("list[str]"):
            return [str(x) for x in ([value] if isinstance(value, str) else value)]
        if ann.startswith("list"):
            return [float(x) for x in value]
        if ann.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} has an invalid value {value!r} (expected {ann})") from None
    return value
