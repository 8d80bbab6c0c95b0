"""The `triton` backend of mmkern::attention_forward and mmkern::attention_backward: reasons, launches.

Every function takes the op's AttentionProblem (mmkern/ops/attention_problem.py). The pieces around it:
- attention_forward.py, attention_backward.py, attention_decode.py, attention_scores.py: the kernels;
- attention_tiles.py: the tile tables per architecture, and the autotune alternatives `_launch` times;
- attention_split_kv.py: when the forward takes the split-KV decode path and into how many key ranges;
- attention_aot.py: every configuration and signature, for the ahead-of-time compiles (aot.py).
(kvcache_append, a pure-torch indexed copy, is mmkern/torch_backend/kvcache.py; this backend registers it.)
"""
from __future__ import annotations

import torch
import triton

from mmkern.triton._common import (FULL_REGISTER_FILE, INTERPRETING, dtype_reasons, kernel_options,
                                   set_kernel_options)
from mmkern.triton.attention_backward import (backward_delta_kernel, attention_dkdv_kernel, attention_dq_kernel,
                                              dropout_mask_kernel)
from mmkern.triton.attention_decode import merge_attention_splits_kernel, attention_decode_split_kernel
from mmkern.triton.attention_forward import attention_forward_kernel
from mmkern.triton.attention_scores import UNBOUNDED
from mmkern.triton.attention_split_kv import decode_splits, use_split_kv
from mmkern.triton.attention_tiles import (_BACKWARD_ALTERNATIVES, _BACKWARD_TILES, Tiles, arch_family, block_d,
                                           candidates, decode_block_d, decode_tiles, forward_candidates)


# the large attention kernels: see FULL_REGISTER_FILE (ptxas's 32-register allocations)
set_kernel_options(FULL_REGISTER_FILE, attention_forward_kernel, attention_dq_kernel, attention_dkdv_kernel,
                   attention_decode_split_kernel)


# Outputs are allocated here; tests replace this with a NaN-filled allocation (poison) to prove that
# every element is written.
def new_output(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


# Autotuned wrappers, one per (kernel, candidate tiles): the candidates depend on arch, head dim, dtype.
_TUNE_KEY = ["head_dim", "window_right", "GROUP", "IS_VARLEN"]
_TUNED: dict = {}


def _launch(kernel, tiles: tuple[Tiles, ...], grid, **args) -> None:
    """Runs `kernel` with the first candidate under the interpreter or when there is one, else
    through triton.autotune over all of them. grid(meta) gets BLOCK_M/BLOCK_N from meta."""
    if INTERPRETING or len(tiles) == 1:
        t = tiles[0]
        meta = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n)
        kernel[grid(meta)](**args, **meta, num_warps=t.num_warps, num_stages=t.num_stages, **kernel_options(kernel))
        return
    tuned = _TUNED.get((kernel, tiles))
    if tuned is None:
        configs = [triton.Config(dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n), num_warps=t.num_warps,
                                 num_stages=t.num_stages, **kernel_options(kernel)) for t in tiles]
        tuned = _TUNED[(kernel, tiles)] = triton.autotune(configs=configs, key=_TUNE_KEY)(kernel)
    tuned[grid](**args)


def forward_reasons(p) -> list[str]:
    return dtype_reasons(q=p.q, k=p.k, v=p.v)


def backward_reasons(p) -> list[str]:
    return dtype_reasons(q=p.q, k=p.k, v=p.v)


def kvcache_append_reasons(p) -> list[str]:
    return dtype_reasons(k_cache=p.k_cache, v_cache=p.v_cache)


# --------------------------------------------------------------------------- argument plumbing

