"""Launchers of the Triton attention kernels: the `triton` backend of mmkern::attention_forward,
mmkern::attention_backward and mmkern::kvcache_append (inputs as in mmkern/ops/attention.py).

Tile sizes come from `tile_config(arch, block_d, pass)`: one table per architecture family,
chosen so that every entry fits that family's shared memory (checked ahead of time for sm_80,
sm_86 and sm_90 by mmkern/triton/aot.py). Feature flags (softcap, ALiBi, masks, dropout, varlen)
are constexprs: they change the code, not the tiles.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from mmkern.triton._common import INTERPRETING, dtype_reasons
from mmkern.triton.attention_backward import attention_dkdv_kernel, attention_dq_kernel, dropout_mask_kernel
from mmkern.triton.attention_forward import attention_forward_kernel
from mmkern.triton.attention_scores import UNBOUNDED


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
ARCH_FAMILIES = {80: "sm80", 86: "sm86", 89: "sm86", 90: "sm90"}


def tiles_for(table: dict, family: str, bd: int, dtype: torch.dtype) -> Tiles:
    """float32 tiles take twice the shared memory of 16-bit ones: halve BLOCK_M for them."""
    tiles = table[family][bd]
    if dtype == torch.float32:
        tiles = tiles._replace(block_m=max(16, tiles.block_m // 2))
    return tiles


def arch_family(device: torch.device) -> str:
    if device.type != "cuda":        # the interpreter: any table works; use the A100 one
        return "sm80"
    major, minor = torch.cuda.get_device_capability(device)
    return ARCH_FAMILIES.get(major * 10 + minor, "sm90" if major >= 9 else ("sm86" if minor > 0 else "sm80"))


def block_d(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.dot's minimum); the padding is masked."""
    return max(16, triton.next_power_of_2(head_dim))


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
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (p.heads, q.shape[0]) if p.varlen else (p.batch, p.heads, p.seqlen_q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if p.batch == 0 or p.heads == 0 or p.max_seqlen_q == 0:
        return out, lse
    scalars, flags, pointers, alibi_stride = _feature_args(
        p, q, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, causal, causal_bottom_right, window_left,
        window_right, softcap, dropout_p, dropout_seed, softmax_scale)
    mask_kind, mask_strides = _mask_args(attn_mask)
    bd = block_d(p.head_dim)
    tiles = tiles_for(_FORWARD_TILES, arch_family(q.device), bd, q.dtype)
    grid = (triton.cdiv(p.max_seqlen_q, tiles.block_m), p.batch * p.heads)
    attention_forward_kernel[grid](
        q, k, v, out, lse, attn_mask if attn_mask is not None else q, **pointers,
        **_strides("q", q, p.varlen), **_strides("k", k, p.varlen), **_strides("v", v, p.varlen),
        **_strides("o", out, p.varlen), **dict(zip(("stride_lb", "stride_lh", "stride_lm"), _lse_strides(lse, p.varlen))),
        **dict(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), mask_strides)), stride_ab=alibi_stride,
        num_heads=p.heads, **scalars, **flags, MASK_KIND=mask_kind, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=bd, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out, lse


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
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask_grad = attn_mask_needs_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    d_mask = torch.zeros(attn_mask.shape, dtype=attn_mask.dtype, device=q.device) if mask_grad \
        else q.new_empty((0,))
    if p.batch == 0 or p.heads == 0 or (p.max_seqlen_q == 0 and p.max_seqlen_k == 0):
        return dq.zero_(), dk.zero_(), dv.zero_(), d_mask
    # delta = rowsum(dO * O) - dlse, laid out like lse. One fused read of dO and O in float32.
    delta = (dout.float() * out.float()).sum(-1)
    delta = delta.transpose(0, 1) if p.varlen else delta.transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse
    delta = delta.contiguous()
    lse = lse.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()

    scalars, flags, pointers, alibi_stride = _feature_args(
        p, q, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, causal, causal_bottom_right, window_left,
        window_right, softcap, dropout_p, dropout_seed, softmax_scale)
    mask_kind, mask_strides = _mask_args(attn_mask)
    dmask_strides = tuple(d_mask.stride()) if mask_grad else (0, 0, 0, 0)
    bd = block_d(p.head_dim)
    tiles = tiles_for(_BACKWARD_TILES, arch_family(q.device), bd, q.dtype)
    common = dict(**_strides("q", q, p.varlen), **_strides("k", k, p.varlen), **_strides("v", v, p.varlen),
                  **_strides("do", dout, p.varlen),
                  **dict(zip(("stride_lb", "stride_lh", "stride_lm"), _lse_strides(lse, p.varlen))),
                  **dict(zip(("stride_mb", "stride_mh", "stride_mm", "stride_mn"), mask_strides)),
                  stride_ab=alibi_stride, num_heads=p.heads, **scalars, **flags, MASK_KIND=mask_kind,
                  BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=bd, num_warps=tiles.num_warps,
                  num_stages=tiles.num_stages)
    mask_arg = attn_mask if attn_mask is not None else q
    if p.max_seqlen_k > 0:
        grid = (triton.cdiv(p.max_seqlen_k, tiles.block_n), p.batch * p.kv_heads)
        attention_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, mask_arg, d_mask if mask_grad else q, **pointers,
            **_strides("dk", dk, p.varlen), **_strides("dv", dv, p.varlen),
            **dict(zip(("stride_dmb", "stride_dmh", "stride_dmm", "stride_dmn"), dmask_strides)),
            num_kv_heads=p.kv_heads, MASK_GRAD=mask_grad, **common)
    else:
        dk.zero_(), dv.zero_()
    if p.max_seqlen_q > 0:
        grid = (triton.cdiv(p.max_seqlen_q, tiles.block_m), p.batch * p.heads)
        attention_dq_kernel[grid](q, k, v, dout, lse, delta, dq, mask_arg, **pointers,
                                  **_strides("dq", dq, p.varlen), **common)
    return dq, dk, dv, d_mask


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
    """Every tile configuration the launchers can pick, per architecture family and dtype, compiled
    with every feature on (the largest code; features change the code, not the tiles):
    yields (kernel, signature, constexprs, warps, stages, archs)."""
    archs = {"sm80": (80,), "sm86": (86,), "sm90": (90,)}     # sm_89 shares sm_86's table and limit
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for family in archs:
        for bd in _FORWARD_TILES[family]:
            for name, dtype in dtypes.items():
                tiles = tiles_for(_FORWARD_TILES, family, bd, dtype)
                yield (attention_forward_kernel, _signature(attention_forward_kernel, name),
                       _constexprs(bd, tiles, name), tiles.num_warps, tiles.num_stages, archs[family])
                tiles = tiles_for(_BACKWARD_TILES, family, bd, dtype)
                constexprs = _constexprs(bd, tiles, name)
                yield (attention_dq_kernel, _signature(attention_dq_kernel, name), constexprs,
                       tiles.num_warps, tiles.num_stages, archs[family])
                yield (attention_dkdv_kernel, _signature(attention_dkdv_kernel, name), dict(constexprs, MASK_GRAD=True),
                       tiles.num_warps, tiles.num_stages, archs[family])


def _constexprs(bd, tiles, dtype):
    return dict(GROUP=2, IS_VARLEN=False, HAS_SEQUSED=False, SOFTCAP=True, ALIBI=True, MASK_KIND=2, DROPOUT=True,
                FP32_DOT=dtype == "fp32",
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=bd)


_SCALARS = {"seqlen_q": "i32", "seqlen_k": "i32", "max_seqlen_q": "i32", "max_seqlen_k": "i32", "num_heads": "i32",
            "num_kv_heads": "i32", "head_dim": "i32", "scale": "fp32", "softcap": "fp32", "window_left": "i32",
            "window_right": "i32", "bottom_right": "i32", "dropout_p": "fp32", "seed": "i64"}
_FP32_POINTERS = ("Lse", "Delta", "Alibi")
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
