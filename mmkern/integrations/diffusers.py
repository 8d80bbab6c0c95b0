"""mmkern attention inside diffusers models: an attention processor and a helper that installs it.

    from mmkern.integrations.diffusers import MMKernAttnProcessor, apply_mmkern
    unet.set_attn_processor(MMKernAttnProcessor())     # every Attention layer, self- and cross-attention
    apply_mmkern(unet)                                 # the same, after checking every layer (errors name it)

MMKernAttnProcessor does what diffusers' default AttnProcessor2_0 does, step for step (spatial norm,
(B, C, H, W) -> (B, H*W, C), group norm, to_q/to_k/to_v, norm_cross, q/k norms, to_out, residual
connection, rescale_output_factor), and computes the attention itself with
mmkern.scaled_dot_product_attention on (batch, heads, tokens, head_dim):
    q (B, heads, Lq, d)   k, v (B, heads_kv, Lk, d)   ->   (B, heads, Lq, d)
Masks as diffusers passes them (an additive float bias such as UNet2DConditionModel's
(1 - encoder_attention_mask) * -10000, or a bool keep-mask), shaped (B, Lk), (B, 1 or Lq, Lk),
(B * heads, 1 or Lq, Lk) or (B, 1 or heads, 1 or Lq, Lk), reach the kernel broadcast over heads and
queries (a stride-0 view: the dense (B, heads, Lq, Lk) bias is never built).
The softmax scale is the layer's own `attn.scale` (AttnProcessor2_0 ignores it and uses
1/sqrt(head_dim); the two agree unless the layer was built with scale_qk=False or a custom scale).

Layers mmkern cannot take raise a ValueError naming the layer and the reason: extra key/value
projections (added_kv_proj_dim: AttnAddedKVProcessor's layout), attention modules other than
diffusers' `Attention` (their processors have other signatures), masks whose key length does not
match the keys.
"""
from __future__ import annotations

import math

try:
    import diffusers  # noqa: F401
    from diffusers.models.attention_processor import Attention
except ImportError as exc:                      # the integration needs diffusers; mmkern itself does not
    raise ImportError(f"mmkern.integrations.diffusers needs diffusers: pip install diffusers; {exc}") from exc

import torch

import mmkern

__all__ = ["MMKernAttnProcessor", "apply_mmkern", "unsupported_reasons"]


def unsupported_reasons(attn) -> list[str]:
    """Why MMKernAttnProcessor cannot run this attention module ([] when it can)."""
    if not isinstance(attn, Attention):
        return [f"it is a {type(attn).__name__}, not diffusers' Attention (its processors take other arguments)"]
    reasons = []
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        reasons.append(f"it has extra key/value projections for the encoder states (added_kv_proj_dim="
                       f"{attn.added_kv_proj_dim}, AttnAddedKVProcessor's layout)")
    return reasons


def _layer(name: str | None, attn) -> str:
    return f"attention layer {name!r}" if name else f"attention layer {type(attn).__name__}"


def _mask_for_sdpa(where: str, mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """diffusers' attention mask -> one that broadcasts to (batch, heads, Lq, Lk), without copies over heads."""
    if mask.shape[-1] != k_len:
        raise ValueError(f"{where}: attention_mask covers {mask.shape[-1]} keys but the layer attends over {k_len} "
                         f"(shape {tuple(mask.shape)}); diffusers' own processor cannot take it either")
    if mask.dim() == 2:                                  # (B, Lk): one row per sample
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:                                # (B, 1|Lq, Lk) or diffusers' (B*heads, 1|Lq, Lk)
        if mask.shape[0] == batch * heads and heads > 1:
            mask = mask.view(batch, heads, mask.shape[1], k_len)
        else:
            mask = mask[:, None]
    elif mask.dim() != 4:
        raise ValueError(f"{where}: attention_mask must have 2, 3 or 4 dimensions, got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads) or mask.shape[2] not in (1, q_len):
        raise ValueError(f"{where}: attention_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(batch, heads, queries, keys) = {(batch, heads, q_len, k_len)}")
    return mask if mask.dtype == torch.bool else mask.to(dtype)


class MMKernAttnProcessor:
    """diffusers attention processor computing attention with mmkern.scaled_dot_product_attention.

    `name` (optional) is the layer's path in the model, used in error messages; apply_mmkern sets it.
    """

    def __init__(self, name: str | None = None):
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        where = _layer(self.name, attn)
        reasons = unsupported_reasons(attn)
        if reasons:
            raise ValueError(f"MMKernAttnProcessor cannot run {where}: {'; '.join(reasons)}")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_layout = hidden_states.ndim == 4
        if image_layout:                                  # (B, C, H, W) -> (B, H*W, C)
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        elif hidden_states.ndim != 3:
            raise ValueError(f"{where}: hidden_states must be (batch, tokens, channels) or (batch, channels, height, "
                             f"width); got shape {tuple(hidden_states.shape)}")
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:                   # GroupNorm over channels: (B, C, L) in, (B, L, C) back
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        if query.shape[-1] % heads:
            raise ValueError(f"{where}: query width {query.shape[-1]} is not a multiple of heads = {heads}")
        head_dim = query.shape[-1] // heads
        if key.shape[-1] % head_dim or heads % (key.shape[-1] // head_dim):
            raise ValueError(f"{where}: key width {key.shape[-1]} is not a whole number of heads of size {head_dim} "
                             f"dividing the {heads} query heads")
        kv_heads = key.shape[-1] // head_dim
        # (B, L, heads * d) -> (B, heads, L, d): views, no copies (the kernel takes any strides but the last)
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is not None:
            attention_mask = _mask_for_sdpa(where, attention_mask, batch, heads, query.shape[2], key.shape[2],
                                            query.dtype)
        scale = float(attn.scale) if getattr(attn, "scale", None) is not None else 1.0 / math.sqrt(head_dim)
        hidden_states = mmkern.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                                            enable_gqa=kv_heads != heads)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)      # output projection
        hidden_states = attn.to_out[1](hidden_states)      # dropout
        if image_layout:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def apply_mmkern(model: torch.nn.Module) -> torch.nn.Module:
    """Install MMKernAttnProcessor in every attention layer of a diffusers model, in place; returns the model.

    Checks every layer first: if any cannot run on mmkern, raises a ValueError listing each such layer
    by name with the reason, and changes nothing."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_mmkern: expected a diffusers model (UNet2DConditionModel, DiTTransformer2DModel, "
                        f"PixArtTransformer2DModel, ...); got {type(model).__name__}")
    layers = {name: module for name, module in model.named_modules() if hasattr(module, "set_processor")}
    if not layers:
        raise ValueError(f"apply_mmkern: {type(model).__name__} has no diffusers attention layers (modules with "
                         f"set_processor); nothing to swap")
    problems = [f"{name} ({'; '.join(r)})" for name, m in layers.items() if (r := unsupported_reasons(m))]
    if problems:
        raise ValueError(f"apply_mmkern: {type(model).__name__} has attention layers mmkern cannot run: "
                         + ", ".join(problems))
    for name, module in layers.items():
        module.set_processor(MMKernAttnProcessor(name))
    return model
