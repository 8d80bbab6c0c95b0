"""The five backends and what each needs from the machine.

Kernels are registered by the backend packages themselves (mmkern/reference, mmkern/torch_backend,
mmkern/triton, and mmkern/native for the compiled extension mmkern._C); this file only says whether each backend can
run here, and on which devices.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from mmkern.dispatch import Backend, register_backend

# Triton reads TRITON_INTERPRET when it is imported: it must be set before `import mmkern`.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None    # ~40 us: once, not per op call


def _triton_environment_reasons() -> list[str]:
    if not _triton_installed():
        return ["the triton package is not installed (pip install triton; Linux only)"]
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        return ["no CUDA GPU here (set TRITON_INTERPRET=1 before importing mmkern to run the Triton kernels "
                "on the CPU through Triton's interpreter)"]
    return []


def _triton_device_reason(device: torch.device) -> str | None:
    if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET):
        return None
    if device.type == "cpu":
        return "CPU tensors run on Triton only through its interpreter (TRITON_INTERPRET=1 before import)"
    return f"runs on CUDA tensors, not {device.type}"


def _extension_reasons() -> list[str]:
    # mmkern.native loads the build lazily and turns a missing, stale or broken one into a reason
    from mmkern import native
    return native.extension_reasons()


def _cuda_environment_reasons() -> list[str]:
    from mmkern import native
    reasons = _extension_reasons() + native.cuda_reasons()
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU here")
    return reasons


def _only(device_type: str):
    def reason(device: torch.device) -> str | None:
        return None if device.type == device_type else f"runs on {device_type} tensors, not {device.type}"
    return reason


register_backend(Backend("reference", "eager PyTorch in float64: the oracle, every op and feature, slow, "
                         "materialises the full score matrix", lambda: [], lambda device: None))
register_backend(Backend("torch", "torch's own kernels in the input dtype (SDPA, F.layer_norm / F.rms_norm, the "
                         "eager diffusion formulas): what a user would call without mmkern; the floor auto dispatch "
                         "never goes below", lambda: [], lambda device: None))
register_backend(Backend("triton", "Triton kernels (GPU, or CPU through the interpreter)",
                         _triton_environment_reasons, _triton_device_reason))
register_backend(Backend("cuda", "CUDA C++ kernels of mmkern._C", _cuda_environment_reasons, _only("cuda")))
register_backend(Backend("cpu", "C++ CPU kernels of mmkern._C", _extension_reasons, _only("cpu")))
