"""CoMTIP pretraining: one resumable loop for a laptop CPU, a GPU, or many GPUs under torchrun.

Entry points: :func:`pretrain` (library) and :func:`pretrain_from_args` (``comtip pretrain``).

Run folder (``out_dir``), written by rank 0 only:

* ``config.yaml`` -- the resolved config (model + data + training sections, after ``--set``);
* ``metrics.csv`` -- one row per optimizer step, stable columns :data:`METRIC_COLUMNS`;
* ``checkpoints/step-NNNNNNN.pt`` -- resumable training state (model, optimizer, scheduler,
  step, epoch, data position, RNG states), written atomically every
  ``training.checkpoint_every`` steps; the newest ``training.keep_checkpoints`` are kept;
* ``model.pt`` -- the final model (:func:`model.checkpoint.save_checkpoint`, fp16 storage) with
  its retrieval bank (image embeddings + log-normalised panel expression of every training
  spot) and a fitted ridge probe inside.

Determinism: every random draw of a step (batch order, augmentation, gene sentences, masks and
PAAT permutations inside the model) is seeded from ``(seed, step, rank)``; a run killed after a
checkpoint and resumed with ``--resume`` ends with the same weights as an uninterrupted run.

Checkpoint selection rule (peers.md lesson): the shipped model is the one after the fixed
budget (``training.epochs`` or ``--max-steps``), never chosen by a validation loss.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..constants import Default
from ..errors import Cancelled, ConfigError, InputError, TrainingError
from ..model.config_checks import check_ranges
from ..model.text import sample_gene_subsets, spot_rank
from .context import CONTEXTS, context_features_grouped, fit_context_probe
from .data import Augment, DataConfig, TrainingSet, build_training_set, expressed_sentences

#: Columns of ``metrics.csv`` (stable: the pretrain widget parses them). ``img_emb_std`` is the
#: mean over dimensions of the per-dimension standard deviation of the batch's L2-normalised
#: image embeddings (collapse watch: it falls towards 0 when all images map to one point);
#: ``i2t_acc`` is the fraction of the batch's images whose best-scoring text is their own.
METRIC_COLUMNS = (
    "step", "epoch", "loss", "infonce", "mfm", "paat", "lr", "samples_per_s", "elapsed_s", "img_emb_std", "i2t_acc",
)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
CKPT_DIR = "checkpoints"
FINAL_FILE = "model.pt"
STATE_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")


# --------------------------------------------------------------------------- config
@dataclass
class TrainingConfig:
    """The ``training:`` section of a config file."""

    epochs: int = 40
    batch_size: int = 64  # per process
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    seed: int = 0
    checkpoint_every: int = 200  # steps
    keep_checkpoints: int = 2
    num_workers: int = 0  # DataLoader workers (0 = in the main process; CUDA: 4 is a good start)
    threads: int = 0  # CPU threads per process (0 = all cores / processes)
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    compile: bool = False  # torch.compile the model (CUDA)
    bank: bool = True  # store the retrieval bank in model.pt
    probe: bool = True  # fit and store the ridge probe in model.pt
    probe_alpha: float = 0.0  # ridge penalty of the stored probe; 0 = choose by leave-one-out on the training spots
    probe_context: str = Default.PROBE_CONTEXT  # the probe's input (engine/context.py): none, section, neighbours
    emb_std_every: int = 1  # compute img_emb_std every N steps (it costs no extra forward pass)
    feature_cache: bool = True  # a fixed ViT (model.vision.freeze: true): its features once per patch view (engine/feature_cache.py)
    feature_views: int = 4  # augmented views per patch with the feature cache; epoch e uses view e mod this
    fp16_final: bool = True  # store model.pt weights in fp16

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    """A whole training config: model preset + overrides, data and training sections."""

    preset: str = "tiny"
    model: Any = None  # ComtipConfig
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    source: str | None = None  # the YAML file it came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "training": self.training.to_dict(),
        }


_TOP_KEYS = ("preset", "model", "data", "training")


def _apply_section(obj, d: dict, section: str, path) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"section {section!r} must be a mapping", path=path)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in d.items():
        if k not in fields:
            raise ConfigError(f"unknown config key '{section}.{k}'", path=path,
                              hint=f"known keys of {section}: {', '.join(sorted(fields))}")
        cur = getattr(obj, k)
        try:
            if isinstance(cur, bool):
                if isinstance(v, str):
                    v = v.strip().lower() in ("1", "true", "yes", "on")
                v = bool(v)
            elif isinstance(cur, int) and v is not None:
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError(v)
                v = int(v)
            elif isinstance(cur, float) and v is not None:
                v = float(v)
            elif isinstance(cur, str) and v is not None:
                v = str(v)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{section}.{k}' has an invalid value {v!r} "
                              f"(expected {type(cur).__name__})", path=path) from None
        setattr(obj, k, v)


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: Iterable[str] | None) -> dict:
    """``["training.lr=1e-3", "model.vision.img_size=64"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", hint="e.g. --set training.lr=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or key.split(".")[0] not in _TOP_KEYS:
            raise ConfigError(f"--set key {key!r} must start with one of {', '.join(_TOP_KEYS)}",
                              hint="e.g. --set model.mask_ratio=0.6 or --set training.epochs=5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out = _merge(out, _nest(key, value))
    return out


def _section(d: dict, name: str, path) -> dict:
    sec = d.get(name) or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"section {name!r} must be a mapping", path=path)
    return sec


def run_config_from_dict(d: dict | None, path=None) -> RunConfig:
    """Build a :class:`RunConfig`; unknown keys raise :class:`ConfigError` naming key and file."""
    from ..model.presets import DEFAULT_PRESET, preset_sections

    d = dict(d or {})
    for k in d:
        if k not in _TOP_KEYS:
            raise ConfigError(f"unknown config key {k!r}", path=path,
                              hint=f"top-level keys are {', '.join(_TOP_KEYS)}")
    preset = str(d.get("preset") or DEFAULT_PRESET)
    try:
        base = preset_sections(preset)  # the preset's model, data and training sections (package data)
    except ConfigError as exc:
        raise ConfigError(str(exc).rstrip("."), path=path) from None
    model_over = d.get("model") or {}
    if not isinstance(model_over, dict):
        raise ConfigError("section 'model' must be a mapping", path=path)
    try:
        from ..model.config import ComtipConfig

        model_cfg = ComtipConfig.from_dict(_merge(base["model"], model_over))
    except ConfigError as exc:
        msg = str(exc).rstrip(".")
        msg = re.sub(r"config key '([^']+)'", r"config key 'model.\1'", msg)
        raise ConfigError(msg, path=path) from None
    data = DataConfig()
    _apply_section(data, _merge(base["data"], _section(d, "data", path)), "data", path)
    if data.sentence_sampler not in ("expressed", "uniform"):
        raise ConfigError(f"data.sentence_sampler must be 'expressed' or 'uniform', got {data.sentence_sampler!r}",
                          path=path)
    training = TrainingConfig()
    _apply_section(training, _merge(base["training"], _section(d, "training", path)), "training", path)
    if training.probe_context not in CONTEXTS:
        raise ConfigError(f"training.probe_context must be one of {', '.join(CONTEXTS)}, got {training.probe_context!r}",
                          path=path)
    for section, obj in (("data.", data), ("training.", training)):
        try:
            check_ranges(obj, prefix=section)
        except ConfigError as exc:
            raise ConfigError(str(exc).rstrip("."), path=path) from None
    if training.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"training.amp must be auto, bf16 or off, got {training.amp!r}", path=path)
    return RunConfig(preset=preset, model=model_cfg, data=data, training=training,
                     source=None if path is None else str(path))


