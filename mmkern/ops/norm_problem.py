"""The residual + LayerNorm/RMSNorm problem records: one call of mmkern::norm_residual_forward /
norm_residual_backward, validated once (mmkern/ops/norm.py defines the ops; every backend's reasons(problem)
and run(problem) read these records).

Rows: x (rows, N), residual (rows, N) or None, weight/bias (N,) or None, adaLN shift/scale (batch, N) or None,
row r of x in sample r // (rows // batch). The numerics contract of the forward's outputs: out like x; pre, the
new residual stream, in `residual_dtype`; mean and rstd float32 (rows,), mean empty for RMSNorm. The backward
returns (dx, d_residual, dweight, dbias, dshift, dscale) like (x, pre, weight, bias, shift, scale), each empty
(0,) when its input was None. Every output is a new contiguous tensor.
Validation reads no tensor data (safe on fake tensors while torch.compile traces).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmkern.ops._checks import (FLOAT_DTYPES, check_dim, check_dropout_p, check_positive_float, check_same_device,
                                check_tensor)


# --------------------------------------------------------------------------- dtype policy

def residual_dtype(x: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """The dtype of the residual stream `pre`: residual's; without a residual float32 when residual_in_fp32,
    else x's. (The reference backend writes this rule out itself: the oracle shares no policy code.)"""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else x.dtype


def _modulation_batch(shift: Tensor | None, scale: Tensor | None) -> int | None:
    modulation = shift if shift is not None else scale
    return None if modulation is None else modulation.shape[0]


def _rows_per_sample(rows: int, batch: int | None) -> int:
    """Rows of x per adaLN sample (>= 1; every row when there is no modulation or no sample)."""
    return max(rows // batch, 1) if batch else max(rows, 1)


# --------------------------------------------------------------------------- the problem records

@dataclass(frozen=True, eq=False)
class NormForwardProblem:
    """One call of mmkern::norm_residual_forward (the schema's arguments, then facts derived from them)."""
    x: Tensor                       # (rows, N)
    residual: Tensor | None         # (rows, N)
    weight: Tensor | None           # (N,)
    bias: Tensor | None             # (N,)
    eps: float
    dropout_p: float
    dropout_seed: Tensor | None     # (1,) int64 CPU tensor when dropout_p > 0
    residual_in_fp32: bool
    is_rms_norm: bool
    shift: Tensor | None = None     # (batch, N)
    scale: Tensor | None = None     # (batch, N)
    # derived
    rows: int = field(init=False)
    N: int = field(init=False)
    stream_dtype: torch.dtype = field(init=False)    # pre's dtype (residual_dtype)
    batch: int | None = field(init=False)           # adaLN samples (None without modulation)
    rows_per_sample: int = field(init=False)

    def __post_init__(self):
        rows, N = self.x.shape
        batch = _modulation_batch(self.shift, self.scale)
        for name, value in (("rows", rows), ("N", N), ("batch", batch),
                            ("stream_dtype", residual_dtype(self.x, self.residual, self.residual_in_fp32)),
                            ("rows_per_sample", _rows_per_sample(rows, batch))):
            object.__setattr__(self, name, value)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0


@dataclass(frozen=True, eq=False)
class NormBackwardProblem:
    """One call of mmkern::norm_residual_backward. shift is passed only for its shape and dtype (dshift does
    not depend on its values); mean and rstd are the forward's (kernels may recompute them from pre)."""
    dout: Tensor                    # (rows, N) in x_dtype
    dpre: Tensor | None             # (rows, N): the gradient arriving on the returned stream (prenorm)
    pre: Tensor                     # (rows, N): the stored residual stream
    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor | None
    rstd: Tensor | None
    eps: float
    dropout_p: float
    dropout_seed: Tensor | None
    is_rms_norm: bool
    has_residual: bool
    x_dtype: torch.dtype
    shift: Tensor | None = None
    scale: Tensor | None = None
    # derived
    rows: int = field(init=False)
    N: int = field(init=False)
    stream_dtype: torch.dtype = field(init=False)    # pre's dtype
    batch: int | None = field(init=False)
    rows_per_sample: int = field(init=False)

    def __post_init__(self):
        rows, N = self.pre.shape
        batch = _modulation_batch(self.shift, self.scale)
        for name, value in (("rows", rows), ("N", N), ("batch", batch), ("stream_dtype", self.pre.dtype),
                            ("rows_per_sample", _rows_per_sample(rows, batch))):
            object.__setattr__(self, name, value)

    @property
    def device(self) -> torch.device:
        return self.pre.device

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0


# --------------------------------------------------------------------------- validation and building

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


def build_norm_forward(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm,
                       shift=None, scale=None, *, validate: bool = True) -> NormForwardProblem:
    """The validated record of one norm_residual_forward call (shape checks only: safe on fake tensors;
    validate=False skips them, for a signature dispatch.call_memoized has seen)."""
    if validate:
        check_norm_inputs("mmkern::norm_residual_forward", x, residual, weight, bias, eps, dropout_p, shift, scale)
    return NormForwardProblem(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm,
                              shift, scale)


def build_norm_backward(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm,
                        has_residual, x_dtype, shift=None, scale=None) -> NormBackwardProblem:
    """The record of one norm_residual_backward call. Its inputs come from the forward's autograd context
    (already validated there), so nothing is checked again."""
    return NormBackwardProblem(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm,
                               has_residual, x_dtype, shift, scale)
