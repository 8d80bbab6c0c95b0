"""Helpers shared by the Triton kernel modules."""
from __future__ import annotations

import os

import torch

# Triton's interpreter (TRITON_INTERPRET=1, how kernels are tested without a GPU) multiplies the raw
# bit patterns of bfloat16 operands in tl.dot (triton-lang/triton#11584; seen with triton 3.8).
# Kernels with tl.dot take a constexpr DOT_IN_FP32 that upcasts their operands; it is False on a GPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_IN_FP32 = INTERPRETING

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                  torch.int32: "*i32", torch.int64: "*i64"}


def dtype_reasons(**tensors: torch.Tensor | None) -> list[str]:
    """Reasons for tensors whose dtype the Triton kernels do not take (float64 is the reference's)."""
    return [f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 and float32"
            for name, t in tensors.items() if t is not None and t.dtype not in KERNEL_DTYPES]
