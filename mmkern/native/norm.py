"""Adapter of residual + LayerNorm/RMSNorm for the `cpu` and `cuda` backends (mmkern._C).

Calls torch.ops.mmkern_C.norm_forward / norm_backward (csrc/norm/): the dispatcher picks the CPU
or CUDA kernel from the tensors' device. What the adapter does around them:
- weight, bias, shift and scale are handed over as float32 (cast here when given in half
  precision: N or batch * N elements, small next to x), and the reduced gradients cast back;
- rows whose last dimension is not contiguous are copied (the kernels take a free row stride);
- the dropout seed (a (1,) int64 CPU tensor) is read once on the host.
Dropout masks are Philox-4x32-10 at (seed, row * N + col), the stream of Triton's tl.rand: the
same mask on the CPU, the GPU and in the Triton kernels (`dropout_keep_mask` exposes it for tests).
"""
from __future__ import annotations

import torch

from mmkern.native import cpp_op, missing_op_reasons
from mmkern.reference.norm import residual_dtype

MAX_N = 65536                 # widest row the kernels take (csrc/norm/norm.h kMaxN)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPS = ("norm_forward", "norm_backward")


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index columns with stride 1 and rows with a free (non-negative) stride."""
    if t is not None and t.numel() == 0:
        return t.new_empty(t.shape)   # .contiguous() keeps an empty view's strides (it counts as contiguous)
    if t is not None and ((t.shape[-1] > 1 and t.stride(-1) != 1) or t.stride(0) < 0
                          or (t.shape[0] > 1 and t.stride(0) < t.shape[-1])):
        return t.contiguous()
    return t


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _seed(dropout_p: float, dropout_seed: torch.Tensor | None) -> int:
    return int(dropout_seed.reshape(-1)[0]) if dropout_p > 0 else 0


def _dtype_reasons(**tensors) -> list[str]:
    return [f"{name} has dtype {t.dtype}; the compiled kernels take float32, float16 and bfloat16"
            for name, t in tensors.items() if t is not None and t.dtype not in KERNEL_DTYPES]


def _reasons(device, x_dtype, stream_dtype, N, **tensors) -> list[str]:
    reasons = missing_op_reasons(*_OPS, device=device)
    reasons += _dtype_reasons(**tensors)
    if x_dtype in KERNEL_DTYPES and stream_dtype in KERNEL_DTYPES and stream_dtype not in (x_dtype, torch.float32):
        reasons.append(f"the residual stream has dtype {stream_dtype}; with x in {x_dtype} the compiled kernels take "
                       f"a residual stream in {x_dtype} or float32")
    if N > MAX_N:
        reasons.append(f"rows of {N} columns; the compiled kernels take at most {MAX_N}")
    return reasons


def norm_forward_reasons(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm,
                         shift=None, scale=None) -> list[str]:
    return _reasons(x.device, x.dtype, residual_dtype(x, residual, residual_in_fp32), x.shape[-1], x=x,
                    residual=residual, weight=weight, bias=bias, shift=shift, scale=scale)


def norm_backward_reasons(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm,
                          has_residual, x_dtype, shift=None, scale=None) -> list[str]:
    reasons = _reasons(pre.device, x_dtype, pre.dtype, pre.shape[-1], dout=dout, dpre=dpre, pre=pre, weight=weight,
                       bias=bias, shift=shift, scale=scale)
    if x_dtype not in KERNEL_DTYPES:
        reasons.append(f"x had dtype {x_dtype}; the compiled kernels take float16, bfloat16 and float32")
    if dout.dtype != x_dtype:
        reasons.append(f"dout has dtype {dout.dtype}, not x's {x_dtype}")
    if dpre is not None and dpre.dtype != pre.dtype:
        reasons.append(f"dpre has dtype {dpre.dtype}, not pre's {pre.dtype}")
    return reasons


def norm_forward(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm, shift=None,
                 scale=None):
    """Kernel of mmkern::norm_residual_forward: (out, pre, mean, rstd), see mmkern/ops/norm.py."""
    return cpp_op("norm_forward")(_rows(x), _rows(residual), _float32(weight), _float32(bias), _float32(shift),
                                  _float32(scale), float(eps), float(dropout_p), _seed(dropout_p, dropout_seed),
                                  bool(residual_in_fp32), bool(is_rms_norm))


def norm_backward(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm,
                  has_residual, x_dtype, shift=None, scale=None):
    """Kernel of mmkern::norm_residual_backward: (dx, d_residual, dweight, dbias, dshift, dscale).
    The row statistics are recomputed from the stored stream `pre` (mean and rstd are not read)."""
    modulation = shift if shift is not None else scale
    batch = 1 if modulation is None else modulation.shape[0]
    dx, d_residual, dweight, dbias, dshift, dscale = cpp_op("norm_backward")(
        _rows(dout), _rows(dpre), pre.contiguous(), _float32(weight), _float32(bias), _float32(scale), float(eps),
        float(dropout_p), _seed(dropout_p, dropout_seed), bool(is_rms_norm), bool(has_residual), shift is not None,
        batch, x_dtype)

    def like(grad, t):    # float32 sums -> the parameter's dtype; absent: empty like the fake implementation's
        if t is None:
            return pre.new_empty((0,))
        return grad if grad.dtype == t.dtype else grad.to(t.dtype)

    return dx, d_residual, like(dweight, weight), like(dbias, bias), like(dshift, shift), like(dscale, scale)


def dropout_keep_mask(seed: int, shape: tuple[int, ...], dropout_p: float, device) -> torch.Tensor:
    """For tests: the bool keep mask the compiled kernels draw for `seed` on rows of `shape`
    (row-major element index); the same Philox stream as mmkern.triton.norm.dropout_keep_mask."""
    like = torch.empty(shape, dtype=torch.int8, device=device)
    return cpp_op("dropout_keep_mask")(like, float(dropout_p), int(seed))


__all__ = ["norm_forward", "norm_backward", "norm_forward_reasons", "norm_backward_reasons", "dropout_keep_mask",
           "MAX_N"]
