"""Public residual + normalisation functions (flash-attn's layer_norm_fn / rms_norm_fn semantics).

    pre = dropout(x) + residual;   out = Norm(pre) * weight + bias
x may have any number of leading dimensions; the last one is normalised. With prenorm=True the
functions return (out, pre): `pre` is the residual stream a pre-norm transformer (GPT-2) carries
to the next block. residual_in_fp32=True starts that stream in float32 when no residual is given.
modulation=(shift, scale), each (batch, N) with x = (batch, ..., N), fuses adaLN (DiT, PixArt):
    out = Norm(pre) * (1 + scale[sample]) + shift[sample]
"""
from __future__ import annotations

import torch

from mmkern.ops import norm as ops
from mmkern.ops import _eager as eager
from mmkern.ops._checks import FLOAT_DTYPES, check_dropout_p, check_tensor, last_dim_contiguous
from mmkern.ops._rng import draw_seed


def _check_modulation(fn, x, modulation):
    """(shift, scale) from modulation=(shift, scale); each (batch, N) with batch = x.shape[0], or None."""
    if modulation is None:
        return None, None
    if not isinstance(modulation, (tuple, list)) or len(modulation) != 2:
        raise ValueError(f"{fn}: modulation must be a pair (shift, scale) of (batch, hidden) tensors, "
                         f"got {type(modulation).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{fn}: modulation needs x of shape (batch, ..., hidden); got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[-1])
    for name, t in zip(("shift", "scale"), modulation):
        if t is not None:
            check_tensor(fn, f"modulation {name}", t, dtypes=FLOAT_DTYPES)
            if tuple(t.shape) != want:
                raise ValueError(f"{fn}: modulation {name} must have shape (batch, hidden) = {want} for x of shape "
                                 f"{tuple(x.shape)}; got {tuple(t.shape)}")
    return tuple(last_dim_contiguous(t) for t in modulation)


def _norm_residual(fn, x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, is_rms_norm,
                   modulation=None):
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have at least 1 dimension and a last (normalized) dimension >= 1; "
                         f"got shape {tuple(x.shape)}")
    if residual is not None:
        check_tensor(fn, "residual", residual, dtypes=FLOAT_DTYPES)
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_dropout_p(fn, dropout_p)
    shift, scale = _check_modulation(fn, x, modulation)
    shape = x.shape
    rows = (-1, shape[-1])
    x2 = last_dim_contiguous(x).reshape(rows)
    residual2 = None if residual is None else last_dim_contiguous(residual).reshape(rows)
    seed = draw_seed() if dropout_p > 0 else None
    out, pre, _, _ = eager.call(ops.norm_residual_forward, x2, residual2, last_dim_contiguous(weight),
                                last_dim_contiguous(bias), eps, float(dropout_p), seed, bool(residual_in_fp32),
                                is_rms_norm, shift, scale)
    out = out.reshape(shape)
    return (out, pre.reshape(shape)) if prenorm else out


def layer_norm_residual(x, residual=None, weight=None, bias=None, eps=1e-5, dropout_p=0.0, prenorm=False,
                        residual_in_fp32=False, *, modulation=None):
    """LayerNorm(dropout(x) + residual) * weight + bias over the last dimension of x.

    Returns out (like x), or (out, pre) with prenorm=True. weight/bias: (N,) in x's dtype or float32.
    modulation=(shift, scale): (batch, N) each (x's dtype or float32; either may be None); then
    out = that * (1 + scale) + shift per sample of x = (batch, ..., N) (adaLN).
    """
    return _norm_residual("mmkern.layer_norm_residual", x, residual, weight, bias, eps, dropout_p, prenorm,
                          residual_in_fp32, False, modulation)


def rms_norm_residual(x, residual=None, weight=None, eps=1e-6, dropout_p=0.0, prenorm=False, residual_in_fp32=False,
                      *, modulation=None):
    """RMSNorm(dropout(x) + residual) * weight over the last dimension of x.

    Returns out (like x), or (out, pre) with prenorm=True. weight: (N,) in x's dtype or float32.
    modulation=(shift, scale): as in layer_norm_residual (adaLN).
    """
    return _norm_residual("mmkern.rms_norm_residual", x, residual, weight, None, eps, dropout_p, prenorm,
                          residual_in_fp32, True, modulation)
