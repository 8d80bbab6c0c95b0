"""Public attention functions: flash-attn's API and a drop-in for torch's scaled_dot_product_attention.

Each one normalises its arguments (default scale, window, dropout seed, layouts), then calls the
torch ops of mmkern/ops/attention.py, which validate, dispatch to a backend and carry autograd.
Nothing here reads tensor data, so every function traces under torch.compile(fullgraph=True).
"""
from __future__ import annotations

import math

import torch

from mmkern.ops import attention as ops
from mmkern.ops import _eager as eager
from mmkern.ops._checks import FLOAT_DTYPES, check_dropout_p, check_tensor, last_dim_contiguous
from mmkern.ops._rng import draw_seed


def _window(fn: str, window_size) -> tuple[int, int]:
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"{fn}: window_size must be a pair of ints (left, right), -1 = unbounded; got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"{fn}: window_size values must be >= -1 (-1 = unbounded); got {tuple(window_size)}")
    return left, right


def _scale(fn: str, softmax_scale, q: torch.Tensor) -> float:
    if softmax_scale is None:
        # head_dim 0 is refused by the op's validation, with a message naming head_dim; no division here first.
        return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"{fn}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def _softcap(fn: str, softcap) -> float:
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or softcap < 0:
        raise ValueError(f"{fn}: softcap must be a float >= 0 (0 = off), got {softcap!r}")
    return float(softcap)


