"""Attention as torch ops: mmkern::attention_forward, mmkern::attention_backward, mmkern::kvcache_append.

One forward/backward pair serves every public attention function (mmkern/attention.py):
- dense:   q (B, Lq, H, D), k/v (B, Lk, H_kv, D); lse (B, H, Lq) float32
- varlen:  q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens_q/k (B + 1,) int32; lse (H, total_q)
- kvcache: dense, with seqused_k (B,) int32 = number of valid keys per sequence
Every output of these ops is a new contiguous tensor (backends must return them so).
The forward takes the dropout seed as a tensor (drawn by the caller from torch's generator), so
the op itself is deterministic and the backward regenerates the same mask from it.

Validation lives here, called from both the real and the fake implementation, so bad input
fails the same way in eager mode and while torch.compile traces.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops._checks import (FLOAT_DTYPES, check_dim, check_dropout_p, check_same_device,
                                check_same_dtype, check_tensor)

MAX_HEAD_DIM = 256


def check_attention_inputs(fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                           causal, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p) -> None:
    """Shape/dtype/range checks (no data reads: safe on fake tensors)."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != rank:
            raise ValueError(f"{fn}: {name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    check_same_dtype(fn, q=q, k=k, v=v)
    check_same_device(fn, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      seqused_k=seqused_k, alibi_slopes=alibi_slopes, attn_mask=attn_mask)
    H, D = q.shape[-2], q.shape[-1]
    H_kv = k.shape[-2]
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"{fn}: head_dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {D}")
    check_dim(fn, "k", k, -1, D, "head_dim, as q")
    check_dim(fn, "v", v, -1, D, "head_dim, as q")
    check_dim(fn, "v", v, -2, H_kv, "heads, as k")
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"{fn}: the number of key/value heads ({H_kv}) must divide the number of query heads "
                         f"({H}); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_dim(fn, "v", v, 0, k.shape[0], "as k")
    if not varlen:
        check_dim(fn, "k", k, 0, q.shape[0], "batch, as q")
        check_dim(fn, "v", v, 1, k.shape[1], "seqlen, as k")
    else:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            check_tensor(fn, name, cu, dtypes=(torch.int32, torch.int64), ndim=1)
            if cu.shape[0] < 1:
                raise ValueError(f"{fn}: {name} must hold batch + 1 offsets (at least [0]), got shape {tuple(cu.shape)}")
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
            raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1); got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{fn}: {name} must be an int >= 0, got {value!r}")
    if seqused_k is not None:
        check_tensor(fn, "cache_seqlens", seqused_k, dtypes=(torch.int32, torch.int64), ndim=1)
        check_dim(fn, "cache_seqlens", seqused_k, 0, q.shape[0], "batch")
    for name, value in (("window_size[0]", window_left), ("window_size[1]", window_right)):
        if not isinstance(value, int) or value < -1:
            raise ValueError(f"{fn}: {name} must be an int >= -1 (-1 = unbounded), got {value!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"{fn}: softcap must be a float >= 0 (0 = off), got {softcap!r}")
    check_dropout_p(fn, dropout_p)
    if alibi_slopes is not None:
        check_tensor(fn, "alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndim=(1, 2))
        batch = (cu_seqlens_q.shape[0] - 1) if varlen else q.shape[0]
        allowed = [(H,), (batch, H)]
        if tuple(alibi_slopes.shape) not in allowed:
            raise ValueError(f"{fn}: alibi_slopes must have shape (heads,) = ({H},) or (batch, heads) = "
                             f"({batch}, {H}); got {tuple(alibi_slopes.shape)}")
    if attn_mask is not None:
        if varlen:
            raise ValueError(f"{fn}: attn_mask is not supported with varlen inputs")
        check_tensor(fn, "attn_mask", attn_mask, dtypes=(torch.bool, *FLOAT_DTYPES), ndim=4)
        want = (q.shape[0], H, q.shape[1], k.shape[1])
        if tuple(attn_mask.shape) != want:
            raise ValueError(f"{fn}: attn_mask must broadcast to (batch, heads, seqlen_q, seqlen_k) = {want}; "
                             f"got {tuple(attn_mask.shape)}")


def check_varlen_values(fn: str, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """Checks that read cu_seqlens (one small device-to-host copy): eager calls only."""
    for name, cu, packed, max_len, max_name in (("cu_seqlens_q", cu_seqlens_q, q, max_seqlen_q, "max_seqlen_q"),
                                                 ("cu_seqlens_k", cu_seqlens_k, k, max_seqlen_k, "max_seqlen_k")):
        offsets = cu.tolist()
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
            raise ValueError(f"{fn}: {name} must start at 0 and never decrease; got {offsets}")
        if offsets[-1] != packed.shape[0]:
            raise ValueError(f"{fn}: {name}[-1] must equal the packed length {packed.shape[0]} "
                             f"(shape[0] of {'q' if name.endswith('q') else 'k'}); got {offsets[-1]}")
        longest = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
        if longest > max_len:
            raise ValueError(f"{fn}: {max_name} ({max_len}) is smaller than the longest sequence in {name} ({longest})")


# --------------------------------------------------------------------------- forward

@torch.library.custom_op("mmkern::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, causal_bottom_right: bool, window_left: int, window_right: int,
    softcap: float, alibi_slopes: Optional[Tensor], attn_mask: Optional[Tensor],
    dropout_p: float, dropout_seed: Optional[Tensor], deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out like q, lse float32: (B, H, Lq) dense or (H, total_q) varlen)."""
    fn = "mmkern::attention_forward"
    check_attention_inputs(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                           causal, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p)
    if cu_seqlens_q is not None:
        check_varlen_values(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return dispatch.call(
        "attention_forward", q.device, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
        causal=causal, causal_bottom_right=causal_bottom_right, window_left=window_left,
        window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask,
        dropout_p=dropout_p, dropout_seed=dropout_seed, deterministic=deterministic)


def _lse_shape(q: Tensor, varlen: bool) -> tuple:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
      dropout_seed, deterministic):
    check_attention_inputs("mmkern::attention_forward", q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                           max_seqlen_q, max_seqlen_k, causal, window_left, window_right, softcap,
                           alibi_slopes, attn_mask, dropout_p)
    varlen = cu_seqlens_q is not None
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, varlen), dtype=torch.float32)


# --------------------------------------------------------------------------- backward

@torch.library.custom_op("mmkern::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, causal_bottom_right: bool, window_left: int, window_right: int,
    softcap: float, alibi_slopes: Optional[Tensor], attn_mask: Optional[Tensor],
    dropout_p: float, dropout_seed: Optional[Tensor], deterministic: bool, attn_mask_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, d_attn_mask); d_attn_mask is (B, H, Lq, Lk) when asked for, else empty.
    With deterministic=True a backend must give bitwise-identical results run to run."""
    return dispatch.call(
        "attention_backward", q.device, dout=dout, q=q, k=k, v=v, out=out, lse=lse, dlse=dlse,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
        causal_bottom_right=causal_bottom_right, window_left=window_left, window_right=window_right,
        softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p,
        dropout_seed=dropout_seed, deterministic=deterministic, attn_mask_needs_grad=attn_mask_needs_grad)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask,
      dropout_p, dropout_seed, deterministic, attn_mask_needs_grad):
    d_mask = attn_mask.new_empty(attn_mask.shape) if (attn_mask_needs_grad and attn_mask is not None) \
        else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_mask


# --------------------------------------------------------------------------- autograd

_FORWARD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "max_seqlen_q", "max_seqlen_k",
                 "softmax_scale", "causal", "causal_bottom_right", "window_left", "window_right", "softcap",
                 "alibi_slopes", "attn_mask", "dropout_p", "dropout_seed", "deterministic")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    mask = args["attn_mask"]
    ctx.set_materialize_grads(False)   # dlse arrives as None unless the caller used lse
    ctx.attn_mask_needs_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["cu_seqlens_q"], args["cu_seqlens_k"],
                          args["seqused_k"], args["alibi_slopes"], mask, args["dropout_seed"])
    ctx.params = {name: args[name] for name in ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal",
                                                "causal_bottom_right", "window_left", "window_right", "softcap",
                                                "dropout_p", "deterministic")}


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, seqused_k, alibi_slopes, attn_mask, dropout_seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, d_mask = attention_backward(
        dout, q, k, v, out, lse, dlse, cu_q, cu_k, seqused_k, alibi_slopes=alibi_slopes, attn_mask=attn_mask,
        dropout_seed=dropout_seed, attn_mask_needs_grad=ctx.attn_mask_needs_grad, **ctx.params)
    grads = dict.fromkeys(_FORWARD_ARGS)
    grads.update(q=dq, k=dk, v=dv, attn_mask=d_mask if ctx.attn_mask_needs_grad else None)
    return tuple(grads[name] for name in _FORWARD_ARGS)


