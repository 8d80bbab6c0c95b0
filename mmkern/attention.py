"""Public attention functions: flash-attn's API and a drop-in for torch's scaled_dot_product_attention.

Each one only normalises its arguments (default scale, the window pair, the dropout seed, layouts, cache
lengths), then calls the torch ops of mmkern/ops/attention.py by keyword (`ops.attention(...)`); the op
builds the problem record, validates it once, dispatches it to a backend and carries autograd.
Nothing here reads tensor data, so every function traces under torch.compile(fullgraph=True).

The numerics contract of every function (mmkern/ops/attention_problem.py): a query that sees no key gives
out 0 and lse -inf; a NaN score gives NaN; a +inf score gives NaN out and lse +inf.
"""
from __future__ import annotations

import math

import torch

from mmkern.ops import attention as ops
from mmkern.ops import _eager as eager
from mmkern.ops import rotary as rotary_ops
from mmkern.ops._checks import FLOAT_DTYPES, check_tensor, last_dim_contiguous
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


def _tensors(fn: str, **tensors) -> None:
    """The layouts are normalised (transposed, made last-dim contiguous) here, so these must be tensors; dtypes,
    shapes and everything else are the op's to check (mmkern/ops/attention_problem.py)."""
    for name, t in tensors.items():
        check_tensor(fn, name, t)


def _dropout(dropout_p):
    """(dropout_p as a float, the seed tensor the kernels draw their mask from, or None); the op checks the range."""
    if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool):
        dropout_p = float(dropout_p)
        return dropout_p, (draw_seed() if dropout_p > 0 else None)
    return dropout_p, None


def _prepared(fn, q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes) -> dict:
    """The op's keyword arguments shared by the flash-attn functions."""
    _tensors(fn, q=q, k=k, v=v)
    left, right = _window(fn, window_size)
    q, k, v, alibi_slopes = (last_dim_contiguous(t) for t in (q, k, v, alibi_slopes))
    dropout_p, seed = _dropout(dropout_p)
    return dict(q=q, k=k, v=v, dropout_p=dropout_p, softmax_scale=_scale(fn, softmax_scale, q), window_left=left,
                window_right=right, softcap=_softcap(fn, softcap), alibi_slopes=alibi_slopes, dropout_seed=seed)


