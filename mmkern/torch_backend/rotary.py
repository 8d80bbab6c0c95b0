"""mmkern::rotary_embedding in plain torch: the formula a user writes without a fused kernel (flash-attn's
`apply_rotary_emb_torch`, Hugging Face's `apply_rotary_pos_emb`):

    x_rot = x[..., :rd] * cos + rotate_half(x[..., :rd]) * sin,      cos, sin repeated to rd features,
    rotate_half(x) = (-x2, x1) for the halves x1, x2 (GPT-NeoX), (-x_odd, x_even) interleaved per pair (GPT-J),

in x's dtype (the tables cast to it), features rd.. copied. Each position's table row is gathered on the device
(clamped into the table, as the kernels do): no host sync, so a decode step can be captured in a CUDA graph.
Memory traffic: about 6 reads and writes of x's rotary part (the products, the rotate, the concatenations) where
a fused kernel reads x once and writes out once.

Refused (reasons): float64 x (the reference backend's: the oracle is eager float64 torch already).
"""
from __future__ import annotations

import torch


def positions(p) -> torch.Tensor:
    """The table row of every token, clamped into the table: (B, L) dense, (total,) varlen; int64."""
    device, last = p.x.device, max(p.cos.shape[0] - 1, 0)
    if p.varlen:
        rows = torch.arange(p.x.shape[0], device=device)
        sequence = torch.searchsorted(p.cu_seqlens[1:].long(), rows, right=True)       # which sequence owns a row
        start = p.cu_seqlens.long()[sequence.clamp(max=p.batch - 1)] if p.batch else rows
        within = rows - start
        offset = p.seqlen_offsets.long()[sequence.clamp(max=p.batch - 1)] if p.seqlen_offsets is not None else p.seqlen_offset
        return (within + offset).clamp(0, last)
    within = torch.arange(p.x.shape[1], device=device)
    offset = p.seqlen_offsets.long()[:, None] if p.seqlen_offsets is not None else p.seqlen_offset
    return (within[None, :] + offset).clamp(0, last).expand(p.x.shape[0], -1)


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((-odd, even), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_embedding(p) -> torch.Tensor:
    x, rd = p.x, p.rotary_dim
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if p.varlen or p.seqlen_offsets is not None:
        at = positions(p)
        cos, sin = p.cos.to(x.dtype)[at], p.sin.to(x.dtype)[at]      # (B, L, rd / 2) or (total, rd / 2)
    else:       # one offset for every sequence (checked on the host: the rows lie in the table): a slice
        rows = slice(p.seqlen_offset, p.seqlen_offset + x.shape[1])
        cos, sin = p.cos[rows].to(x.dtype), p.sin[rows].to(x.dtype)  # (L, rd / 2), broadcast over the batch
    if p.conjugate:
        sin = -sin
    repeat = (lambda t: t.repeat_interleave(2, dim=-1)) if p.interleaved else (lambda t: torch.cat((t, t), dim=-1))
    cos, sin = repeat(cos).unsqueeze(-2), repeat(sin).unsqueeze(-2)  # broadcast over the heads
    x_rot = x[..., :rd]
    rotated = x_rot * cos + _rotate_half(x_rot, p.interleaved) * sin
    if rd == x.shape[-1]:
        return rotated.contiguous()
    return torch.cat((rotated, x[..., rd:]), dim=-1)


def rotary_embedding_reasons(p) -> list[str]:
    if p.x.dtype == torch.float64:
        return ["x is float64: the reference backend's (torch's own float64 math is the oracle)"]
    return []
