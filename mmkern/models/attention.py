"""MultiHeadAttention: self- or cross-attention on mmkern.scaled_dot_product_attention.

    x (B, Lq, dim), context (B, Lk, context_dim) or None (self-attention),
    context_keep (B, Lk) bool, True = a real token (padding is False) or None
    -> (B, Lq, dim)
The key-padding mask reaches the kernel as a (B, 1, 1, Lk) bool view broadcast over heads and
queries; the kernel never sees a dense (Lq, Lk) bias. Every query keeps at least one key (the text
always has [CLS]), so no row is empty.
"""
from __future__ import annotations

import torch
from torch import nn

import mmkern


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: dim {dim} must be a multiple of heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_keep: torch.Tensor | None = None) -> torch.Tensor:
        B, Lq, D = x.shape
        context = x if context is None else context
        Lk = context.shape[1]
        # (B, L, heads * d) -> (B, heads, L, d): torch's SDPA layout, views only
        q = self.to_q(x).view(B, Lq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(context).view(B, Lk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if context_keep is None else context_keep[:, None, None, :]
        out = mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(B, Lq, D))
