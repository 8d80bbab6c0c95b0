"""Triton kernel of mmkern::rotary_embedding: one launch reads x once and writes out once.

Grid (cdiv(seqlen, BLOCK_T), cdiv(D, BLOCK_D), B * H): a program owns BLOCK_T tokens x BLOCK_D features of one
(sequence, head). Each feature j < rd is one half of a pair and needs its partner's value:
    interleaved (GPT-J):  pairs (2i, 2i + 1):      partner j ^ 1,                    table column j // 2
    GPT-NeoX:             pairs (i, i + rd / 2):   partner j + rd / 2 or j - rd / 2, table column j mod rd / 2
    out_j = x_j * c - x_partner * s   for the first of a pair,   x_j * c + x_partner * s   for the second,
with (c, s) = (cos, sin)[position, column] and s negated when conjugate (the backward). The partner is loaded
through its own pointers (it may lie in another program's feature block: the second load hits the cache);
features rd.. are copied. Math in float32 whatever x's dtype.
Memory traffic: x read once (plus the cached partner reads) and out written once, 2 x numel x itemsize bytes,
plus the table rows (seqlen x rd x 4 bytes, shared by the heads through the cache).
Positions (offset + t) are clamped into the table: GPU offsets are not checked on the host (no sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkern.triton._common import TRITON_POINTER, dtype_reasons

BLOCK_T = 32
BLOCK_D = 64
NUM_WARPS = 4


@triton.jit
def rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, offsets_ptr, cu_seqlens_ptr,
                  seqlen, heads, head_dim, half_rd, seqlen_ro, seqlen_offset, sin_sign,
                  stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh,
                  INTERLEAVED: tl.constexpr, VARLEN: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(2)
    b, h = bh // heads, bh % heads
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)             # token within its sequence
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)             # feature
    if VARLEN:      # sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1 of x (total, H, D)
        start = tl.load(cu_seqlens_ptr + b)
        length = tl.load(cu_seqlens_ptr + b + 1) - start
        x_row = x_ptr + (start + t).to(tl.int64)[:, None] * stride_xt
        o_row = out_ptr + (start + t).to(tl.int64)[:, None] * stride_ot
    else:
        length = seqlen
        x_row = x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64)[:, None] * stride_xt
        o_row = out_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64)[:, None] * stride_ot
    x_row += h * stride_xh
    o_row += h * stride_oh
    if HAS_OFFSETS:
        offset = tl.load(offsets_ptr + b).to(tl.int32)
    else:
        offset = seqlen_offset
    position = tl.minimum(tl.maximum(t + offset, 0), seqlen_ro - 1)    # (BLOCK_T,)

    rd = 2 * half_rd
    in_rows = (t < length)[:, None]
    in_cols = j < head_dim
    rotated = j < rd
    if INTERLEAVED:
        partner = j ^ 1
        column = j // 2
        is_first = (j % 2) == 0
    else:
        partner = tl.where(j < half_rd, j + half_rd, j - half_rd)
        column = tl.where(j < half_rd, j, j - half_rd)
        is_first = j < half_rd
    mask = in_rows & in_cols[None, :]
    x = tl.load(x_row + j[None, :], mask=mask, other=0.0).to(tl.float32)
    pair_mask = in_rows & rotated[None, :]
    x_partner = tl.load(x_row + partner[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    table = position[:, None] * half_rd + column[None, :]
    c = tl.load(cos_ptr + table, mask=pair_mask, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=pair_mask, other=0.0).to(tl.float32) * sin_sign
    s = tl.where(is_first[None, :], -s, s)
    out = tl.where(rotated[None, :], x * c + x_partner * s, x)
    tl.store(o_row + j[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def rotary_embedding_reasons(p) -> list[str]:
    reasons = dtype_reasons(x=p.x, cos=p.cos)
    if p.x.numel() and p.batch * p.x.shape[-2] > 65535:
        reasons.append(f"batch x heads = {p.batch * p.x.shape[-2]} exceeds the grid's 65535 programs on axis 2")
    return reasons


def rotary_embedding(p) -> torch.Tensor:
    x = p.x if p.x.stride(-1) == 1 else p.x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0 or p.seqlen == 0:
        return out
    # a (B, L, H, D) view of the varlen (total, H, D) tensors: stride over sequences unused (cu_seqlens gives rows)
    x4, o4 = (x.unsqueeze(0), out.unsqueeze(0)) if p.varlen else (x, out)
    heads, head_dim = x.shape[-2], x.shape[-1]
    offsets = p.seqlen_offsets if p.seqlen_offsets is not None else p.cos       # unused pointer when absent
    cu_seqlens = p.cu_seqlens if p.varlen else p.cos
    cos, sin = p.cos.contiguous(), p.sin.contiguous()
    grid = (triton.cdiv(p.seqlen, BLOCK_T), triton.cdiv(head_dim, BLOCK_D), p.batch * heads)
    rotary_kernel[grid](x4, o4, cos, sin, offsets, cu_seqlens, p.seqlen, heads, head_dim, p.rotary_dim // 2,
                        cos.shape[0], p.seqlen_offset, -1.0 if p.conjugate else 1.0,
                        x4.stride(0), x4.stride(1), x4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
                        INTERLEAVED=p.interleaved, VARLEN=p.varlen, HAS_OFFSETS=p.seqlen_offsets is not None,
                        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


def aot_configs():
    """Every configuration the dispatcher can launch, for the ahead-of-time compile check."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for dtype in dtypes:
        for table_dtype in sorted({dtype, torch.float32}, key=str):
            for interleaved in (False, True):
                for varlen in (False, True):
                    for offsets in (None, torch.int32, torch.int64):
                        table = TRITON_POINTER[table_dtype]
                        signature = {"x_ptr": TRITON_POINTER[dtype], "out_ptr": TRITON_POINTER[dtype],
                                     "cos_ptr": table, "sin_ptr": table,
                                     "offsets_ptr": TRITON_POINTER[offsets] if offsets else table,
                                     "cu_seqlens_ptr": "*i32" if varlen else table,
                                     "seqlen": "i32", "heads": "i32", "head_dim": "i32", "half_rd": "i32",
                                     "seqlen_ro": "i32", "seqlen_offset": "i32", "sin_sign": "fp32",
                                     **{f"stride_{n}": "i32" for n in ("xb", "xt", "xh", "ob", "ot", "oh")}}
                        constexprs = dict(INTERLEAVED=interleaved, VARLEN=varlen, HAS_OFFSETS=offsets is not None,
                                          BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
                        yield rotary_kernel, signature, constexprs, NUM_WARPS, 1