torch.library.register_autograd("mmkern::attention_forward", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- autocast

_AUTOCAST_LIB = torch.library.Library("mmkern", "IMPL")


def _register_autocast(device_type: str) -> None:
    """Under torch.autocast, attention runs in the autocast dtype like torch's SDPA (on CPU and CUDA):
    q, k, v and a float attn_mask are cast (floating tensors other than float64, as autocast does);
    alibi_slopes stay float32 (the kernels read them so). lse stays float32."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = dict(zip(_FORWARD_ARGS, args))
        for name in ("q", "k", "v", "attn_mask"):
            t = args[name]
            if t is not None and t.is_floating_point() and t.dtype != torch.float64:
                args[name] = t.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return attention_forward(*(args[name] for name in _FORWARD_ARGS))

    _AUTOCAST_LIB.impl("attention_forward", kernel, key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)


# --------------------------------------------------------------------------- KV cache

@torch.library.custom_op("mmkern::kvcache_append", mutates_args=("k_cache", "v_cache"))
def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor) -> None:
    """In place: k_cache[b, cache_seqlens[b] : cache_seqlens[b] + L_new] = k[b] (same for v).
    k_cache/v_cache (B, L_cache, H_kv, D), k/v (B, L_new, H_kv, D), cache_seqlens (B,) int32."""
    if k.shape[1] > 0 and k_cache.shape[0] > 0:
        longest = int((cache_seqlens + k.shape[1]).max())
        if longest > k_cache.shape[1]:
            raise ValueError(f"mmkern.flash_attn_with_kvcache: cache_seqlens + k.shape[1] must be <= the cache length "
                             f"{k_cache.shape[1]}; the largest is {longest}")
    dispatch.call("kvcache_append", k_cache.device, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                  cache_seqlens=cache_seqlens)


@kvcache_append.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens):
    return None
