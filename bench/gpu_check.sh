#!/usr/bin/env bash
# One short run on a rented CUDA machine: the GPU-marked tests, then benchmarks 1 (encoder
# efficiency), 3 (scaling) and 4 (training throughput) on the GPU; prints every table and, at the
# end, the JSON line of each. Budget: under 8 minutes in total (each step has its own timeout).
#
#   bash bench/gpu_check.sh            # uses ./.venv/bin/python if present, else python3
#   PYTHON=/path/to/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# keep the run's cache (generated slide, embeddings) out of the user's cache unless told otherwise
export NAPARI_COMTIP_CACHE="${NAPARI_COMTIP_CACHE:-$(mktemp -d -t comtip-gpu-check-XXXXXX)}"
LOG="$(mktemp -d -t comtip-gpu-logs-XXXXXX)"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'))" >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

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
step gpu-tests        100 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${gpu_tests[@]}"
step bench-inference   60 "$PY" bench/inference.py --device cuda --spots 16384 --repeats 3
step bench-inference-base 60 "$PY" bench/inference.py --device cuda --model base --spots 8192 --repeats 3
step bench-scaling    150 "$PY" bench/scaling.py --device cuda --sizes 1000,10000,100000
step bench-training    80 "$PY" bench/training.py --device cuda --steps 30

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
