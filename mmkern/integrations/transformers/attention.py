"""The attention function of "mmkern" (transformers' AttentionInterface): query, key, value and the mask
from mmkern_mask (mask.py) or the model's own, run on mmkern's kernels.

  * no mask: flash_attn_func with the layer's causal flag and sliding window;
  * a 2D key-padding mask: a packed varlen batch (cu_seqlens) for flash_attn_varlen_func: bidirectional
    layers keep every query and pack only the valid keys (the output equals SDPA's key-padding mask at
    every position, padded queries included); causal or windowed layers pack the valid queries and keys
    (padded query rows come out 0: they see nothing, or garbage, in the unpatched model and no valid token
    ever reads them); transformers 4.x "extended" masks of shape (batch, 1, 1, Lk) are key-padding masks
    too, and so are its (batch, 1, Lq, Lk) masks (GPT-2 in 4.5x) when they hold causal & key padding and
    nothing else;
  * a StaticCache's keys run past the last query: a causal layer whose rows are contiguous runs of keys
    (a left pad, then the tokens seen, then unused slots) reaches the KV-cache kernel,
    mmkern.flash_attn_with_kvcache with cache_leftpad (each row's first real key) and cache_seqlens (one past
    its last), causal: no dense mask and no gather of the cache. Transformers 5.x's mask comes from mmkern_mask
    (a 2D mask tagged .mmkern_cache); a 4D mask (transformers 4.x's GPT-2, or transformers' boolean mask) is
    recognised when it equals that pattern. Padded queries (a left pad's positions at prefill) see no key and
    come out 0 there: no real token reads them. Where that kernel cannot run (dropout, gradients: it is for
    inference; a forced backend without cache_leftpad) the same bounds become a boolean mask for
    mmkern.scaled_dot_product_attention;
  * any other 4D mask (transformers' boolean mask for an irregular pattern, a user's additive float mask):
    mmkern.scaled_dot_product_attention.
Dropout, scaling, GQA/MQA (unrepeated k/v), sliding windows and softcap pass through as the model gives
them. What mmkern cannot take raises a ValueError naming the layer: a head_mask, a learned position bias,
attention sinks, output_attentions=True, softcap with a 4D mask, a sliding window with padding in the
middle of a sequence.
"""
from __future__ import annotations

import torch
from torch import nn

import mmkern
from mmkern.integrations.transformers.mask import _compiling


def _layer_name(module) -> str:
    return getattr(module, "_mmkern_name", None) or f"{type(module).__name__}(layer_idx={getattr(module, 'layer_idx', '?')})"


_UNSUPPORTED_KWARGS = {
    "head_mask": "a head_mask (per-head output scaling)",
    "position_bias": "a learned attention bias (position_bias)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
}


def _check_kwargs(module, kwargs, dropout):
    for key, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"mmkern attention in {_layer_name(module)}: {what} is not supported by mmkern's kernels; "
                             f"use attn_implementation='sdpa' or 'eager' for this model")
    if kwargs.get("output_attentions"):
        raise ValueError(f"mmkern attention in {_layer_name(module)}: output_attentions=True needs the attention "
                         f"probabilities, which mmkern's fused kernels never materialise; use 'eager'")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"mmkern attention in {_layer_name(module)}: dropout must be in [0, 1), got {dropout!r}")


