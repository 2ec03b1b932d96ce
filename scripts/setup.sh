#!/usr/bin/env bash
# Installs napari-comtip into .venv at the repository root, with the Debian packages that a
# virtual X server (for the GUI tests and `comtip view --screenshot`) needs. Idempotent: a second
# run only checks. Works as root on a fresh Debian/Ubuntu machine; elsewhere it skips apt.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0
              libxcb-randr0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0
              libxcb-cursor0 libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3)

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    echo "setup: not root or no apt-get; make sure these are installed: ${APT_PACKAGES[*]}" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch 2.14.1 + torchvision 0.29.1 is the pair measured to work on these machines (the CUDA
# build also runs on the CPU); override with COMTIP_TORCH_SPEC if your platform needs another.
TORCH_SPEC=${COMTIP_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if ! .venv/bin/python -c "import napari_comtip, torch, napari, pytestqt" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.comtip-installed ]; then
    echo "setup: installing Python packages into .venv (a few minutes the first time)"
    # --no-cache-dir: no second copy of the wheels (torch and its CUDA libraries are ~4 GB) in
    # ~/.cache/pip; a CI run once failed on a full disk while installing them
    .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip wheel
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q --no-cache-dir $TORCH_SPEC -e ".[qt,dev]"
    touch .venv/.comtip-installed
fi
echo "setup: ready ($(.venv/bin/python -c 'import napari_comtip, torch; print("napari-comtip", napari_comtip.__version__, "torch", torch.__version__)'))"
