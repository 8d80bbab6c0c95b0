"""mmkern inside Hugging Face transformers: an attention implementation named "mmkern", and apply_mmkern.

    import mmkern.integrations.transformers as mmt
    model = GPT2LMHeadModel(config)            # or from_pretrained(..., attn_implementation="mmkern")
    mmt.apply_mmkern(model)                    # fused residual + LayerNorm, and attention through mmkern

Importing this module registers "mmkern" with transformers' AttentionInterface (the attention
function every model with `ALL_ATTENTION_FUNCTIONS` calls) and with its AttentionMaskInterface (the
function `create_causal_mask` / `create_bidirectional_mask` call to build the mask that reaches it).

How masks reach the kernel (no dense seqlen x seqlen bias for padding):
  * the mask function recognises plain causal and bidirectional patterns, and sliding-window causal
    ones (by probing the mask function), and returns None when nothing is padded (the kernel's causal
    flag does the rest, bottom-right aligned, which is what a KV cache needs: query i sits at key
    position Lk - Lq + i) or the 2D key-padding mask (batch, Lk) bool, tagged with the pattern, as
    transformers' flash-attention path does;
  * the attention function turns a 2D mask into a packed varlen batch (cu_seqlens) for
    flash_attn_varlen_func: bidirectional layers keep every query and pack only the valid keys
    (the output equals SDPA's key-padding mask at every position, padded queries included);
    causal or windowed layers pack the valid queries and keys (padded query rows come out 0: they
    see nothing, or garbage, in the unpatched model and no valid token ever reads them);
    transformers 4.x "extended" masks of shape (batch, 1, 1, Lk) are key-padding masks too, and so are its
    (batch, 1, Lq, Lk) masks (GPT-2 in 4.5x) when they hold causal & key padding and nothing else;
  * other patterns (packed sequences found from position_ids, image-token overlays, chunked
    attention, a StaticCache, whose key slots run past the last query) fall back to transformers'
    boolean 4D mask, run by mmkern.scaled_dot_product_attention; a user's 4D float mask is added to
    the scores there.
The transformers cache (DynamicCache, sliding-window layers, StaticCache) keeps the keys and values;
the kernels attend to what it returns. Dropout, scaling, GQA/MQA (unrepeated k/v), sliding windows
and softcap pass through as the model gives them. What mmkern cannot take raises a ValueError naming
the layer: a head_mask, a learned position bias, attention sinks, output_attentions=True, softcap
with a 4D mask, a sliding window with padding in the middle of a sequence.

apply_mmkern(model) also swaps, in place and keeping every state_dict key:
  * BERT (BertSelfOutput, BertOutput): LayerNorm(dropout(dense(h)) + input) -> one fused
    mmkern.layer_norm_residual(dense(h), input, dropout_p=hidden_dropout_prob) (its LayerNorm becomes
    mmkern.nn.LayerNormResidual: same `weight`/`bias` parameters);
  * GPT-2 (GPT2Block, ln_f): the pre-norm residual stream
        h = attn(ln_1(x)) + x;  y = ln_2(h)            ->   y, h = layer_norm_residual(attn_out, x, prenorm=True)
    with the attention's residual dropout fused in (attn.resid_dropout becomes nn.Identity; its p moves
    to ln_2), and ln_f / ln_1 on mmkern's norm.
On transformers 4.5x (where BERT calls torch's SDPA itself) BERT's encoder self-attention gets an
mmkern forward instead; models whose attention calls neither get a ValueError at apply_mmkern.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

import transformers  # ImportError here when transformers is missing: the integration needs it

import mmkern
from mmkern.nn import LayerNormResidual

try:
    from transformers import AttentionInterface
except ImportError:  # transformers < 4.48: no pluggable attention
    AttentionInterface = None
try:
    from transformers import masking_utils as _masking
except ImportError:  # transformers < 4.53: models build their own 4D masks
    _masking = None

NAME = "mmkern"
SUPPORTED = {
    "bert": "BertModel, BertForMaskedLM and the other Bert* heads",
    "gpt2": "GPT2Model, GPT2LMHeadModel and the other GPT2* heads",
}


def _layer_name(module) -> str:
    return getattr(module, "_mmkern_name", None) or f"{type(module).__name__}(layer_idx={getattr(module, 'layer_idx', '?')})"


# --------------------------------------------------------------------------- the mask interface

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
    """transformers' AttentionMaskInterface entry for "mmkern".

    Returns None (no padding: the kernel's causal flag, or nothing, is the whole mask), the 2D
    key-padding mask (batch, kv_length) bool tagged with the pattern (.mmkern_causal,
    .mmkern_window), or, for patterns a padding mask cannot express, transformers' own boolean 4D
    SDPA mask. attention_mask: (batch, >= kv_offset + kv_length), 1/True = a real token.
    Queries q_offset .. q_offset + q_length - 1 and keys kv_offset .. kv_offset + kv_length - 1 are
    absolute positions; the kernel aligns the last query with the last key, so a causal pattern
    takes the fast path only when q_offset + q_length == kv_offset + kv_length (a DynamicCache).
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


# --------------------------------------------------------------------------- the attention function

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
    packed_queries = causal or window != (-1, -1)
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


def _kept(mask: torch.Tensor) -> torch.Tensor | None:
    """A 4D mask as True = keep: bool as is; float when every entry is 0 (keep) or at most finfo.min / 2
    (drop, transformers 4.x's convention), else None (a real additive bias)."""
    if mask.dtype == torch.bool:
        return mask
    dropped = mask <= torch.finfo(mask.dtype).min / 2
    return ~dropped if bool(((mask == 0) | dropped).all()) else None


def _as_key_padding(mask: torch.Tensor, kv_length: int) -> torch.Tensor | None:
    """A 4D mask that is key padding, optionally with causality -> (B, Lk) bool (True = keep), tagged
    .mmkern_causal = True when the mask holds causality; else None.

    (B, 1, 1, Lk) keeps or drops whole keys (older models' "extended" masks). (B, 1, Lq, Lk), as transformers
    4.x's GPT-2 builds it, is recognised when it equals key padding alone (every row the same) or causal
    (bottom-right aligned) & key padding, the key padding read off its last row, which sees every key.
    Only the first kv_length keys count (4.x may build the mask for more key slots than there are keys).
    The answer is kept on the mask (models pass one mask object to every layer: one check per forward)."""
    known = mask.__dict__.setdefault("mmkern_padding", {})
    if kv_length in known:
        return known[kv_length]
    padding = None
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
    if padding is not None:
        padding.mmkern_nothing_padded = bool(padding.all())
    known[kv_length] = padding
    return padding


def mmkern_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs):
    """transformers' AttentionInterface entry for "mmkern".

    query (B, H, Lq, D), key/value (B, H_kv, Lk, D) (H_kv divides H: GQA/MQA run without repeating
    k/v). Returns (out (B, Lq, H, D), None), as every transformers attention function.
    """
    _check_kwargs(module, kwargs, dropout)
    module_causal = bool(getattr(module, "is_causal", False))
    causal = bool(is_causal if is_causal is not None else module_causal)
    if attention_mask is not None and attention_mask.dim() == 4 and not _compiling():
        padding = _as_key_padding(attention_mask, key.shape[2])
        if padding is not None:  # transformers 4.x masks that are key padding (+ causality): 0 = keep, min = drop
            causal = bool(is_causal) or module_causal or bool(getattr(padding, "mmkern_causal", False))
            attention_mask = None if padding.mmkern_nothing_padded else padding
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
    window = _window(module, sliding_window, causal)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, heads, D): flash-attn's layout
    if attention_mask is None:
        out = mmkern.flash_attn_func(q, k, v, causal=causal, window_size=window, **kw)
    elif attention_mask.dim() == 2:
        out = _varlen_with_padding(module, q, k, v, attention_mask.to(torch.bool), causal, window, **kw)
    else:
        raise ValueError(f"mmkern attention in {_layer_name(module)}: attention_mask must be None, a 2D key-padding "
                         f"mask or a 4D mask; got shape {tuple(attention_mask.shape)}")
    return out, None