def _attend(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_lse, **varlen):
    """The body of every flash-attn function (dense, varlen, packed): one ops.attention call; varlen is
    cu_seqlens_q/_k and max_seqlen_q/_k, or nothing for a dense batch."""
    arguments = _prepared(fn, q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    out, lse = ops.attention(**arguments, **varlen, causal=bool(causal), deterministic=bool(deterministic))
    return (out, lse) if return_lse else out


def _unpacked(fn: str, name: str, packed, layout: tuple) -> tuple[torch.Tensor, ...]:
    """packed's views along the dimension of `layout` given as an int (3 for qkv, 2 for kv): unbind makes views,
    never a copy (their last dimension is contiguous when packed's is; last_dim_contiguous in _prepared handles
    the other case), and autograd through them hands back one gradient of packed's shape (dqkv, dkv)."""
    check_tensor(fn, name, packed, dtypes=FLOAT_DTYPES)
    dim, n = next((i, n) for i, n in enumerate(layout) if isinstance(n, int))
    if packed.dim() != len(layout) or packed.shape[dim] != n:
        raise ValueError(f"{fn}: {name} must have shape ({', '.join(map(str, layout))}); got {tuple(packed.shape)}")
    return packed.unbind(dim)


_FEATURES_DOC = """
    dropout_p: float in [0, 1), the probability of dropping each attention weight (training only; the mask
        is drawn from torch's generator, so torch.manual_seed reproduces it).
    softmax_scale: float, the scale of q . k; None = 1 / sqrt(head_dim).
    causal: bool, a query sees only keys at or before its own position; with Lq != Lk the last query is
        aligned with the last key (bottom-right, flash-attn >= 2.1).
    window_size: (left, right) ints, -1 = unbounded: a query at aligned position i sees keys i - left .. i + right
        (sliding-window / local attention; causal sets right = 0).
    softcap: float >= 0, 0 = off: scores become softcap * tanh(scores / softcap) (Gemma 2, Grok).
    alibi_slopes: (H,) or (B, H) float32, or None: adds -slope * |i + Lk - Lq - j| to the score of query i, key j.
    deterministic: bool, ask for a backward that is bitwise identical run to run (every mmkern backward is).
    return_lse: bool, also return lse, the natural log-sum-exp of each query's scores, float32."""


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_lse=False):
    return _attend("mmkern.flash_attn_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_lse)


flash_attn_func.__doc__ = """Exact attention on (batch, seqlen, heads, head_dim) tensors, as flash_attn.flash_attn_func.

    q: (B, Lq, H, D) float16, bfloat16, float32 (float64 runs on the reference); D in 1..256.
    k, v: (B, Lk, H_kv, D), same dtype, H_kv dividing H (MQA/GQA: query head h reads k/v head h // (H / H_kv)).""" \
    + _FEATURES_DOC + """

    Returns out (B, Lq, H, D) like q; with return_lse=True also lse (B, H, Lq) float32 (-inf where a query
    sees no key). Differentiable in q, k, v.
    """


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_lse=False):
    return _attend("mmkern.flash_attn_varlen_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


flash_attn_varlen_func.__doc__ = """Attention over a packed batch of variable-length sequences, as flash_attn.flash_attn_varlen_func.

    q: (total_q, H, D), the B sequences' queries one after another; k, v: (total_k, H_kv, D).
    cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets starting at 0: sequence b holds rows
        cu_seqlens_q[b] : cu_seqlens_q[b + 1]; sequences of length 0 are allowed.
    max_seqlen_q, max_seqlen_k: int >= the longest sequence (as flash-attn: sizes the launch grid).
    Causal alignment, window and ALiBi positions are per sequence.""" + _FEATURES_DOC + """

    Returns out (total_q, H, D) like q; with return_lse=True also lse (H, total_q) float32.
    """


# The packed layouts (flash-attn's); the int is the packed dimension and its size.
_QKV = ("batch", "seqlen", 3, "heads", "head_dim")
_KV = ("batch", "seqlen_k", 2, "kv_heads", "head_dim")
_VARLEN_QKV = ("total", 3, "heads", "head_dim")
_VARLEN_KV = ("total_k", 2, "kv_heads", "head_dim")


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, deterministic=False, return_lse=False):
    fn = "mmkern.flash_attn_qkvpacked_func"
    q, k, v = _unpacked(fn, "qkv", qkv, _QKV)
    return _attend(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_lse)


flash_attn_qkvpacked_func.__doc__ = """Self-attention on q, k, v packed in one tensor, as flash_attn.flash_attn_qkvpacked_func.

    qkv: (B, L, 3, H, D) float16, bfloat16, float32 (float64 runs on the reference); D in 1..256: q, k, v are
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], taken as views (no copy; flash_attn_func on them gives the
        same result).""" + _FEATURES_DOC + """

    Returns out (B, L, H, D) like qkv; with return_lse=True also lse (B, H, L) float32 (-inf where a query
    sees no key). Differentiable in qkv (its gradient has qkv's shape).
    """


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                             alibi_slopes=None, deterministic=False, return_lse=False):
    fn = "mmkern.flash_attn_kvpacked_func"
    k, v = _unpacked(fn, "kv", kv, _KV)
    return _attend(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_lse)