def load_run_config(path: str | os.PathLike | None, overrides: Iterable[str] | dict | None = None, *,
                    preset: str | None = None) -> RunConfig:
    """Read a YAML training config, or take the named ``preset`` (the ``tiny`` one when neither is given)."""
    import yaml

    d: dict = {}
    if preset is not None:
        if path is not None:
            raise ConfigError("give --preset or --config, not both",
                              hint=f"a config file starts from a preset with a line 'preset: {preset}'")
        d = {"preset": str(preset)}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", path=p, hint="see training/configs/ for examples")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"not valid YAML{where}", path=p, hint="fix the syntax") from None
        if not isinstance(d, dict):
            raise ConfigError("a config file must be a YAML mapping", path=p)
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    # an error names its real source: the file (or preset) when it is bad alone, else --set
    source = path if path is not None else ("--preset" if preset is not None else "the default preset")
    if not over:
        cfg = run_config_from_dict(d, path=source)
    else:
        try:
            cfg = run_config_from_dict(_merge(d, over), path="--set")
        except ConfigError:
            run_config_from_dict(d, path=source)  # raises when the file is the culprit
            raise
    cfg.source = None if path is None else str(path)
    return cfg


def save_run_config(cfg: RunConfig, path: Path) -> None:
    import yaml

    _atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- callbacks
