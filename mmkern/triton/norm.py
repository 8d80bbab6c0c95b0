"""The triton backend's adapter of residual + LayerNorm/RMSNorm (mmkern::norm_residual_forward / _backward).

`norm_forward(problem)` / `norm_backward(problem)` take the op's record (mmkern/ops/norm.py), allocate the
outputs and launch the kernels of mmkern/triton/norm_kernels.py with the tiles of mmkern/triton/norm_tiles.py;
`norm_forward_reasons` / `norm_backward_reasons` say what the kernels do not take. Around the kernels:
- only the row stride of x/residual/dout/dpre is free: rows whose last dimension is not contiguous are copied;
  every output is a new contiguous tensor;
- weight, bias, shift and scale are read as float32 (cast once here when given in half precision: N or
  batch * N elements, small next to x);
- the backward's per-program partial rows of dweight/dbias/dshift/dscale are summed here in a fixed order
  (torch .sum: deterministic, no atomics), per sample for dshift/dscale.
"""
from __future__ import annotations

import torch
import triton

from mmkern.triton._common import INTERPRETING, KERNEL_DTYPES, dtype_reasons
from mmkern.triton.norm_kernels import keep_mask_kernel, norm_backward_kernel, norm_forward_kernel
from mmkern.triton.norm_tiles import (BACKWARD_BLOCKS, DTYPE_PAIRS, FORWARD_BLOCKS, MAX_N, aot_configs, block_size,
                                      num_warps_for, programs_per_sample)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index columns with stride 1 and rows with a free stride."""
    if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _seed_value(dropout_p: float, dropout_seed: torch.Tensor | None) -> int:
    return int(dropout_seed.reshape(-1)[0]) if dropout_p > 0 else 0


# --------------------------------------------------------------------------- reasons

def _reasons(x_dtype, stream_dtype, N, **tensors) -> list[str]:
    reasons = dtype_reasons(**tensors)
    if x_dtype in KERNEL_DTYPES and stream_dtype in KERNEL_DTYPES and (x_dtype, stream_dtype) not in DTYPE_PAIRS:
        reasons.append(f"the residual stream has dtype {stream_dtype}; with x in {x_dtype} the Triton kernels take "
                       f"a residual stream in {x_dtype} or float32")
    if N > MAX_N:
        reasons.append(f"rows of {N} columns; the Triton kernels take at most {MAX_N}")
    return reasons


def norm_forward_reasons(problem) -> list[str]:
    p = problem
    return _reasons(p.x.dtype, p.stream_dtype, p.N, x=p.x, residual=p.residual, weight=p.weight, bias=p.bias,
                    shift=p.shift, scale=p.scale)


def norm_backward_reasons(problem) -> list[str]:
    p = problem
    reasons = _reasons(p.x_dtype, p.stream_dtype, p.N, dout=p.dout, dpre=p.dpre, pre=p.pre, weight=p.weight,
                       bias=p.bias, shift=p.shift, scale=p.scale)
    if p.x_dtype not in KERNEL_DTYPES:
        reasons.append(f"x had dtype {p.x_dtype}; the Triton kernels take float16, bfloat16 and float32")
    if p.dout.dtype != p.x_dtype:
        reasons.append(f"dout has dtype {p.dout.dtype}, not x's {p.x_dtype}")
    if p.dpre is not None and p.dpre.dtype != p.pre.dtype:
        reasons.append(f"dpre has dtype {p.dpre.dtype}, not pre's {p.pre.dtype}")
    return reasons


# --------------------------------------------------------------------------- runs

def norm_forward(problem):
    """Kernel of mmkern::norm_residual_forward: (out, pre, mean, rstd), see mmkern/ops/norm.py."""
    p = problem
    x, residual = _rows(p.x), _rows(p.residual)
    rows, N = p.rows, p.N
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    pre = torch.empty((rows, N), dtype=p.stream_dtype, device=x.device)
    mean = torch.empty((0 if p.is_rms_norm else rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, pre, mean, rstd
    weight, bias, shift, scale = (_float32(t) for t in (p.weight, p.bias, p.shift, p.scale))
    block, wide = block_size(N, FORWARD_BLOCKS)
    dummy = rstd    # stands in for absent tensors; never read (its flag is 0)
    norm_forward_kernel[(rows,)](
        x, pre if residual is None else residual, dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if shift is None else shift, dummy if scale is None else scale, out, pre,
        rstd if p.is_rms_norm else mean, rstd, N, p.rows_per_sample, x.stride(0),
        0 if residual is None else residual.stride(0), float(p.eps), float(p.dropout_p), 1.0 / (1.0 - p.dropout_p),
        _seed_value(p.dropout_p, p.dropout_seed), int(residual is not None), int(weight is not None),
        int(bias is not None), int(shift is not None), int(scale is not None), int(p.has_dropout),
        int(p.is_rms_norm), BLOCK_N=block, WIDE=wide, ROUND_BF16=INTERPRETING, num_warps=num_warps_for(block))
    return out, pre, mean, rstd


def norm_backward(problem):
    """Kernel of mmkern::norm_residual_backward: (dx, d_residual, dweight, dbias, dshift, dscale)."""
    p = problem
    dout, dpre, pre = _rows(p.dout), _rows(p.dpre), p.pre.contiguous()
    weight, bias, shift, scale = p.weight, p.bias, p.shift, p.scale
    rows, N = p.rows, p.N
    device = pre.device
    dx = torch.empty((rows, N), dtype=p.x_dtype, device=device)
    d_residual = torch.empty((rows, N) if p.has_residual else (0,), dtype=pre.dtype, device=device)
    batch = 1 if p.batch is None else p.batch

    def zeros_like(t):   # the result for an input that gets no gradient from zero rows
        return torch.zeros(t.shape, dtype=t.dtype, device=device) if t is not None else pre.new_empty((0,))

    if rows == 0:
        return dx, d_residual, zeros_like(weight), zeros_like(bias), zeros_like(shift), zeros_like(scale)
    rows_per_sample = rows // batch
    per_sample_programs, rows_per_program = programs_per_sample(rows_per_sample, batch, device)
    programs = batch * per_sample_programs

    def partial(t):      # (programs, N) float32 partial sums of one reduced gradient
        return torch.empty((programs, N), dtype=torch.float32, device=device) if t is not None else None

    parts = [partial(t) for t in (weight, bias, shift, scale)]
    block, wide = block_size(N, BACKWARD_BLOCKS)
    # (mean, rstd, mean(dxhat * xhat), mean(dxhat)) per row, between the two passes over wide rows
    row_stats = torch.empty((rows, 4) if wide else (1,), dtype=torch.float32, device=device)
    weight32, bias32, scale32 = (_float32(t) for t in (weight, bias, scale))
    dummy = row_stats    # stands in for absent tensors; never read or written (its flag is 0)
    norm_backward_kernel[(programs,)](
        dout, pre if dpre is None else dpre, pre, dummy if weight32 is None else weight32,
        dummy if bias32 is None else bias32, dummy if scale32 is None else scale32,
        dx, d_residual, *(dummy if part is None else part for part in parts), row_stats,
        N, rows_per_sample, rows_per_program, per_sample_programs, dout.stride(0),
        0 if dpre is None else dpre.stride(0), float(p.eps), float(p.dropout_p), 1.0 / (1.0 - p.dropout_p),
        _seed_value(p.dropout_p, p.dropout_seed), int(p.has_residual), int(weight is not None),
        int(bias is not None), int(shift is not None), int(scale is not None), int(p.has_dropout),
        int(dpre is not None), int(p.is_rms_norm), BLOCK_N=block, WIDE=wide, ROUND_BF16=INTERPRETING,
        num_warps=num_warps_for(block))
    dweight_part, dbias_part, dshift_part, dscale_part = parts

    def total(part, like):                     # over every program
        return part.sum(0).to(like.dtype) if part is not None else pre.new_empty((0,))

    def per_sample(part, like):                # over the programs of each sample
        if part is None:
            return pre.new_empty((0,))
        return part.view(batch, per_sample_programs, N).sum(1).to(like.dtype)

    return (dx, d_residual, total(dweight_part, weight), total(dbias_part, bias), per_sample(dshift_part, shift),
            per_sample(dscale_part, scale))


def dropout_keep_mask(seed: int, shape: tuple[int, ...], dropout_p: float, device) -> torch.Tensor:
    """For tests: the bool keep mask the kernels draw for `seed` on rows of `shape` (row-major
    element index), from the same `_keep` as forward and backward."""
    numel = 1
    for n in shape:
        numel *= n
    mask = torch.empty(numel, dtype=torch.int8, device=device)
    if numel:
        block = 1024
        keep_mask_kernel[(triton.cdiv(numel, block),)](mask, numel, float(dropout_p), int(seed), BLOCK=block)
    return mask.view(shape).bool()


__all__ = ["norm_forward", "norm_backward", "norm_forward_reasons", "norm_backward_reasons", "dropout_keep_mask",
           "aot_configs", "INTERPRETING", "MAX_N"]
