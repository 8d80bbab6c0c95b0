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
    """LayerNorm(dropout(x) + residual) * weight + bias over the last dimension of x, in one fused kernel
    (flash-attn's layer_norm_fn; torch.nn.LayerNorm after the dropout and the residual add).

        pre = dropout(x) + residual;   out = (pre - mean(pre)) / sqrt(var(pre) + eps) * weight + bias

    Arguments:
        x: (..., N), at least 1-D with N >= 1, float16, bfloat16, float32 or float64. Any leading dimensions;
            the last is normalised.
        residual: None, or x's shape, any of those dtypes (it may differ from x's: a float32 residual stream
            under half-precision x). On x's device.
        weight: None, or (N,) in x's dtype or float32: the scale (None: 1).
        bias: None, or (N,) in x's dtype or float32: the shift (None: 0).
        eps: a float > 0, added to the variance.
        dropout_p: a float in [0, 1): dropout on x before the add, applied whenever > 0 (this function knows
            no training mode; the nn module passes 0 in eval). Its mask is drawn from a seed taken from torch's
            default CPU generator, so torch.manual_seed makes it reproducible; the backward regenerates it.
        prenorm: return the residual stream pre as well (a pre-norm transformer carries it to the next block).
        residual_in_fp32: without a residual, keep pre in float32 (with a residual, pre has its dtype).
        modulation: None, or (shift, scale), each None or (batch, N) in x's dtype or float32, with x of shape
            (batch, ..., N) (at least 2-D) and batch = x.shape[0]; both given: one shape. adaLN (DiT, PixArt):
            out = out * (1 + scale[b]) + shift[b] for the rows of sample b.
    Return:
        out: x's shape and dtype. With prenorm=True, (out, pre): pre x's shape, in residual's dtype, or without
        a residual float32 (residual_in_fp32) or x's dtype. Both new, contiguous tensors. Differentiable in x,
        residual, weight, bias and the modulation.
    """
    return _norm_residual("mmkern.layer_norm_residual", x, residual, weight, bias, eps, dropout_p, prenorm,
                          residual_in_fp32, False, modulation)


def rms_norm_residual(x, residual=None, weight=None, eps=1e-6, dropout_p=0.0, prenorm=False, residual_in_fp32=False,
                      *, modulation=None):
    """RMSNorm(dropout(x) + residual) * weight over the last dimension of x, in one fused kernel
    (flash-attn's rms_norm_fn; torch.nn.RMSNorm after the dropout and the residual add).

        pre = dropout(x) + residual;   out = pre / sqrt(mean(pre^2) + eps) * weight

    Arguments:
        x: (..., N), at least 1-D with N >= 1, float16, bfloat16, float32 or float64; the last dimension is
            normalised.
        residual: None, or x's shape, any of those dtypes (pre takes it), on x's device.
        weight: None, or (N,) in x's dtype or float32: the scale (None: 1).
        eps: a float > 0, added to the mean square.
        dropout_p: a float in [0, 1): dropout on x before the add, whenever > 0 (seeded from torch's default
            CPU generator, as in layer_norm_residual).
        prenorm: return the residual stream pre as well.
        residual_in_fp32: without a residual, keep pre in float32.
        modulation: None, or (shift, scale), each None or (batch, N) in x's dtype or float32 with
            x = (batch, ..., N): out = out * (1 + scale[b]) + shift[b] (adaLN), as in layer_norm_residual.
    Return:
        out: x's shape and dtype; with prenorm=True, (out, pre), pre x's shape in residual's dtype (without a
        residual: float32 with residual_in_fp32, else x's dtype). Differentiable in x, residual, weight and the
        modulation.
    """
    return _norm_residual("mmkern.rms_norm_residual", x, residual, weight, None, eps, dropout_p, prenorm,
                          residual_in_fp32, True, modulation)
