"""Rotary position embedding as a torch op: mmkern::rotary_embedding.

    out = rotary_embedding(x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved,
                           conjugate)

See mmkern/ops/rotary_problem.py for the shapes and the checks. The rotation is linear in x and orthogonal
for tables with cos^2 + sin^2 = 1, and its adjoint for any table is the same rotation with sin negated, so the
backward is this op again with `conjugate` flipped. cos and sin get no gradient (as flash-attn's: they are
fixed tables).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops.rotary_problem import RotaryProblem, build_rotary  # noqa: F401


@torch.library.custom_op("mmkern::rotary_embedding", mutates_args=())
def rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Optional[Tensor],
                     cu_seqlens: Optional[Tensor], seqlen_offset: int, max_seqlen: int, interleaved: bool,
                     conjugate: bool) -> Tensor:
    """Returns x with its first rotary_dim = 2 * cos.shape[1] features rotated (a new contiguous tensor)."""
    return dispatch.call_memoized("rotary_embedding", build_rotary, x, cos, sin, seqlen_offsets, cu_seqlens,
                                  seqlen_offset, max_seqlen, interleaved, conjugate)


@rotary_embedding.register_fake
def _(x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved, conjugate):
    build_rotary(x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved, conjugate,
                 check_values=False)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.options = (seqlen_offset, max_seqlen, interleaved, conjugate)


def _backward(ctx, grad):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    seqlen_offset, max_seqlen, interleaved, conjugate = ctx.options
    dx = rotary_embedding(grad, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved,
                          not conjugate)
    return dx, None, None, None, None, None, None, None, None


torch.library.register_autograd("mmkern::rotary_embedding", _backward, setup_context=_setup_context)


def _problem(x, cos, sin, seqlen_offsets=None, cu_seqlens=None, seqlen_offset=0, max_seqlen=0, interleaved=False,
             conjugate=False) -> RotaryProblem:
    return build_rotary(x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved, conjugate)


dispatch.define_problem("rotary_embedding", _problem)
