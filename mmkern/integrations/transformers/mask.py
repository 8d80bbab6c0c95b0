"""The attention-mask function of "mmkern" (transformers' AttentionMaskInterface, >= 4.53): what mask reaches
mmkern_attention_forward (mmkern/integrations/transformers/attention.py).

It recognises plain causal and bidirectional patterns, and sliding-window causal ones (by probing the mask
function), and returns None when nothing is padded (the kernel's causal flag does the rest, bottom-right
aligned, which is what a KV cache needs: query i sits at key position Lk - Lq + i) or the 2D key-padding
mask (batch, Lk) bool, tagged with the pattern (.mmkern_causal, .mmkern_window), as transformers'
flash-attention path does. Other patterns (packed sequences found from position_ids, image-token overlays,
chunked attention, a StaticCache, whose key slots run past the last query) get transformers' own boolean
4D SDPA mask.
"""
from __future__ import annotations

import torch

from mmkern.integrations.transformers._compat import masking as _masking


def _known_mask_functions() -> dict:
    """The plain mask functions of masking_utils -> is_causal."""
    known = {}
    if _masking is not None:
        for name, causal in (("causal_mask_function", True), ("bidirectional_mask_function", False)):
            fn = getattr(_masking, name, None)
            if fn is not None:
                known[fn] = causal
    return known


def _pattern(mask_function, local_size) -> tuple[bool, int | None] | None:
    """(is_causal, sliding window or None) of a mask function mmkern's kernel expresses by its flags, else None.

    The plain causal / bidirectional functions are recognised by identity; a sliding-window causal
    function (a closure) by probing it on a small index grid: it must equal
    (kv <= q) & (q - kv < window) with window = local_size, transformers' convention."""
    known = _known_mask_functions()
    if mask_function in known:
        return known[mask_function], None
    if not isinstance(local_size, int) or isinstance(local_size, bool) or local_size < 1:
        return None
    n = local_size + 3
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    try:
        got = mask_function(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), q_idx, kv_idx)
        got = torch.as_tensor(got).expand(n, n)
    except Exception:  # a function that indexes tensors (packed sequences, image tokens): not a plain pattern
        return None
    want = (kv_idx <= q_idx) & (q_idx - kv_idx < local_size)
    return (True, local_size) if torch.equal(got.to(torch.bool), want) else None


def _compiling() -> bool:
    """True while dynamo traces (torch.compile): no data-dependent Python branches then."""
    return torch.compiler.is_compiling()


def mmkern_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, allow_is_causal_skip=True, cache_position=None, local_size=None, **kwargs):
    """transformers' AttentionMaskInterface entry for "mmkern" (transformers calls it, from create_causal_mask
    and create_bidirectional_mask; the arguments are sdpa_mask's).

    Arguments:
        batch_size: int.
        q_length, kv_length: ints: the number of queries and of key slots (transformers 4.53 - 4.5x pass
            cache_position instead of q_length / q_offset).
        q_offset, kv_offset: ints: the absolute position of the first query and of the first key.
        mask_function: transformers' mask function (batch_idx, head_idx, q_idx, kv_idx) -> bool; None: causal.
        attention_mask: None, or (batch, >= kv_offset + kv_length) int or bool, 1/True = a real token.
        allow_is_causal_skip: passed on to transformers' sdpa_mask when it builds the mask.
        cache_position: None, or (q_length,) int64: the queries' absolute positions (transformers < 4.5x).
        local_size: None, or the sliding window (int >= 1) of a sliding-window causal mask_function.
        kwargs: passed on to sdpa_mask (device, ...).
    Return:
        None (no padding: the kernel's causal flag, or nothing, is the whole mask); or the key-padding mask
        (batch, kv_length) bool, True = a real key, tagged .mmkern_causal (bool) and .mmkern_window (int or
        None); or, for patterns a padding mask cannot express, transformers' own boolean 4D SDPA mask
        (batch, 1, q_length, kv_length). The kernel aligns the last query with the last key, so a causal
        pattern takes the padding path only when q_offset + q_length == kv_offset + kv_length (a DynamicCache).
    """
    if q_length is None and cache_position is not None:  # transformers 4.53 - 4.5x pass cache_position
        q_length, q_offset = cache_position.shape[0], int(cache_position[0]) if cache_position.numel() else 0
    if mask_function is None and _masking is not None:
        mask_function = _masking.causal_mask_function
    pattern = _pattern(mask_function, local_size)
    # Under torch.compile the key-padding fast path (which reads the mask's values: padding.all(), and the
    # varlen packing's nonzero / max lengths) would break the graph; transformers' own SDPA mask is built
    # without host reads, and the attention function runs it as a dense masked attention.
    aligned = not _compiling() and pattern is not None and isinstance(q_offset, int) and \
        isinstance(kv_offset, int) and (
            (not pattern[0] and kv_offset == 0) or (pattern[0] and q_offset + q_length == kv_offset + kv_length))
    if not aligned:
        sdpa_kwargs = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                           mask_function=mask_function, attention_mask=attention_mask,
                           allow_is_causal_skip=allow_is_causal_skip, local_size=local_size, **kwargs)
        if cache_position is not None:
            sdpa_kwargs["cache_position"] = cache_position
        else:
            sdpa_kwargs.update(q_length=q_length, q_offset=q_offset)
        return _masking.sdpa_mask(**sdpa_kwargs)
    causal, window = pattern
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    if attention_mask is None:
        if window is None:
            return None
        padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        # keys kv_offset .. kv_offset + kv_length - 1 of the 2D mask, False past its end
        padding = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        if padding.shape[-1] < kv_length:
            padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]), value=False)
        if window is None and bool(padding.all()):
            return None
    # The pattern travels with the mask: some models (GPT-2 in transformers 4.5x) pass is_causal=False
    # whenever a mask is given (SDPA's convention for a mask that already holds causality), and a
    # sliding window must reach the kernel even when nothing is padded.
    padding.mmkern_causal = causal
    padding.mmkern_window = window
    return padding
