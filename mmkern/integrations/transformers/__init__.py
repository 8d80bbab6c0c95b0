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

One concept per module (this file registers and re-exports):
    _compat.py     what the installed transformers offers (AttentionInterface, masking_utils) and NAME
    mask.py        mmkern_mask, the AttentionMaskInterface entry: which mask reaches the attention function
    attention.py   mmkern_attention_forward, the AttentionInterface entry: masks -> varlen / plain / dense kernels
    modules.py     swapping modules in place: fused LayerNorms, forward-swapped subclasses, and whether a layer
                   dispatches through AttentionInterface (read off its modeling module, not its source)
    bert.py        apply_mmkern's BERT part;  gpt2.py  its GPT-2 part (the block's output layout per version)
    apply.py       apply_mmkern and SUPPORTED
"""
from __future__ import annotations

import transformers

from mmkern.integrations.transformers._compat import NAME, AttentionInterface, masking as _masking
from mmkern.integrations.transformers.apply import SUPPORTED, apply_mmkern
from mmkern.integrations.transformers.attention import mmkern_attention_forward
from mmkern.integrations.transformers.mask import mmkern_mask


def register() -> None:
    """Register "mmkern" with transformers' attention (and, where it exists, attention-mask) interface.

    Called once at import; calling it again re-registers the same functions. Raises ImportError on
    transformers < 4.48 (no AttentionInterface)."""
    if AttentionInterface is None:
        raise ImportError(f"mmkern.integrations.transformers needs transformers >= 4.48 (AttentionInterface); "
                          f"found {transformers.__version__}")
    AttentionInterface.register(NAME, mmkern_attention_forward)
    if _masking is not None and hasattr(_masking, "AttentionMaskInterface"):
        _masking.AttentionMaskInterface.register(NAME, mmkern_mask)


register()

__all__ = ["apply_mmkern", "mmkern_attention_forward", "mmkern_mask", "register", "NAME", "SUPPORTED"]