class Callback:
    """Override any of these; the pretrain widget and the CLI's progress bar are callbacks."""

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> None:  # noqa: D401
        pass

    def on_checkpoint(self, path: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class _FnCallback(Callback):
    def __init__(self, progress=None, cancel=None):
        self.progress, self.cancel = progress, cancel

    def on_step(self, step, total, metrics):
        if self.progress is not None:
            self.progress(step, total, f"loss {metrics['loss']:.4f}")

    def should_stop(self):
        return bool(self.cancel is not None and self.cancel())


class TqdmCallback(Callback):
    """Terminal progress bar with the loss terms and the throughput."""

    def __init__(self, initial: int = 0):
        self.bar = None
        self.initial = initial

    def on_step(self, step, total, metrics):
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step - 1, desc="pretrain", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(
            f"loss {metrics['loss']:.3f} nce {metrics['infonce']:.3f} mfm {metrics['mfm']:.3f} "
            f"paat {metrics['paat']:.3f} {metrics['samples_per_s']:.0f} spots/s", refresh=False)

    def on_checkpoint(self, path):
        if self.bar is not None:
            self.bar.write(f"checkpoint {path}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- helpers
def _atomic_write_text(path: Path, text: str) -> None:
    from ..io.writers import atomic_replace

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: Path(tmp).write_text(text))


def _atomic_torch_save(obj, path: Path) -> None:
    from ..io.writers import atomic_replace

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def _step_seed(seed: int, step: int, rank: int, salt: int) -> int:
    # a fixed mixing of the four numbers; same on every machine and run
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + salt * 15_485_863) % (2**63 - 1)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    d = Path(out_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _is_run_folder(out: Path) -> bool:
    return out.is_dir() and any((out / n).exists() for n in (CONFIG_FILE, METRICS_FILE, CKPT_DIR, FINAL_FILE))


# --------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)


def _init_dist(device: torch.device | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return _Dist(rank, world, local, False)
    backend = "nccl" if (torch.cuda.is_available() and (device is None or device.type == "cuda")) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return _Dist(rank, world, local, True)


# --------------------------------------------------------------------------- data specs
@dataclass
class DataSpec:
    """One training sample: a dataset path and an optional sample name inside it."""

    path: str
    sample: str | None = None

    def label(self) -> str:
        return f"{self.path}" + (f" [{self.sample}]" if self.sample else "")


def resolve_data_specs(data: Sequence[str], samples: Sequence[str] | None) -> list[DataSpec]:
    """The CLI's ``--data``/``--sample`` rule: one --data with several --sample -> all from it;
    several --data with --sample -> one sample per --data; no --sample -> every sample of each."""
    from ..io import list_samples

    data = list(data)
    if samples:
        if len(data) == 1:
            return [DataSpec(data[0], s) for s in samples]
        if len(samples) != len(data):
            raise InputError(f"got {len(data)} --data and {len(samples)} --sample",
                             hint="give one --sample per --data, or one --data with several --sample")
        return [DataSpec(p, s) for p, s in zip(data, samples)]
    out: list[DataSpec] = []
    for p in data:
        names = list_samples(p)
        if len(names) > 1:
            out.extend(DataSpec(p, n) for n in names)
        else:
            out.append(DataSpec(p, names[0] if names else None))
    return out


def load_training_samples(specs: Sequence[DataSpec | str | tuple], progress=None) -> list:
    from ..io import load_sample

    out = []
    for s in specs:
        if isinstance(s, str):
            s = DataSpec(s)
        elif isinstance(s, tuple):
            s = DataSpec(*s)
        if hasattr(s, "image") and hasattr(s, "spots"):  # already a SpatialSample
            out.append(s)
            continue
        sample = load_sample(s.path, sample=s.sample, progress=progress)
        if sample.expression is None:
            raise InputError(f"sample {sample.name!r} has no expression data; pretraining needs spots with counts",
                             path=s.path, hint="give a dataset with a count matrix (or drop this --data)")
        out.append(sample)
    return out


# --------------------------------------------------------------------------- model step
class _StepModule(torch.nn.Module):
    """One forward for DDP: the CoMTIP loss on spot batches plus MFM on vision-only batches.

    The vision-only batch (unlabelled tissue patches) adds only the MFM term: its full-branch
    tokens are the (stop-gradient) target, so they run without gradient; the masked branch and
    the mask feature generator learn from them. ``img_emb`` (the batch's normalised image
    embeddings, detached) is captured from the projection for the collapse watch.
    """

    def __init__(self, model, w_mfm: float, mask_ratio: float):
        super().__init__()
        self.model = model
        self.w_mfm = float(w_mfm)
        self.mask_ratio = float(mask_ratio)
        self._captured: list[torch.Tensor] = []
        model.image_proj.register_forward_hook(self._hook)

    def _hook(self, module, inp, out):
        if self.training:
            self._captured.append(out.detach())

    def forward(self, images, gene_idx, values, mask, extra_images=None, pooled: bool = False):
        self._captured.clear()
        out = dict(self.model(images, gene_idx, values, mask, pooled=pooled))
        if self._captured:
            out["img_emb"] = torch.nn.functional.normalize(self._captured[0].float(), dim=-1)
        self._captured.clear()
        if extra_images is not None and extra_images.shape[0] > 0 and self.w_mfm > 0 and self.model.vision.generator is not None:
            vision = self.model.vision
            with torch.no_grad():
                full = vision.forward_tokens(extra_images)
            mfm_extra = vision.mfm_loss(extra_images, full, self.mask_ratio)
            n_l, n_u = images.shape[0], extra_images.shape[0]
            mfm = (out["mfm"] * n_l + mfm_extra * n_u) / (n_l + n_u)
            out["loss"] = out["loss"] + self.w_mfm * (mfm - out["mfm"])
            out["mfm"] = mfm
        return out


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        t = min(max(t, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _emb_std(emb: torch.Tensor) -> float:
    e = emb.detach().float()
    if e.shape[0] < 2:
        return float("nan")
    return float(e.std(dim=0).mean().item())


class _BatchSet(torch.utils.data.Dataset):
    """Item ``i`` = the whole batch ``i`` of an epoch, built deterministically from (seed, step).

    Works the same with 0 or many DataLoader workers, and resuming at batch ``i`` needs no
    replay of earlier batches.
    """

    def __init__(self, ts: TrainingSet, cfg: "RunConfig", epoch: int, steps_per_epoch: int, dist: _Dist,
                 augment: Augment, pixels: bool = True):
        self.ts, self.cfg, self.epoch, self.spe, self.dist, self.aug = ts, cfg, epoch, steps_per_epoch, dist, augment
        self.pixels = pixels  # False (feature cache): item 0 is the spot indices, the cache has the images
        seed = cfg.training.seed
        perm = torch.randperm(ts.n_spots, generator=_gen(_step_seed(seed, epoch, 0, 1)))
        self.order = perm[dist.rank::dist.world]  # this rank's share of the epoch

    def __len__(self):
        return self.spe

    def __getitem__(self, i: int):
        B = self.cfg.training.batch_size
        step = self.epoch * self.spe + i
        idx = self.order[i * B:(i + 1) * B].numpy()
        idx_sorted = np.sort(idx)
        g = _gen(_step_seed(self.cfg.training.seed, step, self.dist.rank, 2))
        if self.pixels:
            pos = {v: k for k, v in enumerate(idx_sorted)}
            patches = np.asarray(self.ts.patches[idx_sorted])[[pos[v] for v in idx]]
            imgs = self.aug(torch.from_numpy(patches), g)
        else:
            imgs = torch.from_numpy(idx.astype(np.int64))
        expr = torch.from_numpy(np.asarray(self.ts.expr[idx]))
        if self.cfg.model.text.value_transform == "spot_rank":
            expr = spot_rank(expr)
        dc = self.cfg.data
        if self.cfg.model.text.mode == "names+values" and dc.sentence_sampler == "expressed":
            gene_idx, values, mask = expressed_sentences(expr, self.cfg.model.text, dc.expressed_weight, g)
        else:
            gene_idx, values, mask = sample_gene_subsets(expr, self.cfg.model, g)
        if self.cfg.model.text.library_token and self.ts.library_z is not None:  # the spot's depth as its own token
            n = len(idx)
            gene_idx = torch.cat([gene_idx, torch.full((n, 1), len(self.ts.panel), dtype=gene_idx.dtype)], 1)
            values = torch.cat([values, torch.from_numpy(self.ts.library_z[idx]).to(values.dtype).view(n, 1)], 1)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], 1)
        extra = torch.zeros((0,) + tuple(imgs.shape[1:]), dtype=torch.uint8)
        if self.pixels and self.ts.unlabelled is not None and dc.unlabelled and dc.unlabelled_batch > 0 and self.cfg.model.w_mfm > 0:
            u = torch.randint(0, len(self.ts.unlabelled), (dc.unlabelled_batch,), generator=g).numpy()
            us = np.sort(u)
            extra = self.aug(torch.from_numpy(np.asarray(self.ts.unlabelled[us])), g)
        return imgs, gene_idx, values, mask, extra


# --------------------------------------------------------------------------- bank & probe
@torch.no_grad()
def embed_patches(model, patches: np.ndarray, device: torch.device, batch_size: int = 128,
                  features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalised image embeddings (and pooled features) of uint8 patches, no augmentation."""
    model.eval()
    embs, feats = [], []
    for s in range(0, len(patches), batch_size):
        x = torch.from_numpy(np.asarray(patches[s:s + batch_size])).to(device)
        x = model.preprocess(x)
        embs.append(model.encode_image(x).float().cpu())
        if features:
            feats.append(model.image_features(x).float().cpu())
    e = torch.cat(embs).numpy()
    f = torch.cat(feats).numpy() if features else None
    return e, f


def build_bank_and_probe(model, ts: TrainingSet, device, cfg: RunConfig) -> dict[str, Any]:
    """The retrieval bank and probe stored inside ``model.pt`` (see model/checkpoint.py)."""
    from . import predictors

    emb, feats = embed_patches(model, ts.patches, device, features=cfg.training.probe)
    extras: dict[str, Any] = {}
    if cfg.training.bank:
        extras["bank"] = {
            "emb": torch.from_numpy(emb).half(),
            "expr": torch.from_numpy(ts.expr).half(),
            "ids": list(ts.spot_ids),
            "samples": list(ts.names),
            "source": "training spots (no augmentation)",
        }
    if cfg.training.probe:
        alpha = cfg.training.probe_alpha
        # 0 = automatic: exact leave-one-out over the training spots (the floor's rule, see
        # predictors.loo_ridge_alpha); a leave-one-section-out choice over-regularised (docs/results.md)
        ctx = cfg.training.probe_context
        x = context_features_grouped(feats, ts.centres_rc, ts.sample_of, ctx)
        probe = fit_context_probe(x, ts.expr, ctx, ts.centres_rc, ts.sample_of, alpha=alpha if alpha > 0 else None,
                                  genes=ts.panel).to_dict()
        probe["source"] = "training spots (no augmentation)"
        probe["context"] = ctx
        extras["probe"] = probe
    return extras


def refit_probe(checkpoint: str | os.PathLike, samples: Sequence, *, device: str = "auto", alpha: float | None = None,
                note: dict | None = None, context: str = Default.PROBE_CONTEXT) -> dict[str, Any]:
    """Re-fit the ridge probe stored in ``checkpoint`` on ``samples`` (loaded SpatialSamples with
    expression), in place and atomically; the encoder, bank and config are not touched.

    For a checkpoint trained before the current probe rule, or to move its probe to other
    labelled sections. ``alpha=None``: leave-one-out choice (:func:`predictors.loo_ridge_alpha`).
    Returns the new probe's alpha and per-alpha scores.
    """
    from ..model.checkpoint import load_checkpoint, update_checkpoint
    from . import predictors
    from .device import resolve_device

    ck = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    cfg = ck.model.config
    ts = build_training_set(samples, DataConfig(unlabelled=False), patch_um=cfg.patch_um,
                            img_size=cfg.vision.img_size, panel=ck.gene_panel)
    ck.model.to(dev)
    _, feats = embed_patches(ck.model, ts.patches, dev)
    x = context_features_grouped(feats, ts.centres_rc, ts.sample_of, context)
    probe = fit_context_probe(x, ts.expr, context, ts.centres_rc, ts.sample_of, alpha=alpha, genes=ts.panel).to_dict()
    probe["source"] = f"spots of {', '.join(ts.names)} (no augmentation)"
    probe["context"] = context
    update_checkpoint(checkpoint, probe=probe, note=dict(note or {}, what="probe re-fitted", samples=list(ts.names),
                                                         n_spots=ts.n_spots, alpha=probe["alpha"], alpha_rule=probe["alpha_rule"]))
    return {"alpha": probe["alpha"], "alpha_scores": probe["alpha_scores"], "n_spots": ts.n_spots}


# --------------------------------------------------------------------------- the loop
def pretrain(config: RunConfig | str | os.PathLike | dict, data_specs: Sequence, out_dir: str | os.PathLike, *,
             resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
             callbacks: Sequence[Callback] = (), device: str = "auto", progress=None, cancel=None,
             training_set: TrainingSet | None = None) -> Path:
    """Pretrain CoMTIP; returns the path of the final ``model.pt``.

    ``config``: a :class:`RunConfig`, a YAML path or a dict. ``data_specs``: :class:`DataSpec`
    items, ``(path, sample)`` tuples, paths, or loaded samples. Under torchrun (``WORLD_SIZE`` >
    1) each process trains on its share of every epoch (DDP, gloo on CPU / nccl on GPU) and only
    rank 0 writes. ``training_set`` skips sample loading (the LOSO benchmark shares one).
    """
    from ..model.factory import build_model
    from .device import resolve_device

    if not isinstance(config, RunConfig):
        config = run_config_from_dict(config) if isinstance(config, dict) or config is None else load_run_config(config)
    cfg = config
    tc = cfg.training
    out = Path(out_dir)
    callbacks = list(callbacks)
    if progress is not None or cancel is not None:
        callbacks.append(_FnCallback(progress, cancel))

    dev = resolve_device(device)
    dist = _init_dist(dev)
    if dist.world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    try:
        return _pretrain(cfg, data_specs, out, resume, overwrite, max_steps, callbacks, dev, dist, training_set,
                         build_model)
    finally:
        if dist.initialised_here:
            torch.distributed.destroy_process_group()


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that cannot be used as asked (read-only check, before loading data)."""
    out = Path(out)
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other", path=out, hint="choose one")
    if out.exists() and not out.is_dir():
        raise InputError("the output path exists and is not a folder", path=out, hint="choose a new --out folder")
    if resume and not list_checkpoints(out):
        raise InputError("nothing to resume: no checkpoint in this run folder", path=out,
                         hint="start a new run without --resume")
    if not resume and not overwrite and _is_run_folder(out):
        raise InputError("the output folder already holds a training run", path=out,
                         hint="pass --resume to continue it, --overwrite to replace it, or choose another --out")


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    check_out_dir(out, resume, overwrite)
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other", path=out, hint="choose one")
    if out.exists() and not out.is_dir():
        raise InputError("the output path exists and is not a folder", path=out, hint="choose a new --out folder")
    if resume:
        if not list_checkpoints(out):
            raise InputError("nothing to resume: no checkpoint in this run folder", path=out,
                             hint="start a new run without --resume")
        return
    if _is_run_folder(out):
        if not overwrite:
            raise InputError("the output folder already holds a training run", path=out,
                             hint="pass --resume to continue it, --overwrite to replace it, or choose another --out")
        # remove only what a run writes; never anything else in the folder
        for n in (CONFIG_FILE, METRICS_FILE, FINAL_FILE):
            if (out / n).exists():
                (out / n).unlink()
        if (out / CKPT_DIR).is_dir():
            shutil.rmtree(out / CKPT_DIR)
    out.mkdir(parents=True, exist_ok=True)


def _pretrain(cfg: RunConfig, data_specs, out: Path, resume, overwrite, max_steps, callbacks, dev, dist: _Dist,
              training_set, build_model) -> Path:
    tc = cfg.training
    if dist.main:
        _prepare_out(out, resume, overwrite)
    dist.barrier()
    if not dist.main and not out.is_dir():
        raise InputError("run folder was not created by rank 0", path=out)

    state = None
    if resume:
        cfg_path = out / CONFIG_FILE
        if cfg_path.is_file():
            stored = load_run_config(cfg_path)
            if stored.model.to_dict() != cfg.model.to_dict() or stored.data.to_dict() != cfg.data.to_dict():
                raise ConfigError("the config differs from the one of the run being resumed", path=cfg_path,
                                  hint="resume with the run's own config.yaml, or start a new run")
        for step_n, p in reversed(list_checkpoints(out)):
            try:
                state = torch.load(p, map_location="cpu", weights_only=True)
                break
            except Exception:  # a damaged file: fall back to the previous one
                continue
        if state is None:
            raise TrainingError("no readable checkpoint to resume from", path=out / CKPT_DIR,
                                hint="start a new run with --overwrite")

    if dev.type == "cpu":
        n = tc.threads or max(1, (os.cpu_count() or 1) // dist.world)
        torch.set_num_threads(n)

    # ---- data (rank 0 fills the patch cache first, the others then read it)
    if training_set is None:
        panel = state["gene_panel"] if state is not None else None
        if dist.main:
            samples = load_training_samples(data_specs)
            ts = build_training_set(samples, cfg.data, patch_um=cfg.model.patch_um, img_size=cfg.model.vision.img_size,
                                    panel=panel, seed=tc.seed)
        dist.barrier()
        if not dist.main:
            samples = load_training_samples(data_specs)
            ts = build_training_set(samples, cfg.data, patch_um=cfg.model.patch_um, img_size=cfg.model.vision.img_size,
                                    panel=panel, seed=tc.seed)
    else:
        ts = training_set
    panel = list(ts.panel)
    if state is not None and list(state["gene_panel"]) != panel:
        raise ConfigError("the gene panel differs from the run being resumed", path=out,
                          hint="resume with the same data")

    per_rank = ts.n_spots // dist.world
    B = tc.batch_size
    if per_rank < 2:
        raise InputError(f"only {ts.n_spots} training spots", hint="pretraining needs at least 2 spots per process")
    B = min(B, per_rank)
    if B != tc.batch_size:
        tc = dataclasses.replace(tc, batch_size=B)
        cfg = dataclasses.replace(cfg, training=tc)
    spe = per_rank // B
    total = int(max_steps) if max_steps is not None else int(tc.epochs) * spe
    if total < 1:
        raise ConfigError("the run has no steps", hint="set training.epochs >= 1 or --max-steps >= 1")

    # ---- model, optimizer, scheduler
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, panel)
    model.to(dev)
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or n_.endswith(".bias") or "logit_scale" in n_ else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, tc.warmup_steps, tc.min_lr_ratio))
    step = 0
    elapsed0 = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        elapsed0 = float(state.get("elapsed_s", 0.0))
        if state.get("total") is not None and int(state["total"]) != total:
            raise ConfigError(f"the resumed run was planned for {state['total']} steps, this call for {total}",
                              path=out, hint="resume with the same --max-steps / training.epochs")
        torch.set_rng_state(state["rng_cpu"])

    step_mod = _StepModule(model, cfg.model.w_mfm, cfg.model.mask_ratio)
    train_mod: torch.nn.Module = step_mod
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_mod = DDP(step_mod, device_ids=[dev.index] if dev.type == "cuda" else None,
                        find_unused_parameters=True)
    if tc.compile and dev.type == "cuda":
        train_mod = torch.compile(train_mod)
    use_bf16 = (tc.amp == "bf16") or (tc.amp == "auto" and dev.type == "cuda")
    if tc.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"training.amp must be auto, bf16 or off, got {tc.amp!r}")

    # ---- run folder
    if dist.main:
        save_run_config(cfg, out / CONFIG_FILE)
        _init_metrics(out / METRICS_FILE, keep_until=step if state is not None else None)
    augment = Augment(cfg.data)
    last_good = list_checkpoints(out)[-1][1] if list_checkpoints(out) else None
    from .feature_cache import open_feature_cache  # a fixed ViT: its features once per patch view

    fcache = open_feature_cache(model, ts, cfg, dev, use_bf16=use_bf16)

    def save_state(at_step: int, epoch: int) -> Path | None:
        nonlocal last_good
        if dist.main:
            path = out / CKPT_DIR / f"step-{at_step:07d}.pt"
            _atomic_torch_save({
                "format": "comtip-train-state", "version": STATE_VERSION,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": at_step, "epoch": epoch, "total": total, "elapsed_s": elapsed0 + (time.time() - t0),
                "rng_cpu": torch.get_rng_state(), "gene_panel": panel, "config": cfg.to_dict(),
                "world_size": dist.world,
            }, path)
            for _, old in list_checkpoints(out)[:-max(1, tc.keep_checkpoints)]:
                old.unlink(missing_ok=True)
            last_good = path
            for cb in callbacks:
                cb.on_checkpoint(path)
        dist.barrier()
        return last_good

    t0 = time.time()
    stopped = False
    model.train()
    epoch = step // spe
    while step < total and not stopped:
        epoch = step // spe
        start_i = step - epoch * spe
        ds = _BatchSet(ts, cfg, epoch, spe, dist, augment, pixels=fcache is None)
        sampler = range(start_i, min(spe, start_i + (total - step)))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=sampler, num_workers=tc.num_workers,
            pin_memory=dev.type == "cuda", persistent_workers=False)
        for imgs, gene_idx, values, mask, extra in loader:
            ts0 = time.time()
            if fcache is not None:  # imgs are spot indices: cached pooled features of their view
                x, xe = fcache.features(imgs.numpy(), epoch), None
            else:
                imgs = imgs.to(dev, non_blocking=True)
                x = model.preprocess(imgs)
                xe = model.preprocess(extra.to(dev, non_blocking=True)) if extra.shape[0] else None
            gene_idx, values, mask = gene_idx.to(dev), values.to(dev), mask.to(dev)
            torch.manual_seed(_step_seed(tc.seed, step, dist.rank, 3))  # model-internal randomness
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                outd = train_mod(x, gene_idx, values, mask, xe, pooled=fcache is not None)
            loss = outd["loss"]
            bad = not bool(torch.isfinite(loss.detach()).item())
            if dist.any_true(bad):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1}; training stopped"
                    + (f", the last good checkpoint is {last_good}" if last_good else " before the first checkpoint"),
                    path=out, hint="lower training.lr or raise training.warmup_steps, then --resume or start over")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip and tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            lr_now = float(opt.param_groups[0]["lr"])
            sched.step()
            step += 1
            dt = max(time.time() - ts0, 1e-9)
            emb = outd.get("img_emb")
            metrics = {
                "step": step, "epoch": epoch,
                "loss": float(loss.detach()), "infonce": float(outd["infonce"].detach()),
                "mfm": float(outd["mfm"].detach()), "paat": float(outd["paat"].detach()),
                "lr": lr_now, "samples_per_s": imgs.shape[0] * dist.world / dt,
                "elapsed_s": elapsed0 + time.time() - t0,
                "img_emb_std": _emb_std(emb) if (emb is not None and step % max(1, tc.emb_std_every) == 0) else float("nan"),
                "i2t_acc": float(outd["i2t_acc"]) if "i2t_acc" in outd else float("nan"),
            }
            if dist.main:
                _append_metrics(out / METRICS_FILE, metrics)
                for cb in callbacks:
                    cb.on_step(step, total, metrics)
            stop_flag = any(cb.should_stop() for cb in callbacks) if dist.main else False
            stop_flag = dist.any_true(stop_flag)
            if step % tc.checkpoint_every == 0 or step == total or stop_flag:
                save_state(step, epoch if (step % spe) else epoch + 1)
            if stop_flag:
                stopped = True
                break
    # ---- final model: bank + probe, fp16
    final = out / FINAL_FILE
    if dist.main:
        model.calibrate_values(ts.expr)
        extras = build_bank_and_probe(model, ts, dev, cfg)
        extras["training"] = {
            "steps": step, "total_steps": total, "stopped_early": stopped, "epochs": step / spe,
            "samples": list(ts.names), "n_spots": ts.n_spots, "n_unlabelled": ts.info.get("n_unlabelled", 0),
            "elapsed_s": elapsed0 + time.time() - t0, "world_size": dist.world, "device": str(dev),
            "run_config": cfg.to_dict(), "panel_rule": panel_rule_text(cfg.data),
            "selection_rule": "final weights after the fixed step budget",
            "feature_cache": fcache.stats() if fcache is not None else None,
        }
        _save_final(final, model, cfg, panel, extras, fp16=tc.fp16_final)
        for cb in callbacks:
            cb.on_checkpoint(final)
    dist.barrier()
    return final