def _common(fn, q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, dtypes=FLOAT_DTYPES)
    check_dropout_p(fn, dropout_p)
    left, right = _window(fn, window_size)
    softcap = _softcap(fn, softcap)
    q, k, v, alibi_slopes = (last_dim_contiguous(t) for t in (q, k, v, alibi_slopes))
    seed = draw_seed() if dropout_p > 0 else None
    return q, k, v, float(dropout_p), _scale(fn, softmax_scale, q), left, right, softcap, alibi_slopes, seed


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_lse=False):
    """Exact attention on (batch, seqlen, heads, head_dim) tensors, as flash_attn.flash_attn_func.

    q (B, Lq, H, D); k, v (B, Lk, H_kv, D) with H_kv dividing H (MQA/GQA). `causal` and `window_size`
    align the last query with the last key when Lq != Lk (bottom-right, flash-attn >= 2.1).
    `alibi_slopes` (H,) or (B, H) float32. Returns out (B, Lq, H, D), and with return_lse=True also
    lse (B, H, Lq) float32 (natural log, -inf where a query sees no key).
    """
    fn = "mmkern.flash_attn_func"
    q, k, v, dropout_p, scale, left, right, softcap, alibi_slopes, seed = _common(
        fn, q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    out, lse = eager.call(ops.attention_forward, q, k, v, None, None, None, 0, 0, scale, bool(causal), True, left,
                          right, softcap, alibi_slopes, None, dropout_p, seed, bool(deterministic))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_lse=False):
    """Attention over a packed batch of variable-length sequences, as flash_attn.flash_attn_varlen_func.

    q (total_q, H, D), k/v (total_k, H_kv, D); sequence b holds rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    (int32, (B + 1,), starting at 0). Sequences of length 0 are allowed. Returns out (total_q, H, D),
    and with return_lse=True also lse (H, total_q) float32.
    """
    fn = "mmkern.flash_attn_varlen_func"
    q, k, v, dropout_p, scale, left, right, softcap, alibi_slopes, seed = _common(
        fn, q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(fn, name, cu, dtypes=(torch.int32, torch.int64), ndim=1)
    out, lse = eager.call(ops.attention_forward, q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q,
                          max_seqlen_k, scale, bool(causal), True, left, right, softcap, alibi_slopes, None, dropout_p,
                          seed, bool(deterministic))
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_lse=False):
    """Decoding / chunked prefill against a preallocated KV cache, as flash_attn.flash_attn_with_kvcache.

    q (B, Lq, H, D); k_cache, v_cache (B, L_cache, H_kv, D). If k, v (B, L_new, H_kv, D) are given they
    are written into the cache in place at positions cache_seqlens[b] .. cache_seqlens[b] + L_new - 1;
    then q attends to the first cache_seqlens[b] + L_new keys of sequence b (causal: bottom-right, so
    the last query sees every key). cache_seqlens: int or (B,) int32; None means the cache is full.
    Inference only (no gradient).
    """
    fn = "mmkern.flash_attn_with_kvcache"
    check_tensor(fn, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(fn, name, t, dtypes=FLOAT_DTYPES, ndim=4)
        if t.stride(-1) != 1:
            raise ValueError(f"{fn}: {name} is updated in place and must have a contiguous last dimension; "
                             f"got strides {t.stride()}")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v (new keys/values to append) or neither")
    B = q.shape[0]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    elif cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{fn}: cache_seqlens is needed to know where to append k and v; got None")
    else:
        check_tensor(fn, "cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), ndim=1)
    left, right = _window(fn, window_size)
    softcap = _softcap(fn, softcap)
    q, alibi_slopes = last_dim_contiguous(q), last_dim_contiguous(alibi_slopes)
    scale = _scale(fn, softmax_scale, q)
    seqused_k = cache_seqlens
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(fn, name, t, dtypes=FLOAT_DTYPES, ndim=4)
            want = (B, t.shape[1], k_cache.shape[2], k_cache.shape[3])
            if t.dtype != k_cache.dtype or tuple(t.shape) != want:
                raise ValueError(f"{fn}: {name} must have shape (batch, new_len, kv_heads, head_dim) = {want} and "
                                 f"dtype {k_cache.dtype} like the cache; got {tuple(t.shape)} {t.dtype}")
        eager.call(ops.kvcache_append, k_cache, v_cache, last_dim_contiguous(k), last_dim_contiguous(v), cache_seqlens)
        seqused_k = cache_seqlens + k.shape[1]
    out, lse = eager.call(ops.attention_forward, q, k_cache, v_cache, None, None, seqused_k, 0, 0, scale,
                          bool(causal), True, left, right, softcap, alibi_slopes, None, 0.0, None, False)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, with torch's layout and semantics.

    query (B, H, Lq, D), key/value (B, H_kv, Lk, D) (H_kv != H only with enable_gqa=True).
    attn_mask: bool (True = take part) or float (added to the scores), broadcastable to
    (B, H, Lq, Lk); a float mask that requires grad gets its gradient. is_causal uses torch's
    top-left alignment. Rows that see no key give 0 (torch's math backend gives NaN).
    """
    fn = "mmkern.scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(fn, name, t, dtypes=FLOAT_DTYPES, ndim=4)
    check_dropout_p(fn, dropout_p)
    H, H_kv = query.shape[1], key.shape[1]
    if H != H_kv and not enable_gqa:
        raise ValueError(f"{fn}: query has {H} heads and key {H_kv}; different head counts need enable_gqa=True")
    if attn_mask is not None:
        check_tensor(fn, "attn_mask", attn_mask, dtypes=(torch.bool, *FLOAT_DTYPES))
        if is_causal:
            raise ValueError(f"{fn}: pass attn_mask or is_causal=True, not both (as torch)")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"{fn}: a float attn_mask must have the dtype of query ({query.dtype}); got {attn_mask.dtype}")
        B, Lq, Lk = query.shape[0], query.shape[2], key.shape[2]
        try:
            attn_mask = attn_mask.expand(B, H, Lq, Lk)
        except RuntimeError:
            raise ValueError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(batch, heads, seqlen_q, seqlen_k) = {(B, H, Lq, Lk)}") from None
    q, k, v = (last_dim_contiguous(t.transpose(1, 2)) for t in (query, key, value))
    softmax_scale = _scale(fn, scale, q)
    seed = draw_seed() if dropout_p > 0 else None
    out, _ = eager.call(ops.attention_forward, q, k, v, None, None, None, 0, 0, softmax_scale, bool(is_causal), False,
                        -1, -1, 0.0, None, attn_mask, float(dropout_p), seed, False)
    return out.transpose(1, 2)
