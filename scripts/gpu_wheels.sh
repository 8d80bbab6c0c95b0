#!/usr/bin/env bash
# Download, on a machine that reaches the package registry, the wheels the GPU machine's image lacks, into the
# ignored folder .whl/ of this checkout, so a GPU run can carry them (the GPU machine reaches no registry):
#
#     scripts/gpu_wheels.sh [DIR]            default DIR: .whl (ignored by .gitignore)
#
# scripts/gpu_check.sh then installs DIR/*.whl with `pip install --no-index --no-deps --target` into a folder of
# its own, put first on PYTHONPATH (the image's own packages stay as they are), so the diffusers parity and
# scheduler tests and the peer rows of the benchmarks run on the GPU too.
#
# The image (Python 3.12.3, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0; its package list is in the
# device tool's KINDS.md) has no diffusers and no peer kernel library. What is carried, and why each:
#     diffusers     the model integration, the drop-in schedulers and their parity tests. What it needs on
#                   Python 3.12 is on the image: huggingface-hub >= 1.32, safetensors >= 0.8, Pillow, regex,
#                   requests, filelock, numpy, packaging, tqdm (its importlib_metadata requirement is for
#                   Python < 3.8 only, and the wheel of it would need lazy-importer, which the image lacks)
#     liger-kernel  a peer row of the norm benchmarks (pure Python + Triton; needs only torch, triton)
# Wheels only (--only-binary), no dependencies resolved (--no-deps: each one needed is named above), for
# CPython 3.12 on x86-64 Linux whatever this machine runs. About 7 MB in all (a GPU call carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
WHEELS=(diffusers liger-kernel)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${WHEELS[@]}"
count=$(ls "$DIR"/*.whl | wc -l)
if [[ $count -ne ${#WHEELS[@]} ]]; then
    echo "gpu_wheels.sh: expected ${#WHEELS[@]} wheels in $DIR, found $count" >&2
    exit 1
fi
ls -l "$DIR"/*.whl
echo "gpu_wheels.sh: $count wheels in $DIR ($(du -sh "$DIR" | cut -f1)); carry \"$DIR\" in the GPU call"