flash_attn_kvpacked_func.__doc__ = """Attention with k and v packed in one tensor, as flash_attn.flash_attn_kvpacked_func.

    q: (B, Lq, H, D) float16, bfloat16, float32 (float64 runs on the reference); D in 1..256.
    kv: (B, Lk, 2, H_kv, D), same dtype, H_kv dividing H (MQA/GQA): k, v are kv[:, :, 0], kv[:, :, 1], taken
        as views (no copy; flash_attn_func on them gives the same result).""" + _FEATURES_DOC + """

    Returns out (B, Lq, H, D) like q; with return_lse=True also lse (B, H, Lq) float32 (-inf where a query
    sees no key). Differentiable in q and kv (its gradient has kv's shape).
    """


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_lse=False):
    fn = "mmkern.flash_attn_varlen_qkvpacked_func"
    q, k, v = _unpacked(fn, "qkv", qkv, _VARLEN_QKV)
    return _attend(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_lse, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                   max_seqlen_k=max_seqlen)


flash_attn_varlen_qkvpacked_func.__doc__ = """Varlen self-attention with q, k, v packed in one tensor, as flash_attn.flash_attn_varlen_qkvpacked_func.

    qkv: (total, 3, H, D) float16, bfloat16, float32 (float64 runs on the reference), the B sequences one after
        another: q, k, v are qkv[:, 0], qkv[:, 1], qkv[:, 2], taken as views (no copy).
    cu_seqlens: (B + 1,) int32 offsets starting at 0, for queries and keys alike: sequence b holds rows
        cu_seqlens[b] : cu_seqlens[b + 1]; sequences of length 0 are allowed.
    max_seqlen: int >= the longest sequence (as flash-attn: sizes the launch grid).
    Causal alignment, window and ALiBi positions are per sequence.""" + _FEATURES_DOC + """

    Returns out (total, H, D) like qkv; with return_lse=True also lse (H, total) float32. Differentiable in qkv
    (its gradient has qkv's shape).
    """


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_lse=False):
    fn = "mmkern.flash_attn_varlen_kvpacked_func"
    k, v = _unpacked(fn, "kv", kv, _VARLEN_KV)
    return _attend(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                   max_seqlen_k=max_seqlen_k)


flash_attn_varlen_kvpacked_func.__doc__ = """Varlen attention with k and v packed in one tensor, as flash_attn.flash_attn_varlen_kvpacked_func.

    q: (total_q, H, D) float16, bfloat16, float32 (float64 runs on the reference), the B sequences' queries one
        after another.
    kv: (total_k, 2, H_kv, D), same dtype, H_kv dividing H (MQA/GQA): k, v are kv[:, 0], kv[:, 1], taken as
        views (no copy).
    cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets starting at 0: sequence b holds rows
        cu_seqlens_q[b] : cu_seqlens_q[b + 1]; sequences of length 0 are allowed.
    max_seqlen_q, max_seqlen_k: int >= the longest sequence (as flash-attn: sizes the launch grid).
    Causal alignment, window and ALiBi positions are per sequence.""" + _FEATURES_DOC + """

    Returns out (total_q, H, D) like q; with return_lse=True also lse (H, total_q) float32. Differentiable in q
    and kv (its gradient has kv's shape).
    """


