"""TextEncoder: a small BERT-style transformer over caption tokens (post-norm, as BERT).

    ids (B, L) int64, keep (B, L) bool  ->  states (B, L, dim), pooled (B, dim) (the [CLS] state)
Each layer: x = LN(attn(x) + x); x = LN(mlp(x) + x), both residual adds fused into the norm
(mmkern.nn.LayerNormResidual: LayerNorm(dropout(h) + residual) in one op). Padding is a key mask.
"""
from __future__ import annotations

import torch
from torch import nn

from mmkern.models.attention import MultiHeadAttention
from mmkern.nn import LayerNormResidual


class TextEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout_p: float = 0.0):
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads)
        self.attn_norm = LayerNormResidual(dim, eps=1e-12, dropout_p=dropout_p)      # BERT's eps
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.mlp_norm = LayerNormResidual(dim, eps=1e-12, dropout_p=dropout_p)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(self.attn(x, context_keep=keep), x)       # LN(dropout(attn) + x)
        return self.mlp_norm(self.mlp(x), x)                         # LN(dropout(mlp) + x)


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, max_len: int = 8, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.max_len = max_len
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.embed_norm = LayerNormResidual(dim, eps=1e-12)
        self.layers = nn.ModuleList(TextEncoderLayer(dim, heads) for _ in range(layers))

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"TextEncoder: ids have {ids.shape[1]} tokens, more than max_len = {self.max_len}")
        # LN(token + position): the embedding sum is the residual add of the fused norm
        x = self.embed_norm(self.token(ids), self.position[:ids.shape[1]].expand(ids.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x, keep)
        return x, x[:, 0]
