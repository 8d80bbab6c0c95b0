"""Reference rotary embedding: the oracle for mmkern::rotary_embedding (mmkern/ops/rotary_problem.py).

Each sequence on its own, in a Python loop, the way the math is written: token t of sequence b is at position
p = offset_b + t; its features are split into pairs (x_a, x_b), (2i, 2i + 1) when interleaved, (i, i + rd / 2)
otherwise, and each pair is multiplied by the 2 x 2 rotation [[c, -s], [s, c]] with c = cos[p, i], s = sin[p, i]
(s negated when conjugate). Features rd.. are copied. Computed in float64 (unless precision.compute_in says
otherwise); the result has x's dtype. Positions are clamped into the table as the kernels do on a GPU, where they
are not checked (on a CPU the op layer has refused them).
"""
from __future__ import annotations

import torch

from mmkern.reference.precision import up


def _pair_indices(rotary_dim: int, interleaved: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second): the feature indices of each of the rotary_dim / 2 pairs."""
    i = torch.arange(rotary_dim // 2, device=device)
    return (2 * i, 2 * i + 1) if interleaved else (i, i + rotary_dim // 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first, second) -> torch.Tensor:
    """x: (L, H, D) in the compute dtype; cos, sin: (L, rd / 2), the rows of x's positions."""
    out = x.clone()
    c, s = cos[:, None, :], sin[:, None, :]
    a, b = x[..., first], x[..., second]
    out[..., first] = c * a - s * b
    out[..., second] = s * a + c * b
    return out


def rotary_embedding(p):
    """Kernel of mmkern::rotary_embedding."""
    x = p.x
    if p.varlen:
        bounds = p.cu_seqlens.tolist()
        sequences = [x[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        sequences = list(x.unbind(0))
    offsets = p.seqlen_offsets.tolist() if p.seqlen_offsets is not None else [p.seqlen_offset] * len(sequences)
    cos, sin = up(p.cos), up(p.sin)
    if p.conjugate:
        sin = -sin
    first, second = _pair_indices(p.rotary_dim, p.interleaved, x.device)
    rotated = []
    for seq, offset in zip(sequences, offsets):
        positions = (offset + torch.arange(seq.shape[0], device=x.device)).clamp(0, max(cos.shape[0] - 1, 0))
        rotated.append(_rotate(up(seq), cos[positions], sin[positions], first, second))
    if not rotated:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.cat(rotated) if p.varlen else torch.stack(rotated)
    return out.to(x.dtype).contiguous()
