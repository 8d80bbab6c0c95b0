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


def _feature_reasons(q, k, v, seqused_k, causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes,
                     attn_mask, dropout_p) -> list[str]:
    reasons = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{name} has dtype {t.dtype}; the CUDA attention kernels take float16 and bfloat16")
    if q.shape[-1] not in HEAD_DIMS:
        reasons.append(f"head_dim {q.shape[-1]}; the CUDA attention kernels take head dims {HEAD_DIMS}")
    if dropout_p > 0:
        reasons.append(f"dropout_p = {dropout_p}; the CUDA attention kernels have no dropout")
    if softcap > 0:
        reasons.append(f"softcap = {softcap}; the CUDA attention kernels have no softcap")
    right = -1 if causal else window_right
    if window_left >= 0 or right >= 0:
        reasons.append(f"window_size = ({window_left}, {window_right}); the CUDA attention kernels have no sliding "
                       "window")
    if alibi_slopes is not None:
        reasons.append("alibi_slopes; the CUDA attention kernels have no ALiBi")
    if attn_mask is not None:
        reasons.append("attn_mask; the CUDA attention kernels take no explicit mask")
    # dense, Lq == Lk and no seqused_k: top-left and bottom-right alignment are the same mask
    same_alignment = q.dim() == 4 and q.shape[1] == k.shape[1] and seqused_k is None
    if causal and not causal_bottom_right and not same_alignment:
        reasons.append("causal top-left aligned (torch SDPA's mask with Lq != Lk); the CUDA attention kernels align "
                       "the causal mask bottom-right (flash-attn's)")
    return reasons


def _reasons(op: str, q, k, v, seqused_k, causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes,
             attn_mask, dropout_p) -> list[str]:
    if q.device.type != "cuda":
        return [CUDA_ONLY]
    return missing_op_reasons(op, device=q.device) + _feature_reasons(
        q, k, v, seqused_k, causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p)


def forward_reasons(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask,
                    dropout_p, dropout_seed, deterministic) -> list[str]:
    reasons = _reasons("attention_forward", q, k, v, seqused_k, causal, causal_bottom_right, window_left, window_right,
                       softcap, alibi_slopes, attn_mask, dropout_p)
    if softmax_scale <= 0 and q.device.type == "cuda":
        reasons.append(f"softmax_scale = {softmax_scale}; the CUDA attention kernels take a positive scale")
    return reasons


def backward_reasons(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                     max_seqlen_k, softmax_scale, causal, causal_bottom_right, window_left, window_right, softcap,
                     alibi_slopes, attn_mask, dropout_p, dropout_seed, deterministic,
                     attn_mask_needs_grad) -> list[str]:
    reasons = _reasons("attention_backward", q, k, v, seqused_k, causal, causal_bottom_right, window_left, window_right,
                       softcap, alibi_slopes, attn_mask, dropout_p)
    if q.device.type == "cuda" and dout.dtype != q.dtype:
        reasons.append(f"dout has dtype {dout.dtype}, not q's {q.dtype}")
    if softmax_scale <= 0 and q.device.type == "cuda":
        reasons.append(f"softmax_scale = {softmax_scale}; the CUDA attention kernels take a positive scale")
    return reasons


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                      causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask,
                      dropout_p, dropout_seed, deterministic):
    """Kernel of mmkern::attention_forward: (out like q, lse float32), see mmkern/ops/attention.py."""
    return cpp_op("attention_forward")(q, k, v, _int32(cu_seqlens_q), _int32(cu_seqlens_k), _int32(seqused_k),
                                       int(max_seqlen_q), int(max_seqlen_k), float(softmax_scale), bool(causal))


def attention_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                       max_seqlen_k, softmax_scale, causal, causal_bottom_right, window_left, window_right, softcap,
                       alibi_slopes, attn_mask, dropout_p, dropout_seed, deterministic, attn_mask_needs_grad):
    """Kernel of mmkern::attention_backward: (dq, dk, dv, d_mask), d_mask empty (the kernels take no mask)."""
    dq, dk, dv = cpp_op("attention_backward")(
        dout, q, k, v, out, lse, dlse, _int32(cu_seqlens_q), _int32(cu_seqlens_k), _int32(seqused_k),
        int(max_seqlen_q), int(max_seqlen_k), float(softmax_scale), bool(causal), bool(deterministic))
    return dq, dk, dv, q.new_empty((0,))


__all__ = ["attention_forward", "attention_backward", "forward_reasons", "backward_reasons", "KERNEL_DTYPES",
           "HEAD_DIMS"]
