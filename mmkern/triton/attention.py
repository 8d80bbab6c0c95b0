"""Launchers of the Triton attention kernels: the `triton` backend of mmkern::attention_forward,
mmkern::attention_backward and mmkern::kvcache_append (inputs as in mmkern/ops/attention.py).

Tiles: one table per architecture family and pass (`_FORWARD_TILES`, `_BACKWARD_TILES`,
`_DECODE_TILES`), plus a few alternatives (`_FORWARD_ALTERNATIVES`, `_BACKWARD_ALTERNATIVES`) that
`triton.autotune` times against the table's entry on a GPU (key: head dim, causal/window,
GQA group, varlen, and the tensors' dtype); the interpreter takes the table's entry. Every
candidate fits its family's shared memory: `aot_configs()` yields them all, and
mmkern/triton/aot.py compiles each for its architectures (sm_80, sm_86, sm_90) and checks it.
Feature flags (softcap, ALiBi, masks, dropout, varlen) are constexprs: they change the code, not
the tiles, except that a forward with an attn_mask takes `masked_tiles` (its mask tile spilled).

Forward dispatch (`use_split_kv`): the split-KV decode kernels of attention_decode.py when
max_seqlen_q <= DECODE_MAX_QUERIES (16), there is no attn_mask and no dropout, no input requires
grad (the backward then runs from the normal forward's out and lse, as always), and
`decode_splits` gives at least two key splits; the normal forward otherwise.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from mmkern.triton._common import (FULL_REGISTER_FILE, INTERPRETING, dtype_reasons, kernel_options,
                                   set_kernel_options)
from mmkern.triton.attention_backward import (backward_delta_kernel, attention_dkdv_kernel, attention_dq_kernel,
                                              dropout_mask_kernel)
from mmkern.triton.attention_decode import merge_attention_splits_kernel, attention_decode_split_kernel
from mmkern.triton.attention_forward import attention_forward_kernel
from mmkern.triton.attention_scores import UNBOUNDED


# the large attention kernels: see FULL_REGISTER_FILE (ptxas's 32-register allocations)
set_kernel_options(FULL_REGISTER_FILE, attention_forward_kernel, attention_dq_kernel, attention_dkdv_kernel,
                   attention_decode_split_kernel)


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (arch family, BLOCK_D) -> tiles for the forward / dQ pass and for the dK dV pass.
# sm_80 (A100, 164 KB shared), sm_86/89 (~99 KB), sm_90 (H100/H200, 227 KB, wgmma from 64-row tiles).
_FORWARD_TILES = {
    "sm80": {16: Tiles(64, 64, 4, 3), 32: Tiles(64, 64, 4, 3), 64: Tiles(128, 64, 4, 3), 128: Tiles(128, 64, 8, 2),
             256: Tiles(64, 32, 4, 2)},
    "sm86": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(64, 64, 4, 2), 128: Tiles(64, 32, 4, 2),
             256: Tiles(64, 16, 4, 1)},
    "sm90": {16: Tiles(64, 64, 4, 3), 32: Tiles(64, 64, 4, 3), 64: Tiles(128, 64, 4, 3), 128: Tiles(128, 64, 8, 3),
             256: Tiles(64, 64, 4, 2)},
}
_BACKWARD_TILES = {
    "sm80": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(64, 64, 4, 2), 128: Tiles(64, 64, 8, 2),
             256: Tiles(32, 32, 4, 1)},
    "sm86": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(32, 64, 4, 2), 128: Tiles(32, 32, 4, 1),
             256: Tiles(16, 16, 4, 1)},
    "sm90": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(64, 64, 4, 2), 128: Tiles(64, 64, 8, 2),
             256: Tiles(64, 32, 8, 1)},
}
# Timed against the table's entry by triton.autotune on a GPU: Hopper, 16-bit, head dim 128 (the
# shape of the performance goal). Few on purpose: every candidate is an ahead-of-time compile.
_FORWARD_ALTERNATIVES = {"sm90": {128: Tiles(128, 128, 8, 2)}}
_BACKWARD_ALTERNATIVES = {"sm90": {128: Tiles(64, 128, 8, 2)}}
# Split-KV decode: BLOCK_M packs GQA group x query rows. sm_80/86: 16 rows (mma.sync's minimum);
# sm_90: 64 rows, the smallest wgmma tile (decode is bound by reading K/V, the padding is free).
# Head dims pad to at least 64 (decode_block_d: the padding is masked, never read, and it saves
# compiles). float32 halves BLOCK_N (decode_tiles).
_DECODE_TILES = {
    "sm80": {64: Tiles(16, 128, 4, 3), 128: Tiles(16, 64, 4, 3), 256: Tiles(16, 32, 4, 2)},
    "sm90": {64: Tiles(64, 128, 4, 3), 128: Tiles(64, 128, 4, 2), 256: Tiles(64, 64, 4, 2)},
}
_DECODE_TILES["sm86"] = _DECODE_TILES["sm80"]
DECODE_MAX_QUERIES = 16
ARCH_FAMILIES = {80: "sm80", 86: "sm86", 89: "sm86", 90: "sm90"}


def tiles_for(table: dict, family: str, bd: int, dtype: torch.dtype) -> Tiles:
    """float32 tiles take twice the shared memory of 16-bit ones: halve BLOCK_M for them."""
    tiles = table[family][bd]
    if dtype == torch.float32:
        tiles = tiles._replace(block_m=max(16, tiles.block_m // 2))
    return tiles


def candidates(table: dict, alternatives: dict, family: str, bd: int, dtype: torch.dtype) -> tuple[Tiles, ...]:
    """The table's tiles first (what the interpreter runs), then the alternatives autotune tries."""
    first = tiles_for(table, family, bd, dtype)
    extra = alternatives.get(family, {}).get(bd) if dtype != torch.float32 else None
    return (first,) if extra is None else (first, extra)