def _rotated(fn, q, k, rotary_cos, rotary_sin, cache_seqlens, interleaved: bool, local: bool):
    """(q, k) rotated as flash_attn_with_kvcache's rotary arguments say: k (B, L_new, H_kv, D) at positions
    cache_seqlens[b] + t; q (B, Lq, H, D) at cache_seqlens[b] + t when local (causal or a window), else every
    query at cache_seqlens[b] (q viewed as one token of Lq * H heads). The checks here name this function's
    arguments; the op checks the rest (dtypes, and on CPU the table length, again)."""
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(f"{fn}: pass both rotary_cos and rotary_sin (the rotary tables) or neither; got "
                         f"rotary_sin {'None' if rotary_sin is None else 'without rotary_cos'}")
    if k is None:
        raise ValueError(f"{fn}: rotary_cos/rotary_sin rotate the new keys before they are appended: pass k and v")
    check_tensor(fn, "rotary_cos", rotary_cos, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(fn, "rotary_sin", rotary_sin, dtypes=FLOAT_DTYPES, ndim=2)
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"{fn}: rotary_sin must have the shape of rotary_cos {tuple(rotary_cos.shape)}; got "
                         f"{tuple(rotary_sin.shape)}")
    B, Lq, H, D = q.shape
    rotary_dim = 2 * rotary_cos.shape[1]
    if not 2 <= rotary_dim <= D:
        raise ValueError(f"{fn}: rotary_dim = 2 * rotary_cos.shape[1] must be in 2..head_dim = {D}; got rotary_cos "
                         f"of shape {tuple(rotary_cos.shape)} (rotary_dim {rotary_dim})")
    if cache_seqlens.device.type == "cpu" and B and not torch.compiler.is_compiling():
        needed = max(cache_seqlens.tolist()) + max(k.shape[1], Lq if local else 1)
        if needed > rotary_cos.shape[0]:
            raise ValueError(f"{fn}: rotary_cos and rotary_sin hold {rotary_cos.shape[0]} positions; cache_seqlens + "
                             f"the new tokens need {needed}")
    rotate = lambda x: eager.call(rotary_ops.rotary_embedding, x, rotary_cos, rotary_sin, cache_seqlens,  # noqa: E731
                                  None, 0, 0, interleaved, False)
    k = rotate(k)
    q = rotate(q) if local else rotate(q.reshape(B, 1, Lq * H, D)).view(B, Lq, H, D)
    return q, k


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_lse=False):
    """Decoding / chunked prefill against a preallocated KV cache, as flash_attn.flash_attn_with_kvcache.

    q: (B, Lq, H, D), the new queries (Lq = 1 for one decode step).
    k_cache, v_cache: updated in place (their last dimension must be contiguous), in one of two layouts:
        dense (B_cache, L_cache, H_kv, D): sequence b's cache row j is k_cache[b, j] (or k_cache[cache_batch_idx[b],
        j]); paged, with block_table: (num_blocks, page_block_size, H_kv, D), page_block_size a multiple of 16,
        and row j of sequence b is k_cache[block_table[b, j // page_block_size], j % page_block_size]. Pages are
        read where they are (no gathered copy) by the triton and cpu kernels; the torch backend gathers.
    k, v: (B, L_new, H_kv, D) or None: new keys/values, written into the caches at rows
        cache_seqlens[b] .. cache_seqlens[b] + L_new - 1 before attending.
    rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) in the caches' dtype or float32, or None (no rotary):
        with k and v given, the new keys are rotated (the rotated keys are what lands in the cache) at positions
        p, p + 1, ... with p = cache_seqlens[b] - cache_leftpad[b], and q too: at those positions when causal or
        local (a window), every query at position p otherwise (flash-attn's semantics); rotary_dim <= D,
        features rotary_dim.. left as they are. Positions must lie in the tables: checked (ValueError) for CPU
        tensors; on a GPU the kernels clamp each position into the table instead (no host sync).
    rotary_interleaved: bool, True (default, as flash-attn): GPT-J pairs (2i, 2i + 1); False: GPT-NeoX halves
        (i, i + rotary_dim / 2). See mmkern.apply_rotary_emb.
    cache_seqlens: int, (B,) int32/int64, or None (the caches are full): where each sequence's cache ends before
        the append. q then attends to cache rows cache_leftpad[b] .. cache_seqlens[b] + L_new - 1.
    cache_batch_idx: (B,) int32/int64 or None: dense caches only, batch entry b uses cache row cache_batch_idx[b]
        (distinct entries, each < k_cache.shape[0]); None = row b.
    cache_leftpad: (B,) int32/int64 or None: where each sequence's cache starts (left padding): rows before it
        are not attended to, and positions (causal alignment, window, ALiBi, rotary) count from it. Needs
        cache_seqlens >= cache_leftpad.
    block_table: (B, max_blocks_per_seq) int32 or None: the pages of each sequence (paged layout above), entries
        in 0..num_blocks - 1; the cache holds max_blocks_per_seq * page_block_size rows per sequence.
    softmax_scale: float, None = 1 / sqrt(D).
    causal: bool, bottom-right aligned: the last query sees every valid key, query i sees keys up to
        cache_seqlens[b] + L_new - Lq + i.
    window_size: (left, right), -1 = unbounded, aligned the same way. softcap: float >= 0, 0 = off.
    alibi_slopes: (H,) or (B, H) float32 or None.
    num_splits: int >= 0, how many ranges the keys of a decode step are split into and merged by lse: 0 = the
        backend chooses, 1 = no split, n = n ranges (at most one per key tile); the triton and cpu kernels take
        it (the result differs only in rounding), the reference and torch backends have no split to make.
    return_lse: also return lse (B, H, Lq) float32.

    The index arguments (block_table, cache_batch_idx, cache_leftpad, cache_seqlens) are checked (ValueError
    naming the argument) when they are CPU tensors; on a GPU they are not read on the host (a decode step can
    be captured in a CUDA graph) and the kernels clamp indices into range instead.
    Returns out (B, Lq, H, D) like q (and lse). Inference only (no gradient).
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
    q, alibi_slopes = last_dim_contiguous(q), last_dim_contiguous(alibi_slopes)
    k_cache, v_cache, block_table = _cache_layout(fn, q, k_cache, v_cache, cache_batch_idx, block_table)
    if cache_leftpad is not None:
        _check_leftpad(fn, q, cache_leftpad, cache_seqlens)
    seqused_k = cache_seqlens
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(fn, name, t, dtypes=FLOAT_DTYPES, ndim=4)
            want = (B, t.shape[1], k_cache.shape[2], k_cache.shape[3])
            if t.dtype != k_cache.dtype or tuple(t.shape) != want:
                raise ValueError(f"{fn}: {name} must have shape (batch, new_len, kv_heads, head_dim) = {want} and "
                                 f"dtype {k_cache.dtype} like the cache; got {tuple(t.shape)} {t.dtype}")
    if rotary_cos is not None or rotary_sin is not None:
        local = bool(causal) or (left, right) != (-1, -1)
        positions = cache_seqlens if cache_leftpad is None else cache_seqlens - cache_leftpad
        q, k = _rotated(fn, q, k, rotary_cos, rotary_sin, positions, bool(rotary_interleaved), local)
    if k is not None:
        eager.call(ops.kvcache_append, k_cache, v_cache, last_dim_contiguous(k), last_dim_contiguous(v), cache_seqlens,
                   block_table)
        seqused_k = cache_seqlens + k.shape[1]
    out, lse = ops.attention(q, k_cache, v_cache, seqused_k=seqused_k, softmax_scale=_scale(fn, softmax_scale, q),
                             causal=bool(causal), window_left=left, window_right=right, softcap=_softcap(fn, softcap),
                             alibi_slopes=alibi_slopes, block_table=block_table, leftpad_k=cache_leftpad,
                             num_splits=_num_splits(fn, num_splits))
    return (out, lse) if return_lse else out


# flash-attn 2 takes page sizes that are multiples of 256, flash-attn 3 any; the kernels here any multiple of this
PAGE_MULTIPLE = 16


def _cache_layout(fn, q, k_cache, v_cache, cache_batch_idx, block_table):
    """(k_cache, v_cache, block_table) as the op takes them, after the layout checks. cache_batch_idx becomes a
    block table of whole-cache pages (page = one batch row of L_cache keys), so it reaches the kernels as a
    one-entry-per-sequence paged cache, never as a gathered copy."""
    B = q.shape[0]
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError(f"{fn}: pass cache_batch_idx (dense caches) or block_table (paged caches), not both")
        check_tensor(fn, "block_table", block_table, dtypes=(torch.int32,), ndim=2)
        if block_table.shape[0] != B:
            raise ValueError(f"{fn}: block_table must have shape (batch, max_blocks_per_seq) with batch = {B} "
                             f"(q.shape[0]); got {tuple(block_table.shape)}")
        if tuple(v_cache.shape) != tuple(k_cache.shape):
            raise ValueError(f"{fn}: with block_table, k_cache and v_cache are pages (num_blocks, page_block_size, "
                             f"kv_heads, head_dim) of one shape; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        page = k_cache.shape[1]
        if page % PAGE_MULTIPLE or page == 0:
            raise ValueError(f"{fn}: page_block_size (k_cache.shape[1] with block_table) must be a positive multiple "
                             f"of {PAGE_MULTIPLE}; got {page}")
        return k_cache, v_cache, block_table
    if cache_batch_idx is None:
        return k_cache, v_cache, None
    check_tensor(fn, "cache_batch_idx", cache_batch_idx, dtypes=(torch.int32, torch.int64), ndim=1)
    if cache_batch_idx.shape[0] != B:
        raise ValueError(f"{fn}: cache_batch_idx must have shape (batch,) = ({B},); got {tuple(cache_batch_idx.shape)}")
    if cache_batch_idx.device.type == "cpu" and not torch.compiler.is_compiling():
        rows = cache_batch_idx.tolist()
        if any(not 0 <= r < k_cache.shape[0] for r in rows):
            raise ValueError(f"{fn}: cache_batch_idx entries must be cache rows in 0..{k_cache.shape[0] - 1} "
                             f"(k_cache.shape[0] = {k_cache.shape[0]}); got {rows}")
        if len(set(rows)) != len(rows):
            raise ValueError(f"{fn}: cache_batch_idx must not repeat a cache row (two sequences would append into "
                             f"one); got {rows}")
    return k_cache, v_cache, cache_batch_idx.to(torch.int32).view(B, 1)


def _check_leftpad(fn, q, cache_leftpad, cache_seqlens):
    check_tensor(fn, "cache_leftpad", cache_leftpad, dtypes=(torch.int32, torch.int64), ndim=1)
    if cache_leftpad.shape[0] != q.shape[0]:
        raise ValueError(f"{fn}: cache_leftpad must have shape (batch,) = ({q.shape[0]},); got "
                         f"{tuple(cache_leftpad.shape)}")
    if cache_seqlens is None:
        raise ValueError(f"{fn}: cache_leftpad needs cache_seqlens (where each sequence's cache ends)")
    if cache_leftpad.device.type == "cpu" and not torch.compiler.is_compiling():
        pads, ends = cache_leftpad.tolist(), cache_seqlens.tolist()
        if any(not 0 <= pad <= end for pad, end in zip(pads, ends)):
            raise ValueError(f"{fn}: cache_leftpad must be in 0..cache_seqlens for every sequence; got cache_leftpad "
                             f"{pads}, cache_seqlens {ends}")


def _num_splits(fn, num_splits) -> int:
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"{fn}: num_splits must be an int >= 0 (0 = the backend chooses, 1 = no split); "
                         f"got {num_splits!r}")
    return num_splits


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, with torch's layout and semantics.

    query: (B, H, Lq, D); key, value: (B, H_kv, Lk, D) (H_kv != H only with enable_gqa=True, H_kv dividing H).
    attn_mask: bool (True = take part) or float in query's dtype (added to the scores), broadcastable to
        (B, H, Lq, Lk), or None; a float mask that requires grad gets its gradient.
    dropout_p: float in [0, 1), as torch (the mask comes from torch's generator, mmkern's Philox stream).
    is_causal: bool, torch's top-left alignment when Lq != Lk; not together with attn_mask.
    scale: float, None = 1 / sqrt(D). enable_gqa: bool, allow H_kv != H.

    Returns (B, H, Lq, D) like query. Rows that see no key give 0 (torch's math backend gives NaN).
    """
    fn = "mmkern.scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(fn, name, t, ndim=4)
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
    dropout_p, seed = _dropout(dropout_p)
    out, _ = ops.attention(q, k, v, softmax_scale=_scale(fn, scale, q), causal=bool(is_causal),
                           causal_bottom_right=False, attn_mask=attn_mask, dropout_p=dropout_p, dropout_seed=seed)
    return out.transpose(1, 2)
