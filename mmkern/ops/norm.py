"""Residual + LayerNorm/RMSNorm as torch ops: mmkern::norm_residual_forward / norm_residual_backward.

Both work on 2-D rows: x (rows, N), residual (rows, N) or None, weight/bias (N,) or None,
adaLN modulation shift/scale (batch, N) or None: out = Norm(pre) * (1 + scale) + shift, row r of x
belonging to sample r // (rows // batch) (the public functions flatten x = (batch, ..., N)).
The forward returns (out, pre, mean, rstd): out like x; pre, the new residual stream, in
`residual_dtype` (like residual; without one float32 with residual_in_fp32, else like x); mean and
rstd float32 (rows,) (mean empty for RMSNorm), which a kernel's backward may reuse.
Every output is a new contiguous tensor (backends must return them so).

Each call builds one problem record (mmkern/ops/norm_problem.py: NormForwardProblem / NormBackwardProblem, the
validation and the dtype policy), validated once, and hands it to the dispatcher: every backend's run(problem)
and reasons(problem) read it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops.norm_problem import (NormBackwardProblem, NormForwardProblem, build_norm_backward,  # noqa: F401
                                     build_norm_forward, check_norm_inputs, residual_dtype)


dispatch.define_problem("norm_residual_forward", build_norm_forward)
dispatch.define_problem("norm_residual_backward", build_norm_backward)


# --------------------------------------------------------------------------- the ops

@torch.library.custom_op("mmkern::norm_residual_forward", mutates_args=())
def norm_residual_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float, dropout_p: float, dropout_seed: Optional[Tensor], residual_in_fp32: bool,
                          is_rms_norm: bool, shift: Optional[Tensor] = None,
                          scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dispatch.call_memoized("norm_residual_forward", build_norm_forward, x, residual, weight, bias, eps,
                                  dropout_p, dropout_seed, residual_in_fp32, is_rms_norm, shift, scale)


@norm_residual_forward.register_fake
def _(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm, shift=None, scale=None):
    p = build_norm_forward(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm,
                           shift, scale)
    stats = x.new_empty((p.rows,), dtype=torch.float32)
    mean = x.new_empty((0,), dtype=torch.float32) if is_rms_norm else torch.empty_like(stats)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=p.stream_dtype), mean, stats


@torch.library.custom_op("mmkern::norm_residual_backward", mutates_args=())
def norm_residual_backward(dout: Tensor, dpre: Optional[Tensor], pre: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], mean: Tensor, rstd: Tensor, eps: float, dropout_p: float,
                           dropout_seed: Optional[Tensor], is_rms_norm: bool, has_residual: bool,
                           x_dtype: torch.dtype, shift: Optional[Tensor] = None,
                           scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d_residual, dweight, dbias, dshift, dscale); each is empty when its input was None.
    shift is passed only for its shape and dtype (dshift does not depend on its values)."""
    problem = build_norm_backward(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed,
                                  is_rms_norm, has_residual, x_dtype, shift, scale)
    return dispatch.call("norm_residual_backward", problem)


@norm_residual_backward.register_fake
def _(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm, has_residual, x_dtype,
      shift=None, scale=None):
    p = build_norm_backward(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm,
                            has_residual, x_dtype, shift, scale)

    def like(t, present):  # empty (0,) when the input was None; never one tensor for two outputs
        return t.new_empty(t.shape) if present else pre.new_empty((0,))

    return (pre.new_empty(pre.shape, dtype=p.x_dtype), like(pre, p.has_residual), like(weight, weight is not None),
            like(bias, bias is not None), like(shift, shift is not None), like(scale, scale is not None))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm, shift, scale = inputs
    _, pre, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(pre, weight, bias, mean, rstd, dropout_seed, shift, scale)
    ctx.params = dict(eps=eps, dropout_p=dropout_p, is_rms_norm=is_rms_norm, has_residual=residual is not None,
                      x_dtype=x.dtype)
    # The backward runs on the forward's backend, whatever `mmkern.backend` block it is called in:
    # each backend draws its own dropout mask from the seed, so mixing them would mix masks. (The forward
    # validated these inputs: the record is built without checking them again.)
    ctx.backend = dispatch.select("norm_residual_forward", NormForwardProblem(*inputs))


def _backward(ctx, dout, dpre, _dmean, _drstd):
    pre, weight, bias, mean, rstd, dropout_seed, shift, scale = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(pre.shape, dtype=ctx.params["x_dtype"], device=pre.device)
    with dispatch.backend(ctx.backend):
        dx, d_residual, dweight, dbias, dshift, dscale = norm_residual_backward(
            dout, dpre, pre, weight, bias, mean, rstd, dropout_seed=dropout_seed, shift=shift, scale=scale,
            **ctx.params)
    return (dx, d_residual if ctx.params["has_residual"] else None, dweight if weight is not None else None,
            dbias if bias is not None else None, None, None, None, None, None,
            dshift if shift is not None else None, dscale if scale is not None else None)


torch.library.register_autograd("mmkern::norm_residual_forward", _backward, setup_context=_setup_context)