def masked_tiles(tiles: Tiles) -> Tiles:
    """Forward tiles when the kernel also reads an attn_mask tile: half the key block and 8 warps from 64 rows.

    The mask tile's (BLOCK_M, BLOCK_N) 64-bit addresses and values are live next to the score tile; with the
    table's tiles ptxas gave up on registers for it: bf16, head dim 64, sm_80, 128x64 with 4 warps went from
    255 registers / 140 B of spills without a mask to 32 registers / 16 KB with one (sm_90: 3-4 KB; head dim
    128, 8 warps: 10.6 KB). 128x32 with 8 warps: 0-8 B (head dim 64), 116-172 B (128), at the same arithmetic
    per key and less shared memory. mmkern aot-report shows every configuration."""
    return tiles._replace(block_n=max(16, tiles.block_n // 2),
                          num_warps=max(8, tiles.num_warps) if tiles.block_m >= 64 else tiles.num_warps)


def fp32_forward_tiles(tiles: Tiles, bd: int) -> Tiles:
    """float32 forward tiles from head dim 128: half the key block too, 8 warps. The float32 dots (ieee, FMA
    on the CUDA cores) keep the whole (BLOCK_M, BLOCK_D) fragments in registers; with BLOCK_N 64 ptxas fell
    into the same 32-register allocation as masks did: sm_80 head dim 128, 64x64 with 8 warps, 17 KB of spills
    with no feature on; 64x32: 0-44 B. Head dim 256: 32x32 with 4 warps 18.8 KB, 32x16 with 8 warps 0 B."""
    if bd < 128:
        return tiles
    return tiles._replace(block_n=max(16, tiles.block_n // 2), num_warps=8)


def forward_candidates(family: str, bd: int, dtype: torch.dtype, masked: bool) -> tuple[Tiles, ...]:
    """The forward's tiles: the table's and its autotune alternatives; float32 adjusted (fp32_forward_tiles);
    with a mask, masked_tiles of the table's alone (the alternatives are tuned for the unmasked performance
    goal, and each one is another compile)."""
    tiles = candidates(_FORWARD_TILES, _FORWARD_ALTERNATIVES, family, bd, dtype)
    if dtype == torch.float32:
        tiles = tuple(fp32_forward_tiles(t, bd) for t in tiles)
    return (masked_tiles(tiles[0]),) if masked else tiles


def decode_tiles(family: str, bd: int, dtype: torch.dtype, max_seqlen_k: int = 0) -> Tiles:
    """The table's decode tiles. Under the interpreter (no compile, no shared memory: tiles only
    change the speed) BLOCK_N also grows so a split walks at most 8 key tiles: 128k keys take
    seconds, not minutes; the GPU tables never see this."""
    tiles = _DECODE_TILES[family][max(64, bd)]
    if dtype == torch.float32:
        tiles = tiles._replace(block_n=tiles.block_n // 2)
    if INTERPRETING:
        tiles = tiles._replace(block_n=max(tiles.block_n, triton.next_power_of_2(triton.cdiv(max_seqlen_k, 32))))
    return tiles


def decode_block_d(head_dim: int) -> int:
    """At least 64 on a GPU (see _DECODE_TILES); the interpreter, where the padding only costs time,
    takes block_d as is."""
    return block_d(head_dim) if INTERPRETING else max(64, block_d(head_dim))


def arch_family(device: torch.device) -> str:
    if device.type != "cuda":        # the interpreter: any table works; use the A100 one
        return "sm80"
    major, minor = torch.cuda.get_device_capability(device)
    return ARCH_FAMILIES.get(major * 10 + minor, "sm90" if major >= 9 else ("sm86" if minor > 0 else "sm80"))


def block_d(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.dot's minimum); the padding is masked."""
    return max(16, triton.next_power_of_2(head_dim))


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


def forward_reasons(q, k, v, alibi_slopes=None, attn_mask=None, **_) -> list[str]:
    return dtype_reasons(q=q, k=k, v=v)


def backward_reasons(q, k, v, **_) -> list[str]:
    return dtype_reasons(q=q, k=k, v=v)


def kvcache_append_reasons(k_cache, v_cache, k, v, cache_seqlens) -> list[str]:
    return dtype_reasons(k_cache=k_cache, v_cache=v_cache)


# --------------------------------------------------------------------------- argument plumbing

class _Problem(NamedTuple):
    """Everything the kernels need besides the tensors being read and written."""
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seqlen_q: int
    seqlen_k: int
    max_seqlen_q: int
    max_seqlen_k: int
    varlen: bool


def _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k) -> _Problem:
    if cu_seqlens_q is not None:
        return _Problem(cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], q.shape[2], 0, 0, max_seqlen_q,
                        max_seqlen_k, True)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    return _Problem(B, H, k.shape[2], D, Lq, Lk, Lq, Lk, False)


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


def _feature_args(p: _Problem, q, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, causal, causal_bottom_right,
                  window_left, window_right, softcap, dropout_p, dropout_seed, softmax_scale):
    """Runtime scalars and constexpr flags shared by the three kernels."""
    dummy = q.new_empty((1,), dtype=torch.int32)
    right = 0 if causal else window_right
    scalars = dict(
        seqlen_q=p.seqlen_q, seqlen_k=p.seqlen_k, max_seqlen_q=max(p.max_seqlen_q, 1),
        max_seqlen_k=max(p.max_seqlen_k, 1), head_dim=p.head_dim, scale=softmax_scale, softcap=max(softcap, 1e-30),
        window_left=UNBOUNDED if window_left < 0 else window_left, window_right=UNBOUNDED if right < 0 else right,
        bottom_right=int(causal_bottom_right), dropout_p=dropout_p,
        seed=int(dropout_seed.reshape(-1)[0]) if dropout_p > 0 else 0)
    flags = dict(GROUP=p.heads // p.kv_heads, IS_VARLEN=p.varlen, HAS_SEQUSED=seqused_k is not None,
                 SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None, DROPOUT=dropout_p > 0,
                 FP32_DOT=q.dtype == torch.float32 or (INTERPRETING and q.dtype == torch.bfloat16))
    pointers = dict(CuSeqlensQ=cu_seqlens_q.int() if p.varlen else dummy,
                    CuSeqlensK=cu_seqlens_k.int() if p.varlen else dummy,
                    SequsedK=seqused_k.int() if seqused_k is not None else dummy,
                    Alibi=alibi_slopes if alibi_slopes is not None else q.new_empty((1,), dtype=torch.float32))
    alibi_batch_stride = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    return scalars, flags, pointers, alibi_batch_stride


# --------------------------------------------------------------------------- forward

def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
            causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
            dropout_seed, deterministic):
    p = _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = new_output(q.shape, q.dtype, q.device)
    lse_shape = (p.heads, q.shape[0]) if p.varlen else (p.batch, p.heads, p.seqlen_q)
    lse = new_output(lse_shape, torch.float32, q.device)
    if p.batch == 0 or p.heads == 0 or p.max_seqlen_q == 0:
        return out, lse
    scalars, flags, pointers, alibi_stride = _feature_args(
        p, q, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, causal, causal_bottom_right, window_left,
        window_right, softcap, dropout_p, dropout_seed, softmax_scale)
    bd = block_d(p.head_dim)
    family = arch_family(q.device)
    if use_split_kv(p, q, k, v, attn_mask, dropout_p):
        _decode(p, q, k, v, out, lse, scalars, flags, pointers, alibi_stride,
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

def decode_splits(p: _Problem, device: torch.device, tiles: Tiles) -> int:
    """How many key ranges the split-KV path cuts max_seqlen_k into (1 = use the normal forward).

    GPU: enough programs for two waves over the SMs, (batch * kv_heads * row chunks) * splits ~
    2 * SMs, with at least 4 key tiles per split (each split's partial output costs a write and a
    read), at most 128 splits. The interpreter has no SMs: a fixed min(4, key tiles), so small tests
    run several splits, some of them empty (short cache_seqlens, causal or window)."""
    blocks = triton.cdiv(p.max_seqlen_k, tiles.block_n)
    if device.type != "cuda":
        return min(4, blocks)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    programs = p.batch * p.kv_heads * triton.cdiv((p.heads // p.kv_heads) * p.max_seqlen_q, tiles.block_m)
    return max(1, min(triton.cdiv(2 * sms, programs), blocks // 4, 128))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def use_split_kv(p: _Problem, q, k, v, attn_mask, dropout_p) -> bool:
    """The documented dispatch rule (module docstring)."""
    if p.max_seqlen_q > DECODE_MAX_QUERIES or attn_mask is not None or dropout_p > 0:
        return False
    if q.requires_grad or k.requires_grad or v.requires_grad:
        return False
    tiles = decode_tiles(arch_family(q.device), decode_block_d(p.head_dim), q.dtype, p.max_seqlen_k)
    return decode_splits(p, q.device, tiles) >= 2


def _decode(p, q, k, v, out, lse, scalars, flags, pointers, alibi_stride, tiles: Tiles) -> None:
    """Split kernel into float32 partials (splits, rows, heads, head_dim) and (splits, rows, heads),
    then the merge kernel into out and lse."""
    num_splits = decode_splits(p, q.device, tiles)
    blocks = triton.cdiv(p.max_seqlen_k, tiles.block_n)
    split_len = triton.cdiv(blocks, num_splits) * tiles.block_n
    num_splits = triton.cdiv(p.max_seqlen_k, split_len)
    rows = q.shape[0] if p.varlen else p.batch * p.seqlen_q
    out_part = new_output((num_splits, rows, p.heads, p.head_dim), torch.float32, q.device)
    lse_part = new_output((num_splits, rows, p.heads), torch.float32, q.device)
    row_chunks = triton.cdiv((p.heads // p.kv_heads) * p.max_seqlen_q, tiles.block_m)
    attention_decode_split_kernel[(num_splits, p.batch * p.kv_heads, row_chunks)](
        q, k, v, out_part, lse_part, pointers["Alibi"], pointers["CuSeqlensQ"], pointers["CuSeqlensK"],
        pointers["SequsedK"], *_row_strides(q, p.varlen), *_row_strides(k, p.varlen), *_row_strides(v, p.varlen),
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        alibi_stride, p.seqlen_q, p.seqlen_k, p.heads, p.kv_heads, p.head_dim, split_len,
        scalars["scale"], scalars["softcap"], scalars["window_left"], scalars["window_right"],
        scalars["bottom_right"], GROUP=flags["GROUP"], IS_VARLEN=p.varlen, HAS_SEQUSED=flags["HAS_SEQUSED"],
        SOFTCAP=flags["SOFTCAP"], ALIBI=flags["ALIBI"], FP32_DOT=flags["FP32_DOT"], BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_D=decode_block_d(p.head_dim), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **kernel_options(attention_decode_split_kernel))
    lb, lh, lm = _lse_strides(lse, p.varlen)
    total = rows * p.heads
    merge_attention_splits_kernel[(triton.cdiv(total, _ROWWISE_BLOCK_R),)](
        out_part, lse_part, out, lse, out_part.stride(0), lse_part.stride(0), lb, lh, lm,
        rows if p.varlen else p.seqlen_q, total, p.heads, p.head_dim, num_splits,
        BLOCK_R=_ROWWISE_BLOCK_R, BLOCK_D=_ROWWISE_BLOCK_D, num_warps=4)


# (row, head) pairs per program and head-dim chunk of the row-wise kernels (decode merge, delta)
_ROWWISE_BLOCK_R = 16
_ROWWISE_BLOCK_D = 64


def _strides(name: str, t: torch.Tensor, varlen: bool) -> dict:
    rows = {"q": "m", "o": "m", "do": "m", "dq": "m"}.get(name, "n")
    b, r, h = _row_strides(t, varlen)
    return {f"stride_{name}b": b, f"stride_{name}{rows}": r, f"stride_{name}h": h}


# --------------------------------------------------------------------------- backward

def backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
             softmax_scale, causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask,
             dropout_p, dropout_seed, deterministic, attn_mask_needs_grad):
    """dq, dk, dv (and the float mask's gradient). Deterministic whatever `deterministic` says:
    neither kernel uses atomics, so the reduction order is fixed."""
    p = _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if seqused_k is not None:
        # cache rows past cache_seqlens belong to no program of the dK/dV kernel: their gradient is 0
        dk.zero_(), dv.zero_()
    mask_grad = attn_mask_needs_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    d_mask = torch.zeros(attn_mask.shape, dtype=attn_mask.dtype, device=q.device) if mask_grad \
        else q.new_empty((0,))
    if p.batch == 0 or p.heads == 0 or (p.max_seqlen_q == 0 and p.max_seqlen_k == 0):
        return dq.zero_(), dk.zero_(), dv.zero_(), d_mask
    lse = lse.contiguous()
    out = out.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = _delta(p, dout, out, lse, dlse)

    scalars, flags, pointers, alibi_stride = _feature_args(
        p, q, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, causal, causal_bottom_right, window_left,
        window_right, softcap, dropout_p, dropout_seed, softmax_scale)
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


def _delta(p: _Problem, dout, out, lse, dlse) -> torch.Tensor:
    """delta = rowsum(dO * O) - dlse, float32, laid out like lse (backward_delta_kernel)."""
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    rows = out.shape[0] if p.varlen else p.batch * p.seqlen_q
    total = rows * p.heads
    if total == 0:
        return delta
    dlse = dlse.float() if dlse is not None else None
    dl_strides = _lse_strides(dlse, p.varlen) if dlse is not None else (0, 0, 0)
    backward_delta_kernel[(triton.cdiv(total, _ROWWISE_BLOCK_R),)](
        dout, out, dlse if dlse is not None else delta, delta, *_row_strides(dout, p.varlen),
        *_lse_strides(delta, p.varlen), *dl_strides, rows if p.varlen else p.seqlen_q, total, p.heads,
        p.head_dim, HAS_DLSE=dlse is not None, BLOCK_R=_ROWWISE_BLOCK_R, BLOCK_D=_ROWWISE_BLOCK_D, num_warps=4)
    return delta


# --------------------------------------------------------------------------- KV cache and test path

def kvcache_append(k_cache, v_cache, k, v, cache_seqlens):
    """k_cache[b, cache_seqlens[b] + t] = k[b, t]: one indexed copy per cache, no host sync."""
    B, L_new = k.shape[0], k.shape[1]
    if B == 0 or L_new == 0:
        return
    batch = torch.arange(B, device=k.device).unsqueeze(1)
    positions = cache_seqlens.to(device=k.device, dtype=torch.long).unsqueeze(1) + torch.arange(L_new, device=k.device)
    k_cache[batch, positions] = k
    v_cache[batch, positions] = v


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


# --------------------------------------------------------------------------- ahead-of-time configurations

def aot_configs():
    """Every tile configuration the launchers can pick (the tables and the autotune alternatives),
    per architecture family and dtype, compiled with every feature on (the largest code; features
    change the code, not the tiles, except the mask: the forward compiles the table's tiles without one
    and masked_tiles with one): yields (kernel, signature, constexprs, warps, stages, archs)."""
    archs = {"sm80": (80,), "sm86": (86,), "sm90": (90,)}     # sm_89 shares sm_86's table and limit
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for family in archs:
        for bd in _FORWARD_TILES[family]:
            for name, dtype in dtypes.items():
                for masked in (False, True):     # without a mask: every other feature on; with one: all on
                    for tiles in forward_candidates(family, bd, dtype, masked):
                        yield (attention_forward_kernel, _signature(attention_forward_kernel, name),
                               dict(_constexprs(bd, tiles, name), MASK_KIND=2 if masked else 0), tiles.num_warps,
                               tiles.num_stages, archs[family])
                for tiles in candidates(_BACKWARD_TILES, _BACKWARD_ALTERNATIVES, family, bd, dtype):
                    constexprs = _constexprs(bd, tiles, name)
                    yield (attention_dq_kernel, _signature(attention_dq_kernel, name), constexprs,
                           tiles.num_warps, tiles.num_stages, archs[family])
                    yield (attention_dkdv_kernel, _signature(attention_dkdv_kernel, name),
                           dict(constexprs, MASK_GRAD=True), tiles.num_warps, tiles.num_stages, archs[family])
    # split-KV decode: sm_80 and sm_86 share a table (compiled for both limits), sm_90 its own
    for family, family_archs in (("sm80", (80, 86)), ("sm90", (90,))):
        for bd in _DECODE_TILES[family]:
            for name, dtype in dtypes.items():
                tiles = decode_tiles(family, bd, dtype)
                yield (attention_decode_split_kernel, _signature(attention_decode_split_kernel, name),
                       dict(GROUP=2, IS_VARLEN=False, HAS_SEQUSED=True, SOFTCAP=True, ALIBI=True,
                            FP32_DOT=name == "fp32", BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=bd),
                       tiles.num_warps, tiles.num_stages, family_archs)
    # the row-wise kernels: one compile per dtype serves every head dim and architecture table
    for name in dtypes:
        rowwise = dict(BLOCK_R=_ROWWISE_BLOCK_R, BLOCK_D=_ROWWISE_BLOCK_D)
        yield (merge_attention_splits_kernel, _signature(merge_attention_splits_kernel, name), rowwise, 4, 1,
               (80, 90))
        yield (backward_delta_kernel, _signature(backward_delta_kernel, name), dict(rowwise, HAS_DLSE=True), 4, 1,
               (80, 90))


def _constexprs(bd, tiles, dtype):
    return dict(GROUP=2, IS_VARLEN=False, HAS_SEQUSED=False, SOFTCAP=True, ALIBI=True, MASK_KIND=2, DROPOUT=True,
                FP32_DOT=dtype == "fp32",
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=bd)


_SCALARS = {"seqlen_q": "i32", "seqlen_k": "i32", "max_seqlen_q": "i32", "max_seqlen_k": "i32", "num_heads": "i32",
            "num_kv_heads": "i32", "head_dim": "i32", "scale": "fp32", "softcap": "fp32", "window_left": "i32",
            "window_right": "i32", "bottom_right": "i32", "dropout_p": "fp32", "seed": "i64", "split_len": "i32",
            "rows_per_batch": "i32", "total": "i32", "num_splits": "i32"}
_FP32_POINTERS = ("Lse", "Delta", "Alibi", "OutPart", "LsePart", "DLse")
_INT_POINTERS = ("CuSeqlensQ", "CuSeqlensK", "SequsedK")


def _signature(kernel, dtype: str) -> dict:
    """Triton signature of a kernel for `dtype` data: pointers, i32 strides and the runtime scalars
    (constexprs are left to aot.compile_config)."""
    constexprs = {kernel.arg_names[i] for i in kernel.constexprs}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in _SCALARS:
            sig[name] = _SCALARS[name]
        elif name.startswith("stride_"):
            sig[name] = "i32"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _INT_POINTERS:
            sig[name] = "*i32"
        else:
            sig[name] = f"*{dtype}"          # Q, K, V, Out, DO, DQ, DK, DV, Mask, DMask
    return sig
