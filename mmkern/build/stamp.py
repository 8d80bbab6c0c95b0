"""The build stamp, _C.build.json: the configuration a build was made with (mmkern/build/config.py), its
time and the ptxas report; and whether a build with a given stamp may be used here (`stale_reason`).

A stamp that no longer matches (other torch, changed sources or flags) makes the build stale:
`mmkern.native` then refuses it with a reason (`mmkern info` shows it) and `ensure_built()` rebuilds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from mmkern.build.config import CPU_ONLY_REASON, configuration, cpu_isa
from mmkern.build.paths import CSRC_DIR, STAMP_NAME


def read_stamp(directory: Path) -> dict | None:
    """The stamp in `directory` as a dict, or None when it is missing or unreadable."""
    try:
        return json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def stale_reason(stamp: dict | None, accept_cpu_only: bool = True) -> str | None:
    """Why a build with this stamp must not be used here (None: it is current). Source changes
    count only where the sources are present (a checkout). A build asked for without CUDA (`mmkern build
    --cpu-only`, MMKERN_BUILD_CUDA=0) is current for its C++ CPU kernels on a machine that could compile CUDA
    too: the cuda backend then names the missing kernels (mmkern.native.cuda_reasons), the cpu backend runs.
    accept_cpu_only=False: current only if it is the build this environment would make (ensure_built, and
    `mmkern build --if-stale` without --cpu-only, rebuild it with the CUDA kernels)."""
    if stamp is None:
        return "it has no build stamp (_C.build.json)"
    import torch

    if stamp.get("torch") != torch.__version__:
        return f"it was built for torch {stamp.get('torch')}, this is torch {torch.__version__}"
    if stamp.get("cpu_isa", "default") == "avx2" and cpu_isa() != "avx2":
        return "it was built for CPUs with AVX2 and FMA; this one lacks them (or MMKERN_CPU_ISA=default)"
    if stamp.get("python") != sys.implementation.cache_tag:
        return f"it was built for {stamp.get('python')}, this is {sys.implementation.cache_tag}"
    if CSRC_DIR.is_dir():
        try:
            cpu_only = accept_cpu_only and stamp.get("no_cuda_reason") == CPU_ONLY_REASON
            current = configuration(cpu_only=cpu_only)["source_hash"]
        except Exception as exc:  # unreadable sources: judge by torch alone
            return None if isinstance(exc, OSError) else f"its configuration cannot be computed: {exc}"
        if current != stamp.get("source_hash"):
            return "csrc/ or the build settings changed since it was built"
    return None