def _row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides of a (B, L, H, D) or packed (T, H, D) tensor (batch stride 0)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of lse: (B, H, Lq) dense or (H, total_q) varlen."""
    return (0, lse.stride(0), lse.stride(1)) if varlen else (lse.stride(0), lse.stride(1), lse.stride(2))


def _mask_args(attn_mask):
    if attn_mask is None:
        return 0, (0, 0, 0, 0)
    return (1 if attn_mask.dtype == torch.bool else 2), tuple(attn_mask.stride())


def _feature_args(p):
    """Runtime scalars and constexpr flags shared by the kernels, and the optional inputs' pointers."""
    q = p.q
    dummy = q.new_empty((1,), dtype=torch.int32)
    scalars = dict(
        seqlen_q=p.seqlen_q, seqlen_k=p.seqlen_k, max_seqlen_q=max(p.max_seqlen_q, 1),
        max_seqlen_k=max(p.max_seqlen_k, 1), head_dim=p.head_dim, scale=p.softmax_scale,
        softcap=max(p.softcap, 1e-30), window_left=UNBOUNDED if p.left < 0 else p.left,
        window_right=UNBOUNDED if p.right < 0 else p.right, bottom_right=int(p.causal_bottom_right),
        dropout_p=p.dropout_p, seed=int(p.dropout_seed.reshape(-1)[0]) if p.dropout_p > 0 else 0)
    flags = dict(GROUP=p.group, IS_VARLEN=p.varlen, HAS_SEQUSED=p.seqused_k is not None,
                 SOFTCAP=p.softcap > 0, ALIBI=p.alibi_slopes is not None, DROPOUT=p.dropout_p > 0,
                 FP32_DOT=q.dtype == torch.float32 or (INTERPRETING and q.dtype == torch.bfloat16))
    pointers = dict(CuSeqlensQ=p.cu_seqlens_q.int() if p.varlen else dummy,
                    CuSeqlensK=p.cu_seqlens_k.int() if p.varlen else dummy,
                    SequsedK=p.seqused_k.int() if p.seqused_k is not None else dummy,
                    Alibi=p.alibi_slopes if p.alibi_slopes is not None else q.new_empty((1,), dtype=torch.float32))
    alibi = p.alibi_slopes
    alibi_batch_stride = alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0
    return scalars, flags, pointers, alibi_batch_stride


# --------------------------------------------------------------------------- forward

def forward(p):
    """(out like q, lse float32 in p.lse_shape); the split-KV decode path when use_split_kv(p)."""
    q, k, v, attn_mask = p.q, p.k, p.v, p.attn_mask
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output(p.lse_shape, torch.float32, q.device)
    if p.batch == 0 or p.heads == 0 or p.max_seqlen_q == 0:
        return out, lse
    scalars, flags, pointers, alibi_stride = _feature_args(p)
    bd = block_d(p.head_dim)
    family = arch_family(q.device)
    if use_split_kv(p):
        _decode(p, out, lse, scalars, flags, pointers, alibi_stride,
                decode_tiles(family, decode_block_d(p.head_dim), q.dtype, p.max_seqlen_k))
        return out, lse
    mask_kind, mask_strides = _mask_args(attn_mask)
    tiles = forward_candidates(family, bd, q.dtype, masked=attn_mask is not None)
    _launch(attention_forward_kernel, tiles, lambda meta: (triton.cdiv(p.max_seqlen_q, meta["BLOCK_M"]),
                                                           p.batch * p.heads),
            Q=q, K=k, V=v, Out=out, Lse=lse, Mask=attn_mask if attn_mask is not None else q, **pointers,
            **_strides("q", q, p.varlen), **_strides("k", k, p.varlen), **_strides("v", v, p.varlen),
            **_strides("o", out, p.varlen),
            **dict(zip(("stride_lb", "stride_lh", "stride_lm"), _lse_strides(lse, p.varlen))),
            **dict(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), mask_strides)), stride_ab=alibi_stride,
            num_heads=p.heads, **scalars, **flags, MASK_KIND=mask_kind, BLOCK_D=bd)
    return out, lse


# --------------------------------------------------------------------------- split-KV decode