def _window(module, sliding_window, causal):
    """transformers' sliding_window w (a query sees the w - 1 keys before it) -> flash-attn's window_size."""
    if sliding_window is None:
        return (-1, -1)
    if not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"mmkern attention in {_layer_name(module)}: sliding_window must be an int >= 1, "
                         f"got {sliding_window!r}")
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def _cu_seqlens(counts: torch.Tensor) -> torch.Tensor:
    """(batch,) lengths -> (batch + 1,) int32 offsets starting at 0."""
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def _varlen_with_padding(module, q, k, v, padding, causal, window, **kw):
    """q (B, Lq, H, D), k/v (B, Lk, H_kv, D), padding (B, Lk) bool (True = a real token) -> (B, Lq, H, D).

    Valid keys are gathered into one packed (total_k, H_kv, D) batch; bidirectional layers keep all
    B * Lq queries (each sequence: Lq queries against its own valid keys), causal / windowed layers
    keep the valid queries only, so the kernel's bottom-right causal alignment (query i = key
    Lk - Lq + i) holds in packed coordinates. Traffic: one gather of k, v (and q), one scatter of out.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if padding.shape != (B, Lk):
        raise ValueError(f"mmkern attention in {_layer_name(module)}: the padding mask has shape "
                         f"{tuple(padding.shape)}, expected (batch, kv_length) = {(B, Lk)}")
    padding = padding.to(q.device)
    key_idx = padding.reshape(-1).nonzero().squeeze(1)
    k_counts = padding.sum(1)
    kp = k.reshape(B * Lk, *k.shape[2:]).index_select(0, key_idx)
    vp = v.reshape(B * Lk, *v.shape[2:]).index_select(0, key_idx)
    # One query (a decode step) is kept even where its own key slot is False: with a StaticCache the slots past
    # it are unused (so slot Lk - 1 is not its position), and one query sees its row's valid keys either way.
    packed_queries = (causal or window != (-1, -1)) and Lq > 1
    if packed_queries:
        q_padding = padding[:, Lk - Lq:]
        if window != (-1, -1):
            # packed distances equal true distances only when each row's real tokens are contiguous
            first = q_padding.float().argmax(1)
            span = q_padding.sum(1)
            positions = torch.arange(Lq, device=q.device)
            contiguous = (q_padding == ((positions >= first[:, None]) & (positions < (first + span)[:, None]))).all()
            if not bool(contiguous):
                raise ValueError(f"mmkern attention in {_layer_name(module)}: a sliding window with padding in the "
                                 f"middle of a sequence is not supported (pad on the left or on the right)")
        query_idx = q_padding.reshape(-1).nonzero().squeeze(1)
        q_counts = q_padding.sum(1)
        qp = q.reshape(B * Lq, H, D).index_select(0, query_idx)
    else:
        q_counts = torch.full((B,), Lq, dtype=k_counts.dtype, device=q.device)
        qp = q.reshape(B * Lq, H, D)
    max_q = int(q_counts.max()) if B else 0
    max_k = int(k_counts.max()) if B else 0
    out = mmkern.flash_attn_varlen_func(qp, kp, vp, _cu_seqlens(q_counts), _cu_seqlens(k_counts), max_q, max_k,
                                        causal=causal, window_size=window, **kw)
    if packed_queries:
        out = out.new_zeros(B * Lq, H, out.shape[-1]).index_copy(0, query_idx, out)
    return out.reshape(B, Lq, H, out.shape[-1])


def _cache_bounds(kept: torch.Tensor):
    """(leftpad, seqused) (batch,) int32 when kept (B, Lq, Lk) bool is a KV cache's causal mask with bounds:
    query i of row b sees keys leftpad[b] .. seqused[b] - Lq + i; else None. The bounds are read off the last
    query row (its first and last kept key); query rows that see no key under them (a left pad's positions)
    may be all dropped or all kept (transformers unmasks fully masked rows for SDPA on a GPU)."""
    B, Lq, Lk = kept.shape
    keys = kept[:, -1, :]
    j = torch.arange(Lk, device=kept.device)
    has = keys.any(1)
    leftpad = torch.where(has, torch.where(keys, j, Lk).amin(1), 0)
    seqused = torch.where(has, torch.where(keys, j, -1).amax(1) + 1, 0)
    last = seqused[:, None] - Lq + torch.arange(Lq, device=kept.device)        # (B, Lq): each query's last key
    want = (j >= leftpad[:, None, None]) & (j <= last[:, :, None])
    sees = (last >= leftpad[:, None])[:, :, None]
    uniform = (kept.all(2) | ~kept.any(2))[:, :, None]
    if not bool(torch.where(sees, kept == want, uniform).all()):
        return None
    return leftpad.to(torch.int32), seqused.to(torch.int32)


def _bounds_mask(leftpad, seqused, Lq: int, Lk: int, window) -> torch.Tensor:
    """The (B, 1, Lq, Lk) bool mask (True = keep) of KV-cache bounds: query i of row b sees keys leftpad[b] ..
    seqused[b] - Lq + i (and, with a window (left, right), none more than left before that)."""
    j = torch.arange(Lk, device=leftpad.device)
    last = (seqused.long()[:, None] - Lq + torch.arange(Lq, device=leftpad.device))[:, :, None]
    keep = (j >= leftpad.long()[:, None, None]) & (j <= last)
    if window[0] >= 0:
        keep = keep & (j >= last - window[0])
    return keep[:, None]


def _with_cache_bounds(module, q, k, v, leftpad, seqused, window, kw):
    """q (B, Lq, H, D), k/v (B, Lk, H_kv, D) (the whole cache, flash-attn's layout), the bounds (batch,) int32
    -> (B, Lq, H, D): causal attention of query i of row b to cache slots leftpad[b] .. seqused[b] - Lq + i.

    On mmkern.flash_attn_with_kvcache (cache_leftpad, cache_seqlens; nothing appended: transformers has written
    the new keys). That kernel is for inference: with dropout, with gradients, or where the forced backend
    cannot take cache_leftpad (NoBackendError), the bounds become a boolean mask for
    mmkern.scaled_dot_product_attention instead (padded queries: out 0 either way)."""
    inference = not kw["dropout_p"] and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    if inference:
        try:
            return mmkern.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqused, cache_leftpad=leftpad,
                                                  softmax_scale=kw["softmax_scale"], causal=True,
                                                  window_size=window, softcap=kw["softcap"])
        except mmkern.NoBackendError:
            pass
    if kw["softcap"]:
        raise ValueError(f"mmkern attention in {_layer_name(module)}: softcap over a StaticCache is supported in "
                         f"inference only (no dropout, no gradients)")
    mask = _bounds_mask(leftpad, seqused, q.shape[1], k.shape[1], window)
    out = mmkern.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, dropout_p=kw["dropout_p"], scale=kw["softmax_scale"],
                                              enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _kept(mask: torch.Tensor) -> torch.Tensor | None:
    """A 4D mask as True = keep: bool as is; float when every entry is 0 (keep) or at most finfo.min / 2
    (drop, transformers 4.x's convention), else None (a real additive bias)."""
    if mask.dtype == torch.bool:
        return mask
    dropped = mask <= torch.finfo(mask.dtype).min / 2
    return ~dropped if bool(((mask == 0) | dropped).all()) else None


def _as_key_padding(mask: torch.Tensor, kv_length: int):
    """A 4D mask that is key padding, optionally with causality, or KV-cache bounds -> (padding, cache):
    padding (B, Lk) bool (True = keep), tagged .mmkern_causal = True when the mask holds causality, or None;
    cache (leftpad, seqused, Lq) (see _cache_bounds; Lq = the mask's query rows) or None.

    (B, 1, 1, Lk) keeps or drops whole keys (older models' "extended" masks). (B, 1, Lq, Lk), as transformers
    4.x's GPT-2 builds it, is recognised when it equals key padding alone (every row the same) or causal
    (bottom-right aligned) & key padding, the key padding read off its last row, which sees every key.
    KV-cache bounds are looked for where the bottom-right reading fails (Lq > 1) or cannot tell (Lq = 1: one
    query row), and kept when some row's keys end before the last slot (a StaticCache's unused slots).
    Only the first kv_length keys count (4.x may build the mask for more key slots than there are keys).
    The answer is kept on the mask (models pass one mask object to every layer: one check per forward)."""
    known = mask.__dict__.setdefault("mmkern_padding", {})
    if kv_length in known:
        return known[kv_length]
    padding = cache = None
    if mask.shape[1] == 1 and kv_length > 0:
        kept = _kept(mask[:, 0, :, :kv_length])
        if kept is not None:
            Lq, Lk = kept.shape[1:]
            keys = kept[:, -1, :]                                  # (B, Lk)
            causal = torch.ones(Lq, Lk, dtype=torch.bool, device=kept.device).tril(Lk - Lq)
            if Lq == 1 or bool((kept == keys[:, None, :]).all()):
                padding = keys                      # no causality in the mask: the module's own flag decides
            elif bool((kept == (causal & keys[:, None, :])).all()):
                padding = keys
                padding.mmkern_causal = True
            if Lq == 1 or padding is None:
                bounds = _cache_bounds(kept)
                if bounds is not None and bool((bounds[1] < Lk).any()):
                    cache = (*bounds, Lq)
    if padding is not None:
        padding.mmkern_nothing_padded = bool(padding.all())
    known[kv_length] = padding, cache
    return padding, cache


def mmkern_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs):
    """transformers' AttentionInterface entry for "mmkern" (transformers' attention layers call it).

    Arguments:
        module: the calling attention layer (its is_causal and _mmkern_name / layer_idx are read).
        query: (batch, heads, q_length, head_dim), a float dtype (transformers' layout).
        key, value: (batch, kv_heads, kv_length, head_dim), query's dtype; kv_heads divides heads (GQA/MQA run
            without repeating k/v).
        attention_mask: None; a key-padding mask (batch, kv_length) bool from mmkern_mask, True = a real key
            (tagged .mmkern_cache = (leftpad, seqused, q_length) for a StaticCache: run on the KV-cache kernel);
            a transformers 4.x mask (batch, 1, 1, kv_length) or (batch, 1, q_length, >= kv_length), float
            (0 = keep, <= finfo.min / 2 = drop: read as key padding, with or without causality, when it is
            that) or bool (True = keep); or any other 4D mask, bool or additive float (run densely).
        dropout: a float in [0, 1): attention dropout (the model passes 0 in eval mode).
        scaling: None (1 / sqrt(head_dim)) or the float softmax scale.
        is_causal: None (the module's is_causal), or bool. A key-padding mask's own .mmkern_causal wins.
        sliding_window: None, or an int >= 1 (a query sees the sliding_window - 1 keys before it).
        softcap: None or 0 (off), or a float > 0: scores -> softcap * tanh(scores / softcap).
        kwargs: the model's other arguments; head_mask, position_bias, s_aux, sinks and output_attentions=True
            raise a ValueError (mmkern cannot take them).
    Return:
        (out, None): out (batch, q_length, heads, head_dim) in query's dtype, and no attention weights, as every
        transformers attention function.
    """
    _check_kwargs(module, kwargs, dropout)
    module_causal = bool(getattr(module, "is_causal", False))
    causal = bool(is_causal if is_causal is not None else module_causal)
    cache = None  # KV-cache bounds (leftpad, seqused): a StaticCache's causal mask
    if attention_mask is not None and attention_mask.dim() == 4 and not _compiling():
        padding, cache = _as_key_padding(attention_mask, key.shape[2])
        if cache is not None and cache[2] == query.shape[2]:
            attention_mask = None
        elif padding is not None:  # transformers 4.x masks that are key padding (+ causality): 0 = keep, min = drop
            cache = None
            causal = bool(is_causal) or module_causal or bool(getattr(padding, "mmkern_causal", False))
            attention_mask = None if padding.mmkern_nothing_padded else padding
        else:
            cache = None
    elif attention_mask is not None and attention_mask.dim() == 2:
        cache = getattr(attention_mask, "mmkern_cache", None)  # mmkern_mask's StaticCache bounds
        if cache is not None and (cache[2] != query.shape[2] or attention_mask.shape != (query.shape[0], key.shape[2])):
            raise ValueError(f"mmkern attention in {_layer_name(module)}: the StaticCache mask is for "
                             f"{cache[2]} queries and {attention_mask.shape[-1]} key slots; got {query.shape[2]} "
                             f"queries and {key.shape[2]} keys")
    if attention_mask is not None and attention_mask.dim() == 2:
        # a key-padding mask holds no causality: take it from the mask function that built it (mmkern_mask),
        # else from the module, whatever an SDPA-minded caller passed as is_causal
        causal = getattr(attention_mask, "mmkern_causal", None)
        if causal is None:
            causal = bool(is_causal) or module_causal
        if sliding_window is None:
            sliding_window = getattr(attention_mask, "mmkern_window", None)
    H, H_kv = query.shape[1], key.shape[1]
    if H % H_kv:
        raise ValueError(f"mmkern attention in {_layer_name(module)}: {H} query heads are not a multiple of "
                         f"{H_kv} key/value heads")
    kw = dict(dropout_p=float(dropout), softmax_scale=None if scaling is None else float(scaling),
              softcap=float(softcap or 0.0))
    if attention_mask is not None and attention_mask.dim() == 4:
        # a 4D mask: transformers' boolean mask for an irregular pattern, or a user's additive float mask
        if softcap:
            raise ValueError(f"mmkern attention in {_layer_name(module)}: softcap together with a 4D attention "
                             f"mask is not supported")
        mask = attention_mask[:, :, :, :key.shape[2]]
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
        out = mmkern.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=kw["dropout_p"],
                                                  scale=kw["softmax_scale"], enable_gqa=H != H_kv)
        return out.transpose(1, 2), None
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, heads, D): flash-attn's layout
    if cache is not None:
        return _with_cache_bounds(module, q, k, v, cache[0], cache[1], _window(module, sliding_window, True), kw), None
    window = _window(module, sliding_window, causal)
    if attention_mask is None:
        out = mmkern.flash_attn_func(q, k, v, causal=causal, window_size=window, **kw)
    elif attention_mask.dim() == 2:
        out = _varlen_with_padding(module, q, k, v, attention_mask.to(torch.bool), causal, window, **kw)
    else:
        raise ValueError(f"mmkern attention in {_layer_name(module)}: attention_mask must be None, a 2D key-padding "
                         f"mask or a 4D mask; got shape {tuple(attention_mask.shape)}")
    return out, None
