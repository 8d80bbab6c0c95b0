"""DiTDenoiser: a DiT (Peebles & Xie 2023) with adaLN-Zero and cross-attention to text tokens.

    x_t (B, C, H, W), t (B,) int64, text (B, Lt, text_dim), text_keep (B, Lt) bool, pooled (B, text_dim)
    -> predicted noise (B, C, H, W)
Image -> (H/p * W/p) patch tokens of width dim (+ a learned position). The condition c (B, dim) is
the timestep's sinusoidal embedding through an MLP plus the pooled text. Each block:
    h = LN(x) * (1 + scale_a) + shift_a          x += gate_a * self_attn(h)
    h = LN(x) * w + b                            x += cross_attn(h, text)
    h = LN(x) * (1 + scale_m) + shift_m          x += gate_m * mlp(h)
with (shift, scale, gate) from a zero-initialised Linear of c (adaLN-Zero: every block starts as
the identity). The residual stream is carried the pre-norm way: each sublayer's output `delta` is
added to the stream by the next norm (mmkern.layer_norm_residual(delta, x, prenorm=True,
modulation=(shift, scale)) returns the normalised, modulated rows and the new stream x + delta),
so every residual add and every (adaptive) LayerNorm is one fused mmkern op.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import mmkern
from mmkern.models.attention import MultiHeadAttention
from mmkern.nn import LayerNormResidual

EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [cos | sin] features at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, text_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.ada = nn.Linear(dim, 6 * dim)                 # c -> shift/scale/gate for attention and MLP
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.cross_norm = LayerNormResidual(dim, eps=EPS, prenorm=True)
        self.cross_attn = MultiHeadAttention(dim, heads, context_dim=text_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, delta, x, c, text, text_keep):
        """delta: the previous sublayer's output not yet added to the stream x (None at the start)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
            m.contiguous() for m in self.ada(nn.functional.silu(c)).chunk(6, dim=-1))
        h, x = mmkern.layer_norm_residual(delta, x, eps=EPS, prenorm=True, modulation=(shift_a, scale_a))
        delta = gate_a[:, None] * self.self_attn(h)
        h, x = self.cross_norm(delta, x)
        delta = self.cross_attn(h, text, text_keep)
        h, x = mmkern.layer_norm_residual(delta, x, eps=EPS, prenorm=True, modulation=(shift_m, scale_m))
        return gate_m[:, None] * self.mlp(h), x


class DiTDenoiser(nn.Module):
    def __init__(self, image_size: int = 16, channels: int = 3, patch: int = 2, dim: int = 96, depth: int = 4,
                 heads: int = 4, text_dim: int = 64):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"DiTDenoiser: image_size {image_size} must be a multiple of patch {patch}")
        self.image_size, self.channels, self.patch, self.dim = image_size, channels, patch, dim
        self.grid = image_size // patch
        self.patchify = nn.Conv2d(channels, dim, patch, stride=patch)          # (B, C, H, W) -> (B, dim, g, g)
        self.position = nn.Parameter(torch.randn(self.grid * self.grid, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_pool = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, text_dim) for _ in range(depth))
        self.final_ada = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch * patch * channels)
        for layer in (self.final_ada, self.out):                               # the model starts at output 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, text, text_keep, pooled):
        B, C, H, W = x_t.shape
        if (C, H, W) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"DiTDenoiser: x_t must be (batch, {self.channels}, {self.image_size}, "
                             f"{self.image_size}); got {tuple(x_t.shape)}")
        tokens = self.patchify(x_t).flatten(2).transpose(1, 2) + self.position        # (B, g*g, dim)
        c = self.time_mlp(timestep_embedding(t, self.dim)) + self.text_pool(pooled)   # (B, dim)
        delta, stream = tokens, None
        for block in self.blocks:
            delta, stream = block(delta, stream, c, text, text_keep)
        shift, scale = (m.contiguous() for m in self.final_ada(nn.functional.silu(c)).chunk(2, dim=-1))
        h = mmkern.layer_norm_residual(delta, stream, eps=EPS, modulation=(shift, scale))
        patches = self.out(h)                                                  # (B, g*g, p*p*C)
        g, p = self.grid, self.patch
        # (B, g, g, p, p, C) -> (B, C, g, p, g, p) -> (B, C, H, W)
        return patches.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