def register() -> None:
    """Register "mmkern" with transformers' attention (and, where it exists, attention-mask) interface."""
    if AttentionInterface is None:
        raise ImportError(f"mmkern.integrations.transformers needs transformers >= 4.48 (AttentionInterface); "
                          f"found {transformers.__version__}")
    AttentionInterface.register(NAME, mmkern_attention_forward)
    if _masking is not None and hasattr(_masking, "AttentionMaskInterface"):
        _masking.AttentionMaskInterface.register(NAME, mmkern_mask)


register()


# --------------------------------------------------------------------------- the fused residual + norm modules

def _fused_norm(ln: nn.LayerNorm, dropout_p: float, prenorm: bool) -> LayerNormResidual:
    """An mmkern LayerNormResidual holding ln's very parameters (same names: state_dict keys unchanged)."""
    if not isinstance(ln, nn.LayerNorm):
        raise ValueError(f"apply_mmkern: expected a torch.nn.LayerNorm, found {type(ln).__name__}")
    fused = LayerNormResidual(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                              bias=ln.bias is not None, dropout_p=dropout_p, prenorm=prenorm,
                              device=ln.weight.device if ln.weight is not None else None,
                              dtype=ln.weight.dtype if ln.weight is not None else None)
    fused.weight, fused.bias = ln.weight, ln.bias
    fused.train(ln.training)
    return fused


