"""CoMTIP pretraining: one resumable loop for a laptop CPU, a GPU, or many GPUs under torchrun.

Entry points: :func:`pretrain` (a loaded :class:`~engine.run_config.RunConfig` and samples) and
:func:`pretrain_run` (what ``comtip pretrain`` maps its arguments onto: a config file, ``--set``
overrides and dataset paths). The parts of a run live beside it:

* ``engine/run_config.py`` -- the config (model preset + ``data`` + ``training`` sections);
* ``engine/run_folder.py`` -- the run folder: ``config.yaml``, ``metrics.csv``,
  ``checkpoints/step-NNNNNNN.pt`` (resumable state), ``model.pt``;
* ``engine/batches.py`` -- the seeded batches (augmentation, gene sentences);
* ``engine/bank_probe.py`` -- the retrieval bank and probe stored in ``model.pt``;
* ``engine/distributed.py`` -- torchrun's process group (DDP: gloo on CPU, nccl on GPU);
* ``engine/callbacks.py`` -- ``Callback`` (per step, per checkpoint, stop) and the progress bar.

Determinism: every random draw of a step (batch order, augmentation, gene sentences, masks and
PAAT permutations inside the model) is seeded from ``(seed, step, rank)``; a run killed after a
checkpoint and resumed with ``--resume`` ends with the same weights as an uninterrupted run.

Checkpoint selection rule (peers.md lesson): the shipped model is the one after the fixed
budget (``training.epochs`` or ``--max-steps``), never chosen by a validation loss.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import ConfigError, InputError, TrainingError
from ..model.image_ssl import EmaTeacher, image_ssl_loss
from ..model.reading import input_px
from ..model.text_ssl import text_ssl_loss
from ..progress import Cancel, Progress
from . import run_folder as rf
from .bank_probe import build_bank_and_probe, panel_rule_text, save_final
from .batches import Augment, BatchSet, step_seed
from .callbacks import Callback, FnCallback
from .data import TrainingSet, build_training_set, load_training_samples, resolve_data_specs
from .distributed import Dist, init_dist
from .run_config import RunConfig, load_run_config, run_config_from_dict, save_run_config


# --------------------------------------------------------------------------- model step
class _StepModule(torch.nn.Module):
    """One forward for DDP: the CoMTIP loss on spot batches plus the image-only terms.

    The vision-only batch (unlabelled tissue patches) adds the MFM term (its full-branch tokens
    are the stop-gradient target, so they run without gradient; the masked branch and the mask
    feature generator learn from them) and image self-distillation (``model.w_image_ssl``: the
    spots' and those patches' second views against the EMA ``teacher``, a plain attribute so
    DDP, the optimizer and the checkpoint never see it). ``img_emb`` (the batch's normalised image
    embeddings, detached) is captured from the projection for the collapse watch, and the pooled
    ViT features under it, with gradient, for the self-distillation.
    """

    def __init__(self, model, w_mfm: float, mask_ratio: float, teacher: EmaTeacher | None = None):
        super().__init__()
        self.model = model
        self.w_mfm = float(w_mfm)
        self.mask_ratio = float(mask_ratio)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: DDP and the optimizer never see it
        self._captured: list[torch.Tensor] = []
        self._pooled: list[torch.Tensor] = []
        model.image_proj.register_forward_hook(self._hook)

    def _hook(self, module, inp, out):
        if self.training:
            self._captured.append(out.detach())
            self._pooled.append(inp[0])  # the pooled ViT features, with gradient (image self-distillation)

    def forward(self, images, gene_idx, values, mask, extra_images=None, pooled: bool = False, profile=None,
                ssl_views: tuple = (), second_images=None):
        self._captured.clear()
        self._pooled.clear()
        prof = profile if profile is not None and profile.shape[0] else None
        out = dict(self.model(images, gene_idx, values, mask, pooled=pooled, profile=prof))
        if self._captured:
            out["img_emb"] = torch.nn.functional.normalize(self._captured[0].float(), dim=-1)
        pooled_spots = self._pooled[0] if self._pooled else None
        self._captured.clear()
        self._pooled.clear()
        if self.teacher is not None and second_images is not None and second_images.shape[0] and pooled_spots is not None:
            # image self-distillation (model/image_ssl.py): the spots' and the unlabelled patches' two views
            vision = self.model.vision
            has_extra = extra_images is not None and extra_images.shape[0] > 0
            first = torch.cat([images, extra_images]) if has_extra else images
            pooled_a = torch.cat([pooled_spots, vision.pool(vision.forward_tokens(extra_images))]) if has_extra else pooled_spots
            out["image_ssl"] = image_ssl_loss(self.model, self.teacher, pooled_a, first, second_images)
            out["loss"] = out["loss"] + self.model.config.w_image_ssl * out["image_ssl"]
        if extra_images is not None and extra_images.shape[0] > 0 and self.w_mfm > 0 and self.model.vision.generator is not None:
            vision = self.model.vision
            with torch.no_grad():
                full = vision.forward_tokens(extra_images)
            mfm_extra = vision.mfm_loss(extra_images, full, self.mask_ratio)
            n_l, n_u = images.shape[0], extra_images.shape[0]
            mfm = (out["mfm"] * n_l + mfm_extra * n_u) / (n_l + n_u)
            out["loss"] = out["loss"] + self.w_mfm * (mfm - out["mfm"])
            out["mfm"] = mfm
        if ssl_views:  # the expression-only term (model/text_ssl.py): gene sentences without images
            out["text_ssl"] = text_ssl_loss(self.model, ssl_views)
            out["loss"] = out["loss"] + self.model.config.w_text_ssl * out["text_ssl"]
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


# --------------------------------------------------------------------------- the loop
def pretrain(config: RunConfig | str | os.PathLike | dict, data_specs: Sequence, out_dir: str | os.PathLike, *,
             resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
             callbacks: Sequence[Callback] = (), device: str = "auto", progress: Progress | None = None,
             cancel: Cancel | None = None, training_set: TrainingSet | None = None,
             training_samples: Sequence | None = None) -> Path:
    """Pretrain CoMTIP; returns the path of the final ``model.pt``.

    ``config``: a :class:`RunConfig`, a YAML path or a dict. ``data_specs``: :class:`DataSpec`
    items, ``(path, sample)`` tuples, paths, or loaded samples. Under torchrun (``WORLD_SIZE`` >
    1) each process trains on its share of every epoch (DDP, gloo on CPU / nccl on GPU) and only
    rank 0 writes. ``training_set`` skips sample loading (the LOSO benchmark shares one; its
    loaded samples, ``training_samples``, are needed only to read the probe's spots at a reading
    side other than the training patches', ``vision.morphology_px``).
    """
    from ..model.factory import build_model
    from .device import resolve_device

    if not isinstance(config, RunConfig):
        config = run_config_from_dict(config) if isinstance(config, dict) or config is None else load_run_config(config)
    cfg = config
    out = Path(out_dir)
    callbacks = list(callbacks)
    if progress is not None or cancel is not None:
        callbacks.append(FnCallback(progress, cancel))

    dev = resolve_device(device)
    dist = init_dist(dev)
    if dist.world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    try:
        return _pretrain(cfg, data_specs, out, resume, overwrite, max_steps, callbacks, dev, dist, training_set,
                         build_model, training_samples)
    finally:
        if dist.initialised_here:
            torch.distributed.destroy_process_group()


def _pretrain(cfg: RunConfig, data_specs, out: Path, resume, overwrite, max_steps, callbacks, dev, dist: Dist,
              training_set, build_model, training_samples=None) -> Path:
    tc = cfg.training
    if dist.main:
        rf.prepare_out(out, resume, overwrite)
    dist.barrier()
    if not dist.main and not out.is_dir():
        raise InputError("run folder was not created by rank 0", path=out)

    state = None
    if resume:
        cfg_path = out / rf.CONFIG_FILE
        if cfg_path.is_file():
            stored = load_run_config(cfg_path)
            if stored.model.to_dict() != cfg.model.to_dict() or stored.data.to_dict() != cfg.data.to_dict():
                raise ConfigError("the config differs from the one of the run being resumed", path=cfg_path,
                                  hint="resume with the run's own config.yaml, or start a new run")
        state = rf.load_latest_state(out)

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
        samples = training_samples
        side = input_px(cfg.model)
        if samples is None and ts.patches.shape[1] != side:  # refused before any step, not after training
            raise ConfigError(f"vision.morphology_px reads patches at {side} px but the given training set's are "
                              f"{ts.patches.shape[1]} px, and no training_samples were given to read the probe's spots",
                              hint="pass training_samples (the loaded samples of the training set) to pretrain")
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
    model.set_gene_stats(ts.expr)  # gene_z sentence values: the training spots' per-gene mean and sd
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

    teacher = None
    if cfg.model.w_image_ssl > 0:  # the EMA teacher starts as the student (BYOL) and resumes from its own state
        teacher = EmaTeacher(model, cfg.model.image_ssl.momentum).to(dev)
        if state is not None and state.get("image_ssl_teacher") is not None:
            teacher.load_state_dict(state["image_ssl_teacher"])
    step_mod = _StepModule(model, cfg.model.w_mfm, cfg.model.mask_ratio, teacher)
    train_mod: torch.nn.Module = step_mod
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_mod = DDP(step_mod, device_ids=[dev.index] if dev.type == "cuda" else None,
                        find_unused_parameters=True)
    if tc.compile and dev.type == "cuda":
        train_mod = torch.compile(train_mod)
    use_bf16 = (tc.amp == "bf16") or (tc.amp == "auto" and dev.type == "cuda")

    # ---- run folder
    if dist.main:
        save_run_config(cfg, out / rf.CONFIG_FILE)
        rf.init_metrics(out / rf.METRICS_FILE, keep_until=step if state is not None else None)
    augment = Augment(cfg.data)
    last_good = rf.list_checkpoints(out)[-1][1] if rf.list_checkpoints(out) else None
    from .feature_cache import open_feature_cache  # a fixed ViT: its features once per patch view

    fcache = open_feature_cache(model, ts, cfg, dev, use_bf16=use_bf16)

    def save_state(at_step: int, epoch: int) -> Path | None:
        nonlocal last_good
        if dist.main:
            path = rf.write_state(out, at_step, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": at_step, "epoch": epoch, "total": total, "elapsed_s": elapsed0 + (time.time() - t0),
                "rng_cpu": torch.get_rng_state(), "gene_panel": panel, "config": cfg.to_dict(),
                "world_size": dist.world, "image_ssl_teacher": None if teacher is None else teacher.state_dict(),
            }, keep=tc.keep_checkpoints)
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
        ds = BatchSet(ts, cfg, epoch, spe, dist, augment, pixels=fcache is None)
        sampler = range(start_i, min(spe, start_i + (total - step)))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=sampler, num_workers=tc.num_workers,
            pin_memory=dev.type == "cuda", persistent_workers=False)
        for imgs, gene_idx, values, mask, extra, profile, ssl, second in loader:
            ts0 = time.time()
            if fcache is not None:  # imgs are spot indices: cached pooled features of their view
                x, xe = fcache.features(imgs.numpy(), epoch), None
            else:
                imgs = imgs.to(dev, non_blocking=True)
                x = model.preprocess(imgs)
                xe = model.preprocess(extra.to(dev, non_blocking=True)) if extra.shape[0] else None
            xs = model.preprocess(second.to(dev, non_blocking=True)) if fcache is None and second.shape[0] else None
            gene_idx, values, mask = gene_idx.to(dev), values.to(dev), mask.to(dev)
            ssl = tuple(t.to(dev) for t in ssl)
            torch.manual_seed(step_seed(tc.seed, step, dist.rank, 3))  # model-internal randomness
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                outd = train_mod(x, gene_idx, values, mask, xe, pooled=fcache is not None, profile=profile.to(dev),
                                 ssl_views=ssl, second_images=xs)
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
            if teacher is not None:
                teacher.update(model)
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
                "profile": float(outd["profile"].detach()) if "profile" in outd else 0.0,
                "grid": float(outd["grid"].detach()) if "grid" in outd else 0.0,
                "text_ssl": float(outd["text_ssl"].detach()) if "text_ssl" in outd else 0.0,
                "image_ssl": float(outd["image_ssl"].detach()) if "image_ssl" in outd else 0.0,
            }
            if dist.main:
                rf.append_metrics(out / rf.METRICS_FILE, metrics)
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
    final = out / rf.FINAL_FILE
    if dist.main:
        model.calibrate_values(ts.expr)
        extras = build_bank_and_probe(model, ts, dev, cfg, samples=samples)
        extras["training"] = {
            "steps": step, "total_steps": total, "stopped_early": stopped, "epochs": step / spe,
            "samples": list(ts.names), "n_spots": ts.n_spots, "n_unlabelled": ts.info.get("n_unlabelled", 0),
            "tissue_only": ts.info.get("tissue_only", []),
            "expression_only": ts.info.get("expression_only", []), "n_expression_only": ts.info.get("n_expression_only", 0),
            "elapsed_s": elapsed0 + time.time() - t0, "world_size": dist.world, "device": str(dev),
            "run_config": cfg.to_dict(), "panel_rule": panel_rule_text(cfg.data),
            "selection_rule": "final weights after the fixed step budget",
            "feature_cache": fcache.stats() if fcache is not None else None,
        }
        save_final(final, model, panel, extras, fp16=tc.fp16_final)
        for cb in callbacks:
            cb.on_checkpoint(final)
    dist.barrier()
    return final


def pretrain_run(config: str | os.PathLike | None, data: Sequence[str], out_dir: str | os.PathLike, *,
                 samples: Sequence[str] | None = None, overrides: Iterable[str] = (), epochs: int | None = None,
                 seed: int | None = None, resume: bool = False, overwrite: bool = False,
                 max_steps: int | None = None, device: str = "auto", callbacks: Sequence[Callback] = (),
                 preset: str | None = None) -> Path:
    """``comtip pretrain``: a YAML config or a packaged ``preset`` (neither: tiny) with ``--set``-style ``overrides``
    (``epochs`` / ``seed`` are two of them), the samples of ``data`` (:func:`engine.data.resolve_data_specs`),
    the run folder checked before any data is loaded; returns the final ``model.pt``."""
    sets = list(overrides or ())
    if epochs is not None:
        sets.append(f"training.epochs={epochs}")
    if seed is not None:
        sets.append(f"training.seed={seed}")
    cfg = load_run_config(config, sets, preset=preset)
    rf.check_out_dir(Path(out_dir), resume, overwrite)
    specs = resolve_data_specs(data, samples)
    return pretrain(cfg, specs, out_dir, resume=resume, overwrite=overwrite, max_steps=max_steps,
                    callbacks=callbacks, device=device)


__all__ = ["pretrain", "pretrain_run"]
