"""Adapter of flash attention for the `cuda` backend (mmkern._C, csrc/attention/).

Calls torch.ops.mmkern_C.attention_forward (csrc/attention/attention_forward.cu: tensor-core forward,
mma.sync m16n8k16 + ldmatrix + a 2-stage cp.async pipeline) and torch.ops.mmkern_C.attention_backward
(csrc/attention/attention_backward.cu). What the kernels take, and nothing else (the `reasons` functions
name the rest, so `auto` dispatch falls through to the Triton backend):
- CUDA tensors (there is no C++ CPU attention kernel: the `cpu` backend is refused for this op),
- float16 / bfloat16, head dims 64, 96 and 128,
- dense, varlen (cu_seqlens), seqused_k (KV cache), GQA/MQA, Lq != Lk, causal bottom-right aligned;
- no dropout, softcap, sliding window, ALiBi, attn_mask or top-left causal.
cu_seqlens and seqused_k are handed over as int32 (the ops' layout; int64 is cast here).
"""
from __future__ import annotations

import torch

from mmkern.native import cpp_op, missing_op_reasons

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 96, 128)
CUDA_ONLY = "the cuda backend's attention runs on CUDA tensors (mmkern._C has no CPU attention kernel)"


def _int32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int32).contiguous()


def _feature_reasons(p) -> list[str]:
    reasons = []
    for name, t in (("q", p.q), ("k", p.k), ("v", p.v)):
        if t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{name} has dtype {t.dtype}; the CUDA attention kernels take float16 and bfloat16")
    if p.head_dim not in HEAD_DIMS:
        reasons.append(f"head_dim {p.head_dim}; the CUDA attention kernels take head dims {HEAD_DIMS}")
    if p.dropout_p > 0:
        reasons.append(f"dropout_p = {p.dropout_p}; the CUDA attention kernels have no dropout")
    if p.softcap > 0:
        reasons.append(f"softcap = {p.softcap}; the CUDA attention kernels have no softcap")
    if p.windowed:
        reasons.append(f"window_size = ({p.window_left}, {p.window_right}); the CUDA attention kernels have no "
                       "sliding window")
    if p.alibi_slopes is not None:
        reasons.append("alibi_slopes; the CUDA attention kernels have no ALiBi")
    if p.attn_mask is not None:
        reasons.append("attn_mask; the CUDA attention kernels take no explicit mask")
    if p.causal and not p.causal_bottom_right and not p.same_alignment:
        reasons.append("causal top-left aligned (torch SDPA's mask with Lq != Lk); the CUDA attention kernels align "
                       "the causal mask bottom-right (flash-attn's)")
    if p.softmax_scale <= 0:
        reasons.append(f"softmax_scale = {p.softmax_scale}; the CUDA attention kernels take a positive scale")
    if p.paged:
        reasons.append("block_table (a paged KV cache); the CUDA attention kernels read dense k/v (Triton's split-KV "
                       "decode reads pages)")
    if p.leftpad_k is not None:
        reasons.append("cache_leftpad; the CUDA attention kernels start every sequence's keys at row 0")
    return reasons


def _reasons(op: str, p) -> list[str]:
    if p.device.type != "cuda":
        return [CUDA_ONLY]
    return missing_op_reasons(op, device=p.device) + _feature_reasons(p)


def forward_reasons(p) -> list[str]:
    """Why the CUDA forward cannot take this AttentionProblem ([] = it can)."""
    return _reasons("attention_forward", p)


def backward_reasons(p) -> list[str]:
    reasons = _reasons("attention_backward", p)
    if p.device.type == "cuda" and p.dout.dtype != p.q.dtype:
        reasons.append(f"dout has dtype {p.dout.dtype}, not q's {p.q.dtype}")
    return reasons


def attention_forward(p):
    """Kernel of mmkern::attention_forward: (out like q, lse float32), see mmkern/ops/attention_problem.py."""
    return cpp_op("attention_forward")(p.q, p.k, p.v, _int32(p.cu_seqlens_q), _int32(p.cu_seqlens_k),
                                       _int32(p.seqused_k), int(p.max_seqlen_q), int(p.max_seqlen_k),
                                       float(p.softmax_scale), bool(p.causal))


def attention_backward(p):
    """Kernel of mmkern::attention_backward: (dq, dk, dv, d_mask), d_mask empty (the kernels take no mask)."""
    dq, dk, dv = cpp_op("attention_backward")(
        p.dout, p.q, p.k, p.v, p.out, p.lse, p.dlse, _int32(p.cu_seqlens_q), _int32(p.cu_seqlens_k),
        _int32(p.seqused_k), int(p.max_seqlen_q), int(p.max_seqlen_k), float(p.softmax_scale), bool(p.causal),
        bool(p.deterministic))
    return dq, dk, dv, p.q.new_empty((0,))


__all__ = ["attention_forward", "attention_backward", "forward_reasons", "backward_reasons", "KERNEL_DTYPES",
           "HEAD_DIMS"]