def _legacy_bert_self_attention_forward(self, hidden_states, attention_mask=None, head_mask=None,
                                        encoder_hidden_states=None, encoder_attention_mask=None, past_key_value=None,
                                        output_attentions=False, **kwargs):
    """BERT self-attention of transformers 4.x (which calls torch's SDPA itself, not AttentionInterface):
    the encoder case (no cache, no cross-attention), on mmkern. Returns (out (B, L, hidden), None).

    The positional parameters are BertSelfAttention.forward's of 4.5x, in its order: BertAttention calls it
    positionally (hidden_states, attention_mask, head_mask, encoder_hidden_states, encoder_attention_mask,
    past_key_value, output_attentions); later 4.x also pass past_key_values / cache_position by keyword."""
    cache = past_key_value if past_key_value is not None else kwargs.get("past_key_values")
    for value, what in ((head_mask, "a head_mask"), (encoder_hidden_states, "cross-attention"),
                        (cache, "a KV cache"), (output_attentions or None, "output_attentions=True")):
        if value is not None:
            raise ValueError(f"mmkern attention in {_layer_name(self)}: {what} is not supported for BERT on "
                             f"transformers {transformers.__version__} (encoder self-attention only)")
    B, L, _ = hidden_states.shape
    q, k, v = (lin(hidden_states).view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
               for lin in (self.query, self.key, self.value))
    out, _ = mmkern_attention_forward(self, q, k, v, attention_mask, dropout=self.dropout.p if self.training else 0.0,
                                      is_causal=False)
    return out.reshape(B, L, self.all_head_size), None


def _bert_output_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """LayerNorm(dropout(dense(h)) + input) in one fused kernel (dropout inside LayerNorm, training only)."""
    return self.LayerNorm(self.dense(hidden_states), input_tensor)


_CLASS_CACHE: dict = {}


def _swap_class(module: nn.Module, forward, tag: str) -> None:
    """Give `module` a subclass of its class whose forward is `forward` (isinstance checks still hold)."""
    cls = type(module)
    if getattr(cls, "_mmkern_fused", False):
        return
    key = (cls, tag)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"MMKern{cls.__name__}", (cls,), {"forward": forward, "_mmkern_fused": True,
                                                                    "__module__": cls.__module__})
    module.__class__ = _CLASS_CACHE[key]


def _gpt2_block_layout(block_cls) -> str:
    """What the block returns: 'tensor' (transformers 5: hidden_states), 'weights' (4.5x: (hidden_states,) plus
    the attention weights with output_attentions) or 'present' (older 4.x: (hidden_states, present, ...))."""
    src = inspect.getsource(block_cls.forward)
    if "return hidden_states" in src:
        return "tensor"
    if "outputs = (hidden_states,)\n" in src:
        return "weights"
    if "outputs = (hidden_states,) + outputs[1:]" in src:
        return "present"
    raise ValueError(f"apply_mmkern: transformers {transformers.__version__}'s {block_cls.__name__}.forward has a "
                     f"layout the fused residual + LayerNorm does not know; call apply_mmkern(model, fuse_norms=False) "
                     f"to use mmkern attention only")


def _make_gpt2_block_forward(block_cls):
    signature = inspect.signature(block_cls.forward)
    layout = _gpt2_block_layout(block_cls)

    def forward(self, hidden_states, *args, **kwargs):
        """Pre-norm block: y, h = ln_2(attn(ln_1(x)), residual=x) fused (prenorm=True); out = h + mlp(y)."""
        bound = signature.bind(self, hidden_states, *args, **kwargs)
        named = dict(bound.arguments)
        extra = {}
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                extra = named.pop(name, {})
        for name in ("self", "hidden_states", "encoder_hidden_states", "encoder_attention_mask"):
            named.pop(name, None)
        if bound.arguments.get("encoder_hidden_states") is not None:
            raise ValueError(f"{_layer_name(self)}: mmkern's fused GPT-2 block has no cross-attention")
        attn_out = self.attn(self.ln_1(hidden_states), **named, **extra)
        rest = ()
        if isinstance(attn_out, tuple):
            attn_out, rest = attn_out[0], tuple(attn_out[1:])
        normed, residual = self.ln_2(attn_out, hidden_states)
        out = residual + self.mlp(normed)
        if layout == "tensor":
            return out
        if layout == "weights":
            return (out,) + (rest[:1] if named.get("output_attentions") else ())
        return (out,) + rest if named.get("use_cache") else (out,) + rest[1:]

    return forward


# --------------------------------------------------------------------------- apply_mmkern

