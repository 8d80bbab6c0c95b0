"""The attention-mask function of "mmkern" (transformers' AttentionMaskInterface, >= 4.53): what mask reaches
mmkern_attention_forward (mmkern/integrations/transformers/attention.py).

It recognises plain causal and bidirectional patterns, and sliding-window causal ones (by probing the mask
function), and returns None when nothing is padded (the kernel's causal flag does the rest, bottom-right
aligned, which is what a KV cache needs: query i sits at key position Lk - Lq + i) or the 2D key-padding
mask (batch, Lk) bool, tagged with the pattern (.mmkern_causal, .mmkern_window), as transformers'
flash-attention path does.

A StaticCache (cache_implementation="static") holds more key slots than tokens seen: its keys run past the
last query, which the kernel's bottom-right causal flag alone cannot express. For a plain causal layer whose
padding is a contiguous left pad (or nothing) the mask function returns the same kind of 2D mask, also
tagged with the cache bounds .mmkern_cache = (leftpad, seqused, q_length), leftpad and seqused (batch,) int32:
row b's keys are cache slots leftpad[b] .. seqused[b] - 1 (seqused = the position after the last query, the
same for every row; the slots after it are unused), which the attention function hands to the KV-cache kernel
(flash_attn_with_kvcache's cache_leftpad / cache_seqlens: no dense mask, no gather). Deciding that the
padding is a contiguous left pad reads one bool on the host per forward (all layers share the mask).

Other patterns (packed sequences found from position_ids, image-token overlays, chunked attention, padding
in the middle of a sequence with a StaticCache, sliding-window layers of a static cache, anything while
torch.compile traces) get transformers' own boolean 4D SDPA mask.
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


def _static_cache_padding(batch_size: int, q_length: int, q_offset, kv_length: int, attention_mask, device):
    """The 2D mask of a causal layer over a StaticCache's kv_length slots, tagged with the cache bounds, or None
    when its padding is not a contiguous left pad.

    q_offset: int or a 0-dim int tensor (transformers 5.x's StaticLayer gives its length as a tensor, on the
    model's device): the queries are positions q_offset .. end - 1, end = q_offset + q_length, and slots from
    end on are unused (a causal query never sees them). Keys of row b: the 2D mask's real tokens before end
    (missing columns count as padding), which must be slots leftpad[b] .. end - 1. Everything is computed on
    the mask's device; the one host read is the verdict (contiguous left pad, end <= kv_length)."""
    positions = torch.arange(kv_length, device=device)
    end = q_offset + q_length
    if isinstance(end, torch.Tensor):
        end = end.to(device)
    seen = positions < end                                          # (kv_length,): slots written so far
    if attention_mask is None:
        valid = seen.expand(batch_size, kv_length)
    else:
        valid = attention_mask[:, :kv_length].to(device=device, dtype=torch.bool)
        if valid.shape[-1] < kv_length:
            valid = torch.nn.functional.pad(valid, (0, kv_length - valid.shape[-1]), value=False)
        valid = valid & seen
    leftpad = ((valid.cumsum(1) == 0) & seen).sum(1)                # leading pads (all of seen for an empty row)
    ok = (valid == ((positions >= leftpad[:, None]) & seen)).all()
    if isinstance(end, torch.Tensor):
        ok = ok & (end <= kv_length)
    if not bool(ok):  # padding in the middle (or on the right) of a sequence: transformers' mask
        return None
    padding = valid.clone() if attention_mask is None else valid
    padding.mmkern_causal = True
    padding.mmkern_window = None
    padding.mmkern_cache = (leftpad.to(torch.int32), torch.zeros(batch_size, dtype=torch.int32, device=device) + end,
                            q_length)
    return padding


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
        q_offset, kv_offset: ints: the absolute position of the first query and of the first key (q_offset is a
            0-dim int tensor for a StaticCache in transformers 5.x).
        mask_function: transformers' mask function (batch_idx, head_idx, q_idx, kv_idx) -> bool; None: causal.
        attention_mask: None, or (batch, >= kv_offset + kv_length) int or bool, 1/True = a real token.
        allow_is_causal_skip: passed on to transformers' sdpa_mask when it builds the mask.
        cache_position: None, or (q_length,) int64: the queries' absolute positions (transformers < 4.5x).
        local_size: None, or the sliding window (int >= 1) of a sliding-window causal mask_function.
        kwargs: passed on to sdpa_mask (device, ...).
    Return:
        None (no padding: the kernel's causal flag, or nothing, is the whole mask); or the key-padding mask
        (batch, kv_length) bool, True = a real key, tagged .mmkern_causal (bool) and .mmkern_window (int or
        None); for a StaticCache (plain causal, kv_offset 0, q_offset + q_length < kv_length or q_offset a
        tensor) with a contiguous left pad, that mask also tagged .mmkern_cache = (leftpad, seqused, q_length)
        (see the module's docstring); or, for patterns these cannot express, transformers' own boolean 4D
        SDPA mask (batch, 1, q_length, kv_length). The kernel aligns the last query with the last key, so a
        causal pattern takes the plain padding path only when q_offset + q_length == kv_offset + kv_length (a
        DynamicCache).
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
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    # a StaticCache: plain causal, keys from slot 0, slots past the last query (q_offset a tensor: StaticLayer)
    static = not aligned and not _compiling() and pattern == (True, None) and kv_offset == 0 and (
        (isinstance(q_offset, torch.Tensor) and q_offset.dim() == 0 and not q_offset.is_floating_point()) or
        (isinstance(q_offset, int) and q_offset + q_length < kv_length))
    if static:
        padding = _static_cache_padding(batch_size, q_length, q_offset, kv_length, attention_mask, device)
        if padding is not None:
            return padding
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
