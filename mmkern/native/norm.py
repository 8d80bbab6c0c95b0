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


_PRESENT: set = set()      # device types whose kernels the loaded build has (a loaded build does not change)


def _missing(device: torch.device) -> list[str]:
    """What the loaded build lacks for the norm ops on this device type; asked once per device type when nothing
    is missing (asking costs ~10 us, on every call under auto dispatch otherwise)."""
    if device.type in _PRESENT:
        return []
    missing = missing_op_reasons(*_OPS, device=device)
    if not missing:
        _PRESENT.add(device.type)
    return missing


def _reasons(device, x_dtype, stream_dtype, N, **tensors) -> list[str]:
    reasons = _missing(device)
    reasons += _dtype_reasons(**tensors)
    if x_dtype in KERNEL_DTYPES and stream_dtype in KERNEL_DTYPES and stream_dtype not in (x_dtype, torch.float32):
        reasons.append(f"the residual stream has dtype {stream_dtype}; with x in {x_dtype} the compiled kernels take "
                       f"a residual stream in {x_dtype} or float32")
    if N > MAX_N:
        reasons.append(f"rows of {N} columns; the compiled kernels take at most {MAX_N}")
    return reasons


def norm_forward_reasons(problem) -> list[str]:
    p = problem
    return _reasons(p.device, p.x.dtype, p.stream_dtype, p.N, x=p.x, residual=p.residual, weight=p.weight,
                    bias=p.bias, shift=p.shift, scale=p.scale)


def norm_backward_reasons(problem) -> list[str]:
    p = problem
    reasons = _reasons(p.device, p.x_dtype, p.stream_dtype, p.N, dout=p.dout, dpre=p.dpre, pre=p.pre,
                       weight=p.weight, bias=p.bias, shift=p.shift, scale=p.scale)
    if p.x_dtype not in KERNEL_DTYPES:
        reasons.append(f"x had dtype {p.x_dtype}; the compiled kernels take float16, bfloat16 and float32")
    if p.dout.dtype != p.x_dtype:
        reasons.append(f"dout has dtype {p.dout.dtype}, not x's {p.x_dtype}")
    if p.dpre is not None and p.dpre.dtype != p.pre.dtype:
        reasons.append(f"dpre has dtype {p.dpre.dtype}, not pre's {p.pre.dtype}")
    return reasons


def norm_forward(problem):
    """Kernel of mmkern::norm_residual_forward: (out, pre, mean, rstd), see mmkern/ops/norm.py. (The C++ kernel
    applies the same residual-stream rule as mmkern/ops/norm.py:residual_dtype from residual_in_fp32.)"""
    p = problem
    return cpp_op("norm_forward")(_rows(p.x), _rows(p.residual), _float32(p.weight), _float32(p.bias),
                                  _float32(p.shift), _float32(p.scale), float(p.eps), float(p.dropout_p),
                                  _seed(p.dropout_p, p.dropout_seed), bool(p.residual_in_fp32), bool(p.is_rms_norm))


def norm_backward(problem):
    """Kernel of mmkern::norm_residual_backward: (dx, d_residual, dweight, dbias, dshift, dscale).
    The row statistics are recomputed from the stored stream `pre` (mean and rstd are not read)."""
    p = problem
    pre = p.pre
    dx, d_residual, dweight, dbias, dshift, dscale = cpp_op("norm_backward")(
        _rows(p.dout), _rows(p.dpre), pre.contiguous(), _float32(p.weight), _float32(p.bias), _float32(p.scale),
        float(p.eps), float(p.dropout_p), _seed(p.dropout_p, p.dropout_seed), bool(p.is_rms_norm),
        bool(p.has_residual), p.shift is not None, 1 if p.batch is None else p.batch, p.x_dtype)

    def like(grad, t):    # float32 sums -> the parameter's dtype; absent: empty like the fake implementation's
        if t is None:
            return pre.new_empty((0,))
        return grad if grad.dtype == t.dtype else grad.to(t.dtype)

    return dx, d_residual, like(dweight, p.weight), like(dbias, p.bias), like(dshift, p.shift), like(dscale, p.scale)


def dropout_keep_mask(seed: int, shape: tuple[int, ...], dropout_p: float, device) -> torch.Tensor:
    """For tests: the bool keep mask the compiled kernels draw for `seed` on rows of `shape`
    (row-major element index); the same Philox stream as mmkern.triton.norm.dropout_keep_mask."""
    like = torch.empty(shape, dtype=torch.int8, device=device)
    return cpp_op("dropout_keep_mask")(like, float(dropout_p), int(seed))


__all__ = ["norm_forward", "norm_backward", "norm_forward_reasons", "norm_backward_reasons", "dropout_keep_mask",
           "MAX_N"]