def panel_rule_text(dc: DataConfig) -> str:
    return (f"genes present in all training sections and detected in >= {dc.min_spot_frac:.0%} of training spots; "
            f"top {dc.n_hvg} by Seurat normalised dispersion of the pooled log-normalised training spots, "
            f"plus the top {dc.n_mean} by mean log-normalised expression (union)")


def _save_final(path: Path, model, cfg: RunConfig, panel, extras, fp16: bool) -> None:
    from ..model.checkpoint import save_checkpoint

    save_checkpoint(path, model, model.config, panel, extras=extras, half=fp16)


def _init_metrics(path: Path, keep_until: int | None) -> None:
    """Start ``metrics.csv`` (or, on resume, drop rows after the resumed step)."""
    header = ",".join(METRIC_COLUMNS) + "\n"
    if keep_until is None or not path.exists():
        _atomic_write_text(path, header)
        return
    rows = [header]
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                if int(r["step"]) <= keep_until:
                    rows.append(",".join(r.get(c, "") or "" for c in METRIC_COLUMNS) + "\n")
            except (KeyError, ValueError):
                continue
    _atomic_write_text(path, "".join(rows))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _append_metrics(path: Path, m: dict) -> None:
    with open(path, "a") as f:
        f.write(",".join(_fmt(m[c]) for c in METRIC_COLUMNS) + "\n")
        f.flush()


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as dicts of floats (empty cells -> NaN)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else float("nan")) for k, v in r.items()})
    return rows


