"""``torchrun --nproc_per_node 2 -m napari_comtip pretrain`` on the CPU (DDP over gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_comtip.engine.run_folder import read_metrics


def _torchrun_pretrain(tmp_path, model: str = "") -> Path:
    """``pretrain`` of the micro preset on @demo under two CPU processes for 3 steps; the run folder."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(textwrap.dedent("""
        preset: micro
        data: {n_hvg: 40, n_mean: 10, unlabelled_per_sample: 32, unlabelled_batch: 4}
        training: {epochs: 1, batch_size: 8, checkpoint_every: 2, warmup_steps: 1, threads: 1}
    """) + (f"model: {model}\n" if model else ""))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", COMTIP_DEBUG="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "napari_comtip", "pretrain",
           "--config", str(cfg), "--data", "@demo", "--out", str(out), "--max-steps", "3", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    out = _torchrun_pretrain(tmp_path)
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # only rank 0 writes
    assert (out / "model.pt").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000002.pt", "step-0000003.pt"]
    import torch

    state = torch.load(out / "checkpoints" / "step-0000003.pt", weights_only=True)
    assert state["world_size"] == 2


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_processes_with_image_self_distillation(tmp_path):
    """The EMA teacher lives outside the DDP module: each process updates its own copy from the
    same all-reduced weights, and rank 0 saves it in the resumable state."""
    out = _torchrun_pretrain(tmp_path, model="{w_mfm: 0.0, w_image_ssl: 1.0}")
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(r["image_ssl"] > 0 for r in rows)
    import torch

    state = torch.load(out / "checkpoints" / "step-0000003.pt", weights_only=True)
    assert state["world_size"] == 2 and state["image_ssl_teacher"] is not None
