"""Residual + LayerNorm/RMSNorm as torch ops: mmkern::norm_residual_forward / norm_residual_backward.

Both work on 2-D rows: x (rows, N), residual (rows, N) or None, weight/bias (N,) or None,
adaLN modulation shift/scale (batch, N) or None: out = Norm(pre) * (1 + scale) + shift, row r of x
belonging to sample r // (rows // batch) (the public functions flatten x = (batch, ..., N)).
The forward returns (out, pre, mean, rstd): out like x; pre, the new residual stream, like
residual (or float32 / like x without one, see mmkern.reference.norm.residual_dtype); mean and
rstd float32 (rows,) (mean empty for RMSNorm), which a kernel's backward may reuse.
Every output is a new contiguous tensor (backends must return them so).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops._checks import (FLOAT_DTYPES, check_dim, check_dropout_p, check_positive_float, check_same_device,
                                check_tensor)
from mmkern.reference.norm import residual_dtype


def check_norm_inputs(fn: str, x, residual, weight, bias, eps, dropout_p, shift=None, scale=None) -> None:
    """Shape/dtype/range checks on 2-D rows (no data reads: safe on fake tensors)."""
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES, ndim=2)
    N = x.shape[1]
    if N < 1:
        raise ValueError(f"{fn}: the normalized (last) dimension of x must be >= 1, got shape {tuple(x.shape)}")
    if residual is not None:
        check_tensor(fn, "residual", residual, dtypes=FLOAT_DTYPES, ndim=2)
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(fn, name, t, dtypes=FLOAT_DTYPES, ndim=1)
            check_dim(fn, name, t, 0, N, "the normalized size, x.shape[-1]")
            if t.dtype not in (x.dtype, torch.float32):
                raise TypeError(f"{fn}: {name} must have the dtype of x ({x.dtype}) or float32; got {t.dtype}")
    rows = x.shape[0]
    for name, t in (("shift", shift), ("scale", scale)):
        if t is not None:
            check_tensor(fn, name, t, dtypes=FLOAT_DTYPES, ndim=2)
            check_dim(fn, name, t, 1, N, "the normalized size, x.shape[-1]")
            batch = t.shape[0]
            if (batch == 0 and rows != 0) or (batch != 0 and rows % batch != 0):
                raise ValueError(f"{fn}: {name} must have shape (batch, {N}) with batch dividing the {rows} rows of x "
                                 f"(x is (batch, ..., N) flattened); got {tuple(t.shape)}")
            if t.dtype not in (x.dtype, torch.float32):
                raise TypeError(f"{fn}: {name} must have the dtype of x ({x.dtype}) or float32; got {t.dtype}")
    if shift is not None and scale is not None and shift.shape != scale.shape:
        raise ValueError(f"{fn}: shift and scale must have one shape; got {tuple(shift.shape)} and "
                         f"{tuple(scale.shape)}")
    check_same_device(fn, x=x, residual=residual, weight=weight, bias=bias, shift=shift, scale=scale)
    check_positive_float(fn, "eps", eps)
    check_dropout_p(fn, dropout_p)


@torch.library.custom_op("mmkern::norm_residual_forward", mutates_args=())
def norm_residual_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float, dropout_p: float, dropout_seed: Optional[Tensor], residual_in_fp32: bool,
                          is_rms_norm: bool, shift: Optional[Tensor] = None,
                          scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_norm_inputs("mmkern::norm_residual_forward", x, residual, weight, bias, eps, dropout_p, shift, scale)
    return dispatch.call("norm_residual_forward", x.device, x=x, residual=residual, weight=weight, bias=bias, eps=eps,
                         dropout_p=dropout_p, dropout_seed=dropout_seed, residual_in_fp32=residual_in_fp32,
                         is_rms_norm=is_rms_norm, shift=shift, scale=scale)


@norm_residual_forward.register_fake
def _(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm, shift=None, scale=None):
    check_norm_inputs("mmkern::norm_residual_forward", x, residual, weight, bias, eps, dropout_p, shift, scale)
    rows = x.shape[0]
    stats = x.new_empty((rows,), dtype=torch.float32)
    mean = x.new_empty((0,), dtype=torch.float32) if is_rms_norm else torch.empty_like(stats)
    pre = x.new_empty(x.shape, dtype=residual_dtype(x, residual, residual_in_fp32))
    return x.new_empty(x.shape), pre, mean, stats


@torch.library.custom_op("mmkern::norm_residual_backward", mutates_args=())
def norm_residual_backward(dout: Tensor, dpre: Optional[Tensor], pre: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], mean: Tensor, rstd: Tensor, eps: float, dropout_p: float,
                           dropout_seed: Optional[Tensor], is_rms_norm: bool, has_residual: bool,
                           x_dtype: torch.dtype, shift: Optional[Tensor] = None,
                           scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d_residual, dweight, dbias, dshift, dscale); each is empty when its input was None.
    shift is passed only for its shape and dtype (dshift does not depend on its values)."""
    return dispatch.call("norm_residual_backward", pre.device, dout=dout, dpre=dpre, pre=pre, weight=weight,
                         bias=bias, mean=mean, rstd=rstd, eps=eps, dropout_p=dropout_p, dropout_seed=dropout_seed,
                         is_rms_norm=is_rms_norm, has_residual=has_residual, x_dtype=x_dtype, shift=shift,
                         scale=scale)


@norm_residual_backward.register_fake
def _(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm, has_residual, x_dtype,
      shift=None, scale=None):
    def like(t, present):  # empty (0,) when the input was None; never one tensor for two outputs
        return t.new_empty(t.shape) if present else pre.new_empty((0,))

    return (pre.new_empty(pre.shape, dtype=x_dtype), like(pre, has_residual), like(weight, weight is not None),
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
    # each backend draws its own dropout mask from the seed, so mixing them would mix masks.
    ctx.backend = dispatch.select("norm_residual_forward", x.device, dict(
        x=x, residual=residual, weight=weight, bias=bias, eps=eps, dropout_p=dropout_p, dropout_seed=dropout_seed,
        residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm, shift=shift, scale=scale))


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
