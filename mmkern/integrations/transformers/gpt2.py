"""apply_mmkern for GPT-2 (transformers' modeling_gpt2): the pre-norm residual stream of every GPT2Block fused,

    h = attn(ln_1(x)) + x;  y = ln_2(h)            ->   y, h = layer_norm_residual(attn_out, x, prenorm=True)

with the attention's residual dropout fused in (attn.resid_dropout becomes nn.Identity; its p moves to ln_2),
and ln_f / ln_1 on mmkern's norm. The block's forward is replaced by one that returns what the original
returns, which depends on the transformers version (gpt2_block_layout).
"""
from __future__ import annotations

import inspect

from torch import nn

import transformers

from mmkern.integrations.transformers.attention import _layer_name
from mmkern.integrations.transformers.modules import _fused_norm, _swap_class, uses_attention_interface


def gpt2_block_layout(model: nn.Module, block_cls) -> str:
    """What the block's forward returns, read from the model's structure (not from source text):

    'tensor'   hidden_states alone (transformers 5): the model records attention weights with hooks on
               GPT2Attention (its class's _can_record_outputs names "attentions"), so no block returns them;
    'present'  (hidden_states, present[, weights]) (4.x before 4.53, legacy tuple caches): the forward takes
               `layer_past`;
    'weights'  (hidden_states,) plus the attention weights with output_attentions (4.53 - 4.5x): the forward
               takes `output_attentions` (and a Cache object as past_key_value).
    Anything else is a layout the fused forward does not know: ValueError."""
    parameters = inspect.signature(block_cls.forward).parameters
    recorded = getattr(model, "_can_record_outputs", None) or {}
    if "layer_past" in parameters:
        return "present"
    if isinstance(recorded, dict) and "attentions" in recorded:
        return "tensor"
    if "output_attentions" in parameters:
        return "weights"
    raise ValueError(f"apply_mmkern: transformers {transformers.__version__}'s {block_cls.__name__}.forward has a "
                     f"layout the fused residual + LayerNorm does not know; call apply_mmkern(model, fuse_norms=False) "
                     f"to use mmkern attention only")


def _make_gpt2_block_forward(model, block_cls):
    """A forward for block_cls: ln_2 fused with the residual add before it, returning what block_cls returns."""
    signature = inspect.signature(block_cls.forward)
    layout = gpt2_block_layout(model, block_cls)

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


def apply_gpt2(model: nn.Module, fuse_norms: bool) -> None:
    """GPT-2's layers on mmkern, in place (apply_mmkern's part for model_type "gpt2")."""
    from transformers.models.gpt2 import modeling_gpt2 as mg
    config = model.config
    if getattr(config, "add_cross_attention", False):
        raise ValueError("apply_mmkern: GPT-2 with add_cross_attention=True is not supported (the fused block covers "
                         "self-attention only)")
    for name, module in list(model.named_modules()):
        if isinstance(module, mg.GPT2Attention):
            if not uses_attention_interface(module):
                raise ValueError(f"apply_mmkern: {name} (GPT2Attention) in transformers {transformers.__version__} "
                                 f"does not call AttentionInterface; mmkern attention needs a newer transformers")
            module._mmkern_name = name
        if fuse_norms and isinstance(module, mg.GPT2Block):
            module._mmkern_name = name
            forward_key = type(module) if not getattr(type(module), "_mmkern_fused", False) else None
            if forward_key is not None:
                block_forward = _make_gpt2_block_forward(model, forward_key)
                module.ln_1 = _fused_norm(module.ln_1, 0.0, prenorm=False)
                module.ln_2 = _fused_norm(module.ln_2, module.attn.resid_dropout.p, prenorm=True)
                module.attn.resid_dropout = nn.Identity()  # now inside ln_2 (applied in training only)
                _swap_class(module, block_forward, "gpt2_block")
        if fuse_norms and isinstance(module, mg.GPT2Model) and isinstance(module.ln_f, nn.LayerNorm):
            module.ln_f = _fused_norm(module.ln_f, 0.0, prenorm=False)
