#!/usr/bin/env bash
# A virtual environment with the GPU machine's software, on any x86-64 Linux machine with pyenv's Python 3.12:
#
#     VENV=$(scripts/gpu_image_env.sh [VENV])      prints the venv's path (its bin/ holds python, pip, mmkern)
#
# The GPU machine lent now and then runs its own image (the device tool's KINDS.md): Python 3.12.3,
# torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, numpy 2.5.2, pytest-xdist and pytest-timeout, and
# no diffusers. Whatever runs there first runs here, in CI, on these versions (.ci/run, second environment),
# so a GPU call is not spent on an incompatibility a CPU could have found.
#
# Default VENV: ~/.cache/mmkern-ci/gpu-image-<versions> (the name changes with the pins, so a new pin makes a
# new venv and a warm machine reuses the old one). A cold create downloads the CUDA build of torch 2.11
# (about 2 minutes here); then mmkern is installed editable with its test extra, and Pillow and tqdm (on the
# image too). diffusers is not installed: the GPU run carries it as a wheel (scripts/gpu_wheels.sh), and
# .ci/run puts it on PYTHONPATH the way scripts/gpu_check.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 numpy==2.5.2)
# what the image also has and the tests (or the carried diffusers: requests) use; the test extra brings
# pytest, pytest-benchmark, hypothesis, matplotlib, ninja
IMAGE_EXTRAS=(pytest-xdist pytest-timeout pillow tqdm requests)
TAG=$(printf '%s\n' "${PINS[@]}" | tr -d '=' | tr '\n' '-' | sed 's/-$//')
VENV="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/mmkern-ci/gpu-image-py3.12-$TAG}"

if [[ ! -x "$VENV/bin/python" ]]; then
    PY312=""
    PY312_VERSION=$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1 || true)
    [[ -n "$PY312_VERSION" ]] && PY312=$(PYENV_VERSION=$PY312_VERSION pyenv which python 2>/dev/null || true)
    [[ -n "$PY312" ]] || PY312=$(command -v python3.12 || true)
    if [[ -z "$PY312" ]]; then
        echo "gpu_image_env.sh: no Python 3.12 here (pyenv install 3.12 or a python3.12 on PATH)" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$VENV")"
    "$PY312" -m venv "$VENV" >&2
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# the pins and the package in one resolve (a later `pip install -e` alone could move a pinned version)
"$VENV/bin/python" -m pip install -q "${PINS[@]}" "${IMAGE_EXTRAS[@]}" -e ".[test]" >&2
"$VENV/bin/python" - "${PINS[@]}" >&2 <<'CHECK'
import importlib.metadata as md, platform, sys
wrong = [f"{pin} (have {md.version(pin.split('==')[0])})" for pin in sys.argv[1:]
         if md.version(pin.split("==")[0]).split("+")[0] != pin.split("==")[1]]
if sys.version_info[:2] != (3, 12):
    wrong.append(f"Python 3.12 (have {platform.python_version()})")
sys.exit(f"gpu_image_env.sh: versions moved off the GPU image's: {', '.join(wrong)}" if wrong else 0)
CHECK
echo "$VENV"
