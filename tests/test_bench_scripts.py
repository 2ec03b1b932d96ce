"""The GPU check script, rehearsed on the CPU: every step it runs on a rented GPU must work.

``bench/gpu_check.sh`` is meant for a short, paid run on a CUDA machine; a wrong option or a
benchmark that breaks would waste it. ``--rehearse-on-cpu`` runs the same steps (GPU-marked
tests, benchmarks 1, 3 and 4) on the CPU with small sizes. Slow: about 2.5 minutes on 2 cores,
and benchmark 3 generates its 1.35 GiB slide in the (temporary) cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_rehearsal_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NAPARI_COMTIP_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--rehearse-on-cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    results = {}
    for line in out.splitlines():
        name, sep, payload = line.partition(": ")
        if sep and name.startswith("bench-") and payload.startswith("{"):
            results[name] = json.loads(payload)
    assert set(results) == {"bench-inference", "bench-inference-base", "bench-slide-reading", "bench-scaling",
                            "bench-training"}, out[-3000:]
    assert results["bench-inference"]["device"] == "cpu" and results["bench-inference"]["pipeline_spots_per_s"] > 0
    assert results["bench-scaling"]["sizes"] == [200, 400, 800]
    assert results["bench-training"]["pretrain_samples_per_s"] > 0


def test_gpu_check_rejects_unknown_options():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--bogus"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