def _decode(p, out, lse, scalars, flags, pointers, alibi_stride, tiles: Tiles) -> None:
    """Split kernel into float32 partials (splits, rows, heads, head_dim) and (splits, rows, heads),
    then the merge kernel into out and lse (attention_split_kv.py decides when and how many splits)."""
    q, k, v = p.q, p.k, p.v
    if p.max_seqlen_k == 0:                    # no key at all (an empty paged table): every row sees nothing
        out.zero_(), lse.fill_(float("-inf"))
        return
    num_splits = decode_splits(p, q.device, tiles)
    blocks = triton.cdiv(p.max_seqlen_k, tiles.block_n)
    split_len = triton.cdiv(blocks, num_splits) * tiles.block_n
    num_splits = triton.cdiv(p.max_seqlen_k, split_len)
    rows = q.shape[0] if p.varlen else p.batch * p.seqlen_q
    table = p.block_table
    out_part = new_output((num_splits, rows, p.heads, p.head_dim), torch.float32, q.device)
    lse_part = new_output((num_splits, rows, p.heads), torch.float32, q.device)
    row_chunks = triton.cdiv((p.heads // p.kv_heads) * p.max_seqlen_q, tiles.block_m)
    attention_decode_split_kernel[(num_splits, p.batch * p.kv_heads, row_chunks)](
        q, k, v, out_part, lse_part, pointers["Alibi"], pointers["CuSeqlensQ"], pointers["CuSeqlensK"],
        pointers["SequsedK"], table if p.paged else pointers["SequsedK"],
        p.leftpad_k.int() if p.leftpad_k is not None else pointers["SequsedK"],
        *_row_strides(q, p.varlen), *_row_strides(k, p.varlen), *_row_strides(v, p.varlen),
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        alibi_stride, table.stride(0) if p.paged else 0, p.seqlen_q, p.seqlen_k, p.heads, p.kv_heads, p.head_dim,
        split_len, max(p.page_size, 1), max(k.shape[0], 1), max(table.shape[1], 1) if p.paged else 1,
        scalars["scale"], scalars["softcap"], scalars["window_left"], scalars["window_right"],
        scalars["bottom_right"], GROUP=flags["GROUP"], IS_VARLEN=p.varlen, HAS_SEQUSED=flags["HAS_SEQUSED"],
        SOFTCAP=flags["SOFTCAP"], ALIBI=flags["ALIBI"], FP32_DOT=flags["FP32_DOT"], PAGED=p.paged,
        HAS_LEFTPAD=p.leftpad_k is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_D=decode_block_d(p.head_dim), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **kernel_options(attention_decode_split_kernel))
    lb, lh, lm = _lse_strides(lse, p.varlen)
    total = rows * p.heads
    merge_attention_splits_kernel[(triton.cdiv(total, ROWWISE_BLOCK_R),)](
        out_part, lse_part, out, lse, out_part.stride(0), lse_part.stride(0), lb, lh, lm,
        rows if p.varlen else p.seqlen_q, total, p.heads, p.head_dim, num_splits,
        BLOCK_R=ROWWISE_BLOCK_R, BLOCK_D=ROWWISE_BLOCK_D, num_warps=4)


# (row, head) pairs per program and head-dim chunk of the row-wise kernels (decode merge, delta)
ROWWISE_BLOCK_R = 16
ROWWISE_BLOCK_D = 64


def _strides(name: str, t: torch.Tensor, varlen: bool) -> dict:
    rows = {"q": "m", "o": "m", "do": "m", "dq": "m"}.get(name, "n")
    b, r, h = _row_strides(t, varlen)
    return {f"stride_{name}b": b, f"stride_{name}{rows}": r, f"stride_{name}h": h}


# --------------------------------------------------------------------------- backward

def backward(p):
    """dq, dk, dv (and the float mask's gradient). Deterministic whatever `deterministic` says:
    neither kernel uses atomics, so the reduction order is fixed."""
    q, k, v, dout, out, lse, dlse, attn_mask = p.q, p.k, p.v, p.dout, p.out, p.lse, p.dlse, p.attn_mask
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if p.seqused_k is not None:
        # cache rows past cache_seqlens belong to no program of the dK/dV kernel: their gradient is 0
        dk.zero_(), dv.zero_()
    mask_grad = p.attn_mask_needs_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    d_mask = torch.zeros(attn_mask.shape, dtype=attn_mask.dtype, device=q.device) if mask_grad \
        else q.new_empty((0,))
    if p.batch == 0 or p.heads == 0 or (p.max_seqlen_q == 0 and p.max_seqlen_k == 0):
        return dq.zero_(), dk.zero_(), dv.zero_(), d_mask
    lse = lse.contiguous()
    out = out.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = _delta(p, dout, out, lse, dlse)

    scalars, flags, pointers, alibi_stride = _feature_args(p)
    mask_kind, mask_strides = _mask_args(attn_mask)
    dmask_strides = tuple(d_mask.stride()) if mask_grad else (0, 0, 0, 0)
    bd = block_d(p.head_dim)
    tiles = candidates(_BACKWARD_TILES, _BACKWARD_ALTERNATIVES, arch_family(q.device), bd, q.dtype)
    common = dict(Q=q, K=k, V=v, DO=dout, Lse=lse, Delta=delta, Mask=attn_mask if attn_mask is not None else q,
                  **pointers, **_strides("q", q, p.varlen), **_strides("k", k, p.varlen),
                  **_strides("v", v, p.varlen), **_strides("do", dout, p.varlen),
                  **dict(zip(("stride_lb", "stride_lh", "stride_lm"), _lse_strides(lse, p.varlen))),
                  **dict(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), mask_strides)),
                  stride_ab=alibi_stride, num_heads=p.heads, **scalars, **flags, MASK_KIND=mask_kind, BLOCK_D=bd)
    if p.max_seqlen_k > 0:
        _launch(attention_dkdv_kernel, tiles, lambda meta: (triton.cdiv(p.max_seqlen_k, meta["BLOCK_N"]),
                                                            p.batch * p.kv_heads),
                DK=dk, DV=dv, DMask=d_mask if mask_grad else q,
                **_strides("dk", dk, p.varlen), **_strides("dv", dv, p.varlen),
                **dict(zip(("stride_dmb", "stride_dmh", "stride_dmm", "stride_dmn"), dmask_strides)),
                num_kv_heads=p.kv_heads, MASK_GRAD=mask_grad, **common)
    else:
        dk.zero_(), dv.zero_()
    if p.max_seqlen_q > 0:
        _launch(attention_dq_kernel, tiles, lambda meta: (triton.cdiv(p.max_seqlen_q, meta["BLOCK_M"]),
                                                          p.batch * p.heads),
                DQ=dq, **_strides("dq", dq, p.varlen), **common)
    else:
        dq.zero_()
    return dq, dk, dv, d_mask


