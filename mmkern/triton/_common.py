"""Helpers shared by the Triton kernel modules."""
from __future__ import annotations

import os

import torch

# Triton's interpreter (TRITON_INTERPRET=1, how kernels are tested without a GPU) multiplies the raw
# bit patterns of bfloat16 operands in tl.dot (triton-lang/triton#11584; seen with triton 3.8).
# Kernels with tl.dot take a constexpr DOT_IN_FP32 that upcasts their operands; it is False on a GPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_IN_FP32 = INTERPRETING
if INTERPRETING:        # scalar loop bounds under triton 3.6's interpreter (see _interpreter_compat)
    from mmkern.triton import _interpreter_compat

    _interpreter_compat.apply()

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                  torch.int32: "*i32", torch.int64: "*i64"}


def dtype_reasons(**tensors: torch.Tensor | None) -> list[str]:
    """Reasons for tensors whose dtype the Triton kernels do not take (float64 is the reference's)."""
    return [f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 and float32"
            for name, t in tensors.items() if t is not None and t.dtype not in KERNEL_DTYPES]


# Compile options beyond num_warps/num_stages, per kernel (by name): the launchers pass them and
# mmkern/triton/aot.py compiles with them, so the ahead-of-time report sees the launched code.
_KERNEL_OPTIONS: dict[str, dict] = {}

# ptxas (12.9 and 13.0 alike) sometimes gives a large kernel only 32 registers and spills kilobytes per
# thread, a choice no flag of Triton's default compile avoids: the float32 dK/dV kernel, head dim 64, sm_80,
# 32x64 with 4 warps and no feature on: 32 registers and 17.9 KB of spill stores. Triton's maxnreg option
# (the PTX directive .maxnreg) states the usual limit explicitly, and ptxas then allocates normally (255
# registers, 2.1 KB). See `mmkern aot-report` for every configuration.
FULL_REGISTER_FILE = {"maxnreg": 255}


def set_kernel_options(options: dict, *kernels) -> None:
    for kernel in kernels:
        _KERNEL_OPTIONS[kernel.__name__] = dict(options)


def kernel_options(kernel) -> dict:
    """The extra compile options of a Triton kernel ({} for most); pass them as launch keywords."""
    return _KERNEL_OPTIONS.get(getattr(kernel, "__name__", ""), {})