# --------------------------------------------------------------------------- CLI
def pretrain_from_args(args: argparse.Namespace) -> int:
    """``comtip pretrain``: see ``comtip pretrain --help`` and training/README.md."""
    sets = list(getattr(args, "set", None) or [])
    if getattr(args, "epochs", None) is not None:
        sets.append(f"training.epochs={args.epochs}")
    if getattr(args, "seed", None) is not None:
        sets.append(f"training.seed={args.seed}")
    cfg = load_run_config(getattr(args, "config", None), sets, preset=getattr(args, "preset", None))
    check_out_dir(Path(args.out), args.resume, args.overwrite)
    specs = resolve_data_specs(args.data, args.sample)
    bar = TqdmCallback() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        final = pretrain(cfg, specs, args.out, resume=args.resume, overwrite=args.overwrite,
                         max_steps=args.max_steps, callbacks=[bar] if bar else [], device=args.device)
    finally:
        if bar is not None:
            bar.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {final}")
    return 0


__all__ = [
    "TrainingConfig", "RunConfig", "DataSpec", "Callback", "TqdmCallback", "METRIC_COLUMNS",
    "load_run_config", "run_config_from_dict", "parse_overrides", "pretrain", "pretrain_from_args",
    "read_metrics", "list_checkpoints", "resolve_data_specs", "embed_patches", "build_bank_and_probe", "refit_probe",
]
