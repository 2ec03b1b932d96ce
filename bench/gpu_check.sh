#!/usr/bin/env bash
# One short run on a rented CUDA machine: the GPU-marked tests, then benchmarks 1 (encoder
# efficiency), 2 (slide reading: reader threads vs the reader processes the GPU path uses from
# 50k spots), 3 (scaling) and 4 (training throughput) on the GPU; prints every table and, at the
# end, the JSON line of each. Budget: under 8 minutes in total (each step has its own timeout).
#
#   bash bench/gpu_check.sh            # uses ./.venv/bin/python if present, else python3
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --rehearse-on-cpu   # same steps on the CPU with small sizes: checks the
#                                               # script itself before GPU time is paid for
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEVICE=cuda
INF_SPOTS=16384 INF_BASE_SPOTS=4096 INF_REPEATS=3 SCALING_SIZES=1000,10000,100000 TRAIN_STEPS=30
if [[ "${1:-}" == "--rehearse-on-cpu" ]]; then
  DEVICE=cpu
  INF_SPOTS=256 INF_BASE_SPOTS=32 INF_REPEATS=1 SCALING_SIZES=200,400,800 TRAIN_STEPS=3
elif [[ -n "${1:-}" ]]; then
  echo "usage: bash bench/gpu_check.sh [--rehearse-on-cpu]" >&2
  exit 2
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# keep the run's cache (generated slide, embeddings) out of the user's cache unless told otherwise
export NAPARI_COMTIP_CACHE="${NAPARI_COMTIP_CACHE:-$(mktemp -d -t comtip-gpu-check-XXXXXX)}"
LOG="$(mktemp -d -t comtip-gpu-logs-XXXXXX)"

if [[ "$DEVICE" == cuda ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'))" >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no CUDA device: rehearsal on the CPU)")'

failed=()
step() {  # step NAME SECONDS COMMAND...
  local name="$1" secs="$2"; shift 2
  echo
  echo "=== ${name} (timeout ${secs} s)"
  local t0=$SECONDS
  if timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$LOG/${name}.log"; then
    echo "--- ${name}: ok in $((SECONDS - t0)) s"
  else
    echo "--- ${name}: FAILED or timed out after $((SECONDS - t0)) s"
    failed+=("$name")
  fi
}

mapfile -t gpu_tests < <(grep -rl "mark.gpu" tests --include='*.py' | sort)
step gpu-tests         90 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${gpu_tests[@]}"
step bench-inference   60 "$PY" bench/inference.py --device "$DEVICE" --spots "$INF_SPOTS" --repeats "$INF_REPEATS"
step bench-inference-base 60 "$PY" bench/inference.py --device "$DEVICE" --model base --spots "$INF_BASE_SPOTS" --repeats "$INF_REPEATS"
step bench-slide-reading 60 "$PY" bench/slide_reading.py --device "$DEVICE" --quick
step bench-scaling    120 "$PY" bench/scaling.py --device "$DEVICE" --sizes "$SCALING_SIZES"
step bench-training    80 "$PY" bench/training.py --device "$DEVICE" --steps "$TRAIN_STEPS"

echo
echo "=== results (last JSON line of each benchmark)"
for f in "$LOG"/bench-*.log; do
  [[ -f "$f" ]] || continue
  echo "$(basename "$f" .log): $(grep '^{' "$f" | tail -n 1 || echo 'no result')"
done
echo "logs in $LOG"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
