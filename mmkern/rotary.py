"""Rotary position embedding (RoPE), as flash_attn.layers.rotary.apply_rotary_emb: one fused op with its backward.

Normalises the arguments only (the int-or-tensor offsets, the in-place form), then calls
torch.ops.mmkern.rotary_embedding (mmkern/ops/rotary.py), which validates, dispatches and carries autograd.
"""
from __future__ import annotations

import torch

from mmkern.ops import _eager as eager
from mmkern.ops import rotary as ops
from mmkern.ops._checks import check_tensor


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """Rotates the first rotary_dim features of each head of x by its position's angle, as
    flash_attn.layers.rotary.apply_rotary_emb.

    x: (B, L, H, D) float16, bfloat16, float32 (float64 runs on the reference); varlen (cu_seqlens given):
        (total, H, D), the B sequences one after another.
    cos, sin: (seqlen_ro, rotary_dim / 2) in x's dtype or float32: cos(p * theta_i), sin(p * theta_i) at
        position p; rotary_dim <= D, features rotary_dim.. are passed through unchanged.
    interleaved: bool. False (GPT-NeoX, Llama): features i and i + rotary_dim / 2 form a pair; True (GPT-J):
        features 2i and 2i + 1. Each pair (a, b) becomes (a cos - b sin, a sin + b cos).
    inplace: bool, write the result into x and return x (x must not be a leaf that requires grad). The kernel
        writes a new tensor, which is then copied into x: one more pass over x than the out-of-place form.
    seqlen_offsets: int >= 0 or a (B,) int32/int64 tensor: token t of sequence b is at position
        seqlen_offsets[b] + t (a KV cache's length when decoding).
    cu_seqlens: (B + 1,) int32 offsets starting at 0, or None; max_seqlen: int >= the longest sequence
        (needed with cu_seqlens: it sizes the launch grid).

    Every position must lie in the table: checked (ValueError) for CPU tensors; on a GPU the values of
    seqlen_offsets and cu_seqlens are not read on the host (no sync), and the kernels clamp each position into
    the table instead. Returns a tensor of x's shape and dtype (x itself when inplace). Differentiable in x
    (cos and sin get no gradient, as flash-attn's).
    """
    fn = "mmkern.apply_rotary_emb"
    check_tensor(fn, "x", x)
    offsets, offset = None, 0
    if isinstance(seqlen_offsets, torch.Tensor):
        offsets = seqlen_offsets
    elif isinstance(seqlen_offsets, int) and not isinstance(seqlen_offsets, bool):
        offset = seqlen_offsets
    else:
        raise ValueError(f"{fn}: seqlen_offsets must be an int >= 0 or a (batch,) int32/int64 tensor; got "
                         f"{seqlen_offsets!r}")
    if cu_seqlens is not None and max_seqlen is None:
        raise ValueError(f"{fn}: max_seqlen is needed with cu_seqlens (an int >= the longest sequence); got None")
    out = eager.call(ops.rotary_embedding, x, cos, sin, offsets, cu_seqlens, offset,
                     0 if max_seqlen is None else max_seqlen, bool(interleaved), False)
    if inplace:
        return x.copy_(out)
    return out
