"""apply_mmkern for BERT (transformers' modeling_bert): the fused residual + LayerNorm of every BertSelfOutput
and BertOutput, and, on transformers 4.x (where BERT calls torch's SDPA itself, not AttentionInterface), an
mmkern forward for the encoder self-attention.

    BertSelfOutput, BertOutput: LayerNorm(dropout(dense(h)) + input) -> one fused
    mmkern.layer_norm_residual(dense(h), input, dropout_p=hidden_dropout_prob) (its LayerNorm becomes
    mmkern.nn.LayerNormResidual: same `weight`/`bias` parameters)
"""
from __future__ import annotations

import torch
from torch import nn

import transformers

from mmkern.integrations.transformers._compat import NAME
from mmkern.integrations.transformers.attention import _layer_name, mmkern_attention_forward
from mmkern.integrations.transformers.modules import _fused_norm, _swap_class, uses_attention_interface


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


def apply_bert(model: nn.Module, fuse_norms: bool) -> None:
    """BERT's layers on mmkern, in place (apply_mmkern's part for model_type "bert")."""
    from transformers.models.bert import modeling_bert as mb
    config = model.config
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"apply_mmkern: BERT with position_embedding_type={kind!r} adds relative-position scores "
                         f"inside attention, which mmkern's kernels do not take; only 'absolute' is supported")
    for name, module in list(model.named_modules()):
        if isinstance(module, (mb.BertSelfAttention, getattr(mb, "BertCrossAttention", mb.BertSelfAttention))):
            module._mmkern_name = name
            if not uses_attention_interface(module) and not getattr(type(module), "_mmkern_fused", False):
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