def _delta(p, dout, out, lse, dlse) -> torch.Tensor:
    """delta = rowsum(dO * O) - dlse, float32, laid out like lse (backward_delta_kernel)."""
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    rows = out.shape[0] if p.varlen else p.batch * p.seqlen_q
    total = rows * p.heads
    if total == 0:
        return delta
    dlse = dlse.float() if dlse is not None else None
    dl_strides = _lse_strides(dlse, p.varlen) if dlse is not None else (0, 0, 0)
    backward_delta_kernel[(triton.cdiv(total, ROWWISE_BLOCK_R),)](
        dout, out, dlse if dlse is not None else delta, delta, *_row_strides(dout, p.varlen),
        *_lse_strides(delta, p.varlen), *dl_strides, rows if p.varlen else p.seqlen_q, total, p.heads,
        p.head_dim, HAS_DLSE=dlse is not None, BLOCK_R=ROWWISE_BLOCK_R, BLOCK_D=ROWWISE_BLOCK_D, num_warps=4)
    return delta


# --------------------------------------------------------------------------- test path

def dropout_mask(dropout_seed: torch.Tensor, batch: int, heads: int, max_seqlen_q: int, max_seqlen_k: int,
                 dropout_p: float, device) -> torch.Tensor:
    """The keep mask (B, H, max_seqlen_q, max_seqlen_k) the kernels draw for this seed (for tests).
    Varlen: sequence b's (i, j) entry sits at [b, h, i, j] (positions within the sequence)."""
    keep = torch.empty((batch, heads, max_seqlen_q, max_seqlen_k), dtype=torch.bool, device=device)
    if keep.numel():
        grid = (triton.cdiv(max_seqlen_q, 32), triton.cdiv(max_seqlen_k, 32), batch * heads)
        dropout_mask_kernel[grid](keep, int(dropout_seed.reshape(-1)[0]), max_seqlen_q, max_seqlen_k, dropout_p,
                                  BLOCK_M=32, BLOCK_N=32)
    return keep


