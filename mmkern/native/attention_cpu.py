"""Adapter of flash attention for the `cpu` backend (mmkern._C, csrc/attention/attention_cpu_*.cpp).

Calls torch.ops.mmkern_C.cpu_attention_forward / cpu_attention_backward: the tiled C++ CPU kernels (float32
online softmax, one (128 x 256) score tile per thread, GEMMs through the MKL that torch links, or a portable
at::vec GEMM; see csrc/common/cpu_gemm.h). They take every feature of mmkern::attention_forward: float32,
bfloat16 and float16 (float32 accumulation), head dims 1..256, causal in both alignments, sliding window,
softcap, ALiBi (H) / (B, H), MQA/GQA without repeating k/v, Lq != Lk, varlen, seqused_k, bool and float masks
with the mask's gradient, dropout (the Triton kernels' Philox mask, bit for bit), lse; the forward also paged
caches (block_table: each tile's rows gathered from their pages into an L2 buffer), leftpad_k and num_splits.
What the adapter does around them: CPU tensors only (CUDA tensors go to the cuda/triton backends); float64
goes to the reference; inputs whose head dim is not contiguous are copied (the kernels take free row, head
and batch strides); the dropout seed (a (1,) int64 tensor) is read once on the host.
"""
from __future__ import annotations

import torch

from mmkern.native import cpp_op, missing_op_reasons

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRESENT: set = set()      # ops the loaded build was found to have (a loaded build does not change)


def _missing(op: str) -> list[str]:
    if op in _PRESENT:
        return []
    missing = missing_op_reasons(op, device="cpu")
    if not missing:
        _PRESENT.add(op)
    return missing


def _reasons(op: str, p) -> list[str]:
    if p.device.type != "cpu":
        return [f"the cpu backend's attention runs on CPU tensors; got {p.device.type} tensors"]
    reasons = _missing(op)
    if p.q.dtype not in KERNEL_DTYPES:
        reasons.append(f"q has dtype {p.q.dtype}; the C++ CPU attention kernels take float32, bfloat16 and float16")
    return reasons


def forward_reasons(p) -> list[str]:
    """Why the C++ CPU forward cannot take this AttentionProblem ([] = it can)."""
    return _reasons("cpu_attention_forward", p)


def backward_reasons(p) -> list[str]:
    return _reasons("cpu_attention_backward", p)


def _heads_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _seed(p) -> int:
    return int(p.dropout_seed.reshape(-1)[0]) if p.dropout_p > 0 else 0


def _settings(p) -> tuple:
    """The arguments after (q, k, v) both kernels share, up to the mask."""
    return (p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k, int(p.max_seqlen_q), int(p.max_seqlen_k),
            float(p.softmax_scale), bool(p.causal), bool(p.causal_bottom_right), int(p.window_left),
            int(p.window_right), float(p.softcap), p.alibi_slopes, p.attn_mask)


def attention_forward(p, num_splits: int | None = None):
    """Kernel of mmkern::attention_forward: (out like q, lse float32); num_splits (None = the problem's) 0 = the
    kernel chooses."""
    q, k, v = (_heads_contiguous(t) for t in (p.q, p.k, p.v))
    splits = p.num_splits if num_splits is None else num_splits
    return cpp_op("cpu_attention_forward")(q, k, v, *_settings(p), float(p.dropout_p), _seed(p), int(splits),
                                           p.block_table, p.leftpad_k)


def attention_backward(p):
    """Kernel of mmkern::attention_backward: (dq, dk, dv, d_mask); d_mask (B, H, Lq, Lk) when a float mask's
    gradient is asked for, else empty. Deterministic whatever `deterministic` says (no atomics)."""
    q, k, v, dout, out = (_heads_contiguous(t) for t in (p.q, p.k, p.v, p.dout, p.out))
    dout = dout.to(q.dtype)
    return cpp_op("cpu_attention_backward")(dout, q, k, v, out, p.lse.float(), None if p.dlse is None else p.dlse.float(),
                                            *_settings(p), bool(p.attn_mask_needs_grad), float(p.dropout_p), _seed(p))


__all__ = ["attention_forward", "attention_backward", "forward_reasons", "backward_reasons", "KERNEL_DTYPES"]
