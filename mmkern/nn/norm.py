"""LayerNormResidual and RMSNormResidual: torch.nn.LayerNorm / torch.nn.RMSNorm with the dropout and
residual add before them fused in (mmkern.layer_norm_residual / mmkern.rms_norm_residual).

    forward(x, residual=None, modulation=None):
        pre = dropout(x) + residual;  out = Norm(pre) * weight + bias   [* (1 + scale) + shift]
        returns out, or (out, pre) with prenorm=True (pre: the residual stream for the next block)
Constructed like torch's modules (normalized_shape, eps, elementwise_affine, bias, device, dtype),
plus dropout_p (applied in training mode only), prenorm and residual_in_fp32. The parameters are
`weight` (and `bias` for LayerNorm), shaped normalized_shape, as in torch: state dicts are
interchangeable. A normalized_shape of several dimensions normalises the flattened last dimensions.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mmkern.norm import layer_norm_residual, rms_norm_residual


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(n) for n in normalized_shape)


class _NormResidual(nn.Module):
    _fn_name = ""

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, dropout_p, prenorm, residual_in_fp32,
                 device, dtype):
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        if not self.normalized_shape or any(n < 1 for n in self.normalized_shape):
            raise ValueError(f"{type(self).__name__}: normalized_shape must be a positive size or sizes, "
                             f"got {normalized_shape!r}")
        if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0 <= dropout_p < 1:
            raise ValueError(f"{type(self).__name__}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.dropout_p = float(dropout_p)
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        factory = dict(device=device, dtype=dtype)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0 (as torch's LayerNorm / RMSNorm)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (..., *normalized_shape) -> (..., prod(normalized_shape)): the kernels normalise the last dim."""
        k = len(self.normalized_shape)
        if not isinstance(x, torch.Tensor) or x.dim() < k or tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: {name} must end in normalized_shape {self.normalized_shape}, "
                             f"got {got}")
        return x if k == 1 else x.reshape(*x.shape[:x.dim() - k], math.prod(self.normalized_shape))

    def _flat(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(-1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, modulation=None):
        """pre = dropout(x) + residual;  out = Norm(pre) * weight (+ bias) [* (1 + scale) + shift].

        Arguments:
            x: (..., *normalized_shape), float16, bfloat16, float32 or float64; the module's parameters must be
                in x's dtype or float32 (a float32 module takes every dtype).
            residual: None, or x's shape in any of those dtypes (the residual stream: pre takes its dtype).
            modulation: None, or (shift, scale), each None or (batch, *normalized_shape) in x's dtype or float32,
                with x = (batch, ..., *normalized_shape): adaLN, per sample b.
        Return:
            out: x's shape and dtype; with prenorm=True, (out, pre): pre x's shape, in residual's dtype (without a
            residual: float32 with residual_in_fp32, else x's dtype). Dropout (dropout_p) in training mode only.
        """
        shape = x.shape if isinstance(x, torch.Tensor) else None
        x2 = self._rows(x, "x")
        residual2 = None if residual is None else self._rows(residual, "residual")
        if modulation is not None and len(self.normalized_shape) > 1 and isinstance(modulation, (tuple, list)):
            modulation = tuple(None if t is None else t.reshape(t.shape[0], -1) for t in modulation)
        result = self._call(x2, residual2, self.dropout_p if self.training else 0.0, modulation)
        if len(self.normalized_shape) == 1:
            return result
        if self.prenorm:
            return result[0].reshape(shape), result[1].reshape(shape)
        return result.reshape(shape)

    def extra_repr(self) -> str:
        """The constructor's arguments, for print(module) (as torch's modules)."""
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"dropout_p={self.dropout_p}, prenorm={self.prenorm}, residual_in_fp32={self.residual_in_fp32}")


class LayerNormResidual(_NormResidual):
    """torch.nn.LayerNorm(dropout(x) + residual), fused (mmkern.layer_norm_residual); see the module docstring.

    Arguments:
        normalized_shape: an int N or a sequence of ints: the trailing dimensions normalised (their product is
            the kernel's row width).
        eps: a float > 0, added to the variance.
        elementwise_affine: learn `weight` (ones) and, with bias, `bias` (zeros), each of shape normalized_shape.
        bias: with elementwise_affine, learn `bias` too.
        dropout_p: a float in [0, 1): dropout on x before the residual add, in training mode only.
        prenorm: forward returns (out, pre), the residual stream too (pre-norm transformers).
        residual_in_fp32: without a residual, keep pre in float32.
        device, dtype: of the parameters (torch's factory arguments; default float32 on the default device).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dropout_p: float = 0.0, prenorm: bool = False, residual_in_fp32: bool = False, device=None,
                 dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, dropout_p, prenorm, residual_in_fp32,
                         device, dtype)

    def _call(self, x, residual, dropout_p, modulation):
        return layer_norm_residual(x, residual, self._flat(self.weight), self._flat(self.bias), eps=self.eps,
                                   dropout_p=dropout_p, prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32,
                                   modulation=modulation)


class RMSNormResidual(_NormResidual):
    """torch.nn.RMSNorm(dropout(x) + residual), fused (mmkern.rms_norm_residual); see the module docstring.

    Arguments:
        normalized_shape: an int N or a sequence of ints: the trailing dimensions normalised.
        eps: None (torch.finfo(x.dtype).eps at each call, as in torch) or a float > 0, added to the mean square.
        elementwise_affine: learn `weight` (ones), of shape normalized_shape.
        dropout_p: a float in [0, 1): dropout on x before the residual add, in training mode only.
        prenorm: forward returns (out, pre), the residual stream too.
        residual_in_fp32: without a residual, keep pre in float32.
        device, dtype: of the parameters (default float32 on the default device).
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 dropout_p: float = 0.0, prenorm: bool = False, residual_in_fp32: bool = False, device=None,
                 dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, False, dropout_p, prenorm, residual_in_fp32,
                         device, dtype)

    def _call(self, x, residual, dropout_p, modulation):
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return rms_norm_residual(x, residual, self._flat(self.weight), eps=eps, dropout_p=dropout_p,
                                 prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32, modulation=modulation)
