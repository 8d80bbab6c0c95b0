"""Adapter of mmkern::rotary_embedding for the `cpu` backend (mmkern._C, csrc/attention/rotary_cpu.cpp).

torch.ops.mmkern_C.cpu_rotary_embedding: one pass over x (each token's table row read once, each head's rotary
part rotated in fp32 in an L1 row buffer, rounded once into out; the other features copied). It takes x in
float32, float16 or bfloat16 with free strides but a contiguous last dimension, tables in x's dtype or float32,
int or (B,) int32/int64 offsets and varlen. Around it: CPU tensors only, float64 goes to the reference, a strided
last dimension or table is made contiguous first.
"""
from __future__ import annotations

import torch

from mmkern.native import cpp_op, missing_op_reasons

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRESENT: set = set()      # set once the loaded build was found to have the op (a loaded build does not change)


def rotary_embedding_reasons(p) -> list[str]:
    """Why the C++ CPU kernel cannot take this RotaryProblem ([] = it can)."""
    if p.device.type != "cpu":
        return [f"the cpu backend's rotary kernel runs on CPU tensors; got {p.device.type} tensors"]
    reasons = [] if _PRESENT else missing_op_reasons("cpu_rotary_embedding", device="cpu")
    if not reasons:
        _PRESENT.add(True)
    if p.x.dtype not in KERNEL_DTYPES:
        reasons.append(f"x has dtype {p.x.dtype}; the C++ CPU rotary kernel takes float32, bfloat16 and float16")
    return reasons


def _c(t):
    return None if t is None else t.contiguous()


def rotary_embedding(p) -> torch.Tensor:
    x = p.x if p.x.stride(-1) == 1 else p.x.contiguous()
    return cpp_op("cpu_rotary_embedding")(x, _c(p.cos), _c(p.sin), _c(p.seqlen_offsets), _c(p.cu_seqlens),
                                          int(p.seqlen_offset), bool(p.interleaved), bool(p.conjugate))