def _uses_attention_interface(module: nn.Module) -> bool:
    source = inspect.getsource(sys.modules[type(module).__module__])
    return "ALL_ATTENTION_FUNCTIONS" in source


def _set_attn_implementation(model: nn.Module) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None and getattr(model, "_supports_attention_backend", True):
        setter(NAME)
    else:  # older transformers: the config field is what every layer reads
        model.config._attn_implementation = NAME
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", NAME) != NAME:
            config._attn_implementation = NAME


def _apply_bert(model: nn.Module, fuse_norms: bool) -> None:
    from transformers.models.bert import modeling_bert as mb
    config = model.config
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"apply_mmkern: BERT with position_embedding_type={kind!r} adds relative-position scores "
                         f"inside attention, which mmkern's kernels do not take; only 'absolute' is supported")
    for name, module in list(model.named_modules()):
        if isinstance(module, (mb.BertSelfAttention, getattr(mb, "BertCrossAttention", mb.BertSelfAttention))):
            module._mmkern_name = name
            if not _uses_attention_interface(module) and not getattr(type(module), "_mmkern_fused", False):
                # transformers 4.x: the layer calls torch's SDPA itself; give it an mmkern forward instead
                if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
                    raise ValueError(f"apply_mmkern: {name}: BERT as a decoder on transformers "
                                     f"{transformers.__version__} is not supported (its attention does not call "
                                     f"AttentionInterface); encoder BERT is")
                _swap_class(module, _legacy_bert_self_attention_forward, "legacy_bert_attention")
        if isinstance(getattr(module, "attn_implementation", None), str):
            # transformers 4.x BertModel picks its mask format from this (fixed at construction): with a name
            # other than "sdpa" it builds the (B, 1, 1, L) key-padding mask, which reaches mmkern as varlen
            module.attn_implementation = NAME
        if (fuse_norms and isinstance(module, (mb.BertSelfOutput, mb.BertOutput))
                and not getattr(type(module), "_mmkern_fused", False)):
            module.LayerNorm = _fused_norm(module.LayerNorm, module.dropout.p, prenorm=False)
            _swap_class(module, _bert_output_forward, "bert_output")


def _apply_gpt2(model: nn.Module, fuse_norms: bool) -> None:
    from transformers.models.gpt2 import modeling_gpt2 as mg
    config = model.config
    if getattr(config, "add_cross_attention", False):
        raise ValueError("apply_mmkern: GPT-2 with add_cross_attention=True is not supported (the fused block covers "
                         "self-attention only)")
    for name, module in list(model.named_modules()):
        if isinstance(module, mg.GPT2Attention):
            if not _uses_attention_interface(module):
                raise ValueError(f"apply_mmkern: {name} (GPT2Attention) in transformers {transformers.__version__} "
                                 f"does not call AttentionInterface; mmkern attention needs a newer transformers")
            module._mmkern_name = name
        if fuse_norms and isinstance(module, mg.GPT2Block):
            module._mmkern_name = name
            forward_key = type(module) if not getattr(type(module), "_mmkern_fused", False) else None
            if forward_key is not None:
                block_forward = _make_gpt2_block_forward(forward_key)
                module.ln_1 = _fused_norm(module.ln_1, 0.0, prenorm=False)
                module.ln_2 = _fused_norm(module.ln_2, module.attn.resid_dropout.p, prenorm=True)
                module.attn.resid_dropout = nn.Identity()  # now inside ln_2 (applied in training only)
                _swap_class(module, block_forward, "gpt2_block")
        if fuse_norms and isinstance(module, mg.GPT2Model) and isinstance(module.ln_f, nn.LayerNorm):
            module.ln_f = _fused_norm(module.ln_f, 0.0, prenorm=False)


def apply_mmkern(model: nn.Module, *, fuse_norms: bool = True) -> nn.Module:
    """Run `model` (a transformers BERT or GPT-2, any head) on mmkern, in place; returns it.

    Sets its attention implementation to "mmkern" and, with fuse_norms=True, replaces the residual
    add + LayerNorm of every block with mmkern's fused op. Parameters are reused, not copied:
    state_dict keys and values are unchanged, so checkpoints load either way and the optimiser keeps
    its parameters. Raises ValueError for other architectures (naming the supported ones) and for
    layouts mmkern cannot run.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        supported = "; ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        raise ValueError(f"apply_mmkern: {type(model).__name__} (model_type={model_type!r}) is not supported; "
                         f"supported architectures: {supported}")
    if model_type == "bert":
        _apply_bert(model, fuse_norms)
    else:
        _apply_gpt2(model, fuse_norms)
    _set_attn_implementation(model)
    return model


__all__ = ["apply_mmkern", "mmkern_attention_forward", "mmkern_mask", "register", "NAME", "SUPPORTED"]
