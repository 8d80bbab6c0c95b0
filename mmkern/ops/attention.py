"""Attention as torch ops: mmkern::attention_forward, mmkern::attention_backward, mmkern::kvcache_append.

One forward/backward pair serves every public attention function (mmkern/attention.py). Each call becomes
one AttentionProblem (mmkern/ops/attention_problem.py: the layouts, the derived facts, the validation and
the numerics contract every backend keeps), which dispatch hands to the chosen backend.
Every output of these ops is a new contiguous tensor (backends must return them so).
The forward takes the dropout seed as a tensor (drawn by the caller from torch's generator), so
the op itself is deterministic and the backward regenerates the same mask from it.

The record is built (and validated) by both the real and the fake implementation, so bad input fails the
same way in eager mode and while torch.compile traces.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops import _eager as eager
from mmkern.ops.attention_problem import AttentionProblem, KVCacheAppend, build

_FORWARD = "mmkern::attention_forward"


@torch.library.custom_op("mmkern::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, causal_bottom_right: bool, window_left: int, window_right: int,
    softcap: float, alibi_slopes: Optional[Tensor], attn_mask: Optional[Tensor],
    dropout_p: float, dropout_seed: Optional[Tensor], deterministic: bool,
    block_table: Optional[Tensor] = None, leftpad_k: Optional[Tensor] = None, num_splits: int = 0,
) -> tuple[Tensor, Tensor]:
    """Returns (out like q, lse float32: (B, H, Lq) dense or (H, total_q) varlen); see AttentionProblem.
    block_table (paged k/v), leftpad_k and num_splits are the serving arguments (flash_attn_with_kvcache)."""
    return dispatch.call_memoized("attention_forward", build, _FORWARD, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                  seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, causal_bottom_right,
                                  window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
                                  dropout_seed, deterministic, block_table, leftpad_k, num_splits, read_values=True)


@attention_forward.register_fake
def _(*args):
    problem = build(_FORWARD, *args)
    return problem.q.new_empty(problem.q.shape), problem.q.new_empty(problem.lse_shape, dtype=torch.float32)


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
    With deterministic=True a backend must give bitwise-identical results run to run.
    The inputs are the forward's (validated there), so the record is built without checks."""
    problem = build("mmkern::attention_backward", q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                    max_seqlen_k, softmax_scale, causal, causal_bottom_right, window_left, window_right, softcap,
                    alibi_slopes, attn_mask, dropout_p, dropout_seed, deterministic, validate=False)
    return dispatch.call("attention_backward", problem.with_gradients(dout, out, lse, dlse, attn_mask_needs_grad))


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
                 "alibi_slopes", "attn_mask", "dropout_p", "dropout_seed", "deterministic", "block_table", "leftpad_k",
                 "num_splits")


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
        # the dispatcher may leave out trailing arguments that equal their defaults
        args = {**_DEFAULT_ARGS, **dict(zip(_FORWARD_ARGS, args))}
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
def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                   block_table: Optional[Tensor] = None) -> None:
    """In place: cache row cache_seqlens[b] + t of sequence b = k[b, t] (same for v). k/v (B, L_new, H_kv, D),
    cache_seqlens (B,) int32/int64. Dense: k_cache/v_cache (B, L_cache, H_kv, D), row j of b is k_cache[b, j];
    paged (block_table (B, max_blocks) int32): k_cache/v_cache (num_blocks, page_size, H_kv, D), row j of b is
    k_cache[block_table[b, j // page_size], j % page_size]. The length check reads cache_seqlens: CPU only."""
    problem = KVCacheAppend(k_cache, v_cache, k, v, cache_seqlens, block_table)
    if k.shape[1] > 0 and k.shape[0] > 0 and cache_seqlens.device.type == "cpu":
        longest = int((cache_seqlens + k.shape[1]).max())
        if longest > problem.cache_len:
            raise ValueError(f"mmkern.flash_attn_with_kvcache: cache_seqlens + k.shape[1] must be <= the cache length "
                             f"{problem.cache_len}; the largest is {longest}")
    dispatch.call("kvcache_append", problem)


@kvcache_append.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, block_table=None):
    return None


# what `attention()` and dispatch.problem() fill in for arguments a caller leaves out (optional tensors: None)
_DEFAULTS = dict(max_seqlen_q=0, max_seqlen_k=0, softmax_scale=1.0, causal=False, causal_bottom_right=True,
                 window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0, deterministic=False, num_splits=0)


def attention(q: Tensor, k: Tensor, v: Tensor, **arguments) -> tuple[Tensor, Tensor]:
    """mmkern::attention_forward called by keyword (the schema's names; what is left out takes _DEFAULTS or
    None), through the eager fast path (mmkern/ops/_eager.py). The public functions call this."""
    row = _DEFAULT_ROW.copy()
    row[0], row[1], row[2] = q, k, v
    try:
        for name, value in arguments.items():
            row[_INDEX[name]] = value
    except KeyError as exc:
        raise TypeError(f"mmkern::attention_forward has no argument {exc.args[0]!r}") from None
    return eager.call(attention_forward, *row)


_INDEX = {name: i for i, name in enumerate(_FORWARD_ARGS)}
_DEFAULT_ROW = [_DEFAULTS.get(name) for name in _FORWARD_ARGS]
_DEFAULT_ARGS = dict(zip(_FORWARD_ARGS, _DEFAULT_ROW))


def _forward_problem(**inputs) -> AttentionProblem:
    inputs = {**_DEFAULTS, **inputs}
    return build(_FORWARD, *(inputs.get(name) for name in _FORWARD_ARGS), read_values=True)


def _backward_problem(dout, out, lse, dlse=None, attn_mask_needs_grad=False, **inputs) -> AttentionProblem:
    return _forward_problem(**inputs).with_gradients(dout, out, lse, dlse, attn_mask_needs_grad)


dispatch.define_problem("attention_forward", _forward_problem)
dispatch.define_problem("attention_backward", _backward_problem)
dispatch.define_problem("kvcache_append", KVCacheAppend)
