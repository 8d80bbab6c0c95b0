"""Triton kernels of residual + LayerNorm/RMSNorm (mmkern::norm_residual_forward / _backward).

On rows of width N (x is (rows, N)); one row is one LayerNorm, row r belongs to adaLN sample
r // rows_per_sample:
    pre  = dropout(x) + residual                       stored in the residual-stream dtype
    xhat = (pre - mean) * rstd        (RMSNorm: mean = 0, rstd = 1 / sqrt(mean(pre^2) + eps))
    y    = xhat * weight + bias;  out = y * (1 + scale[sample]) + shift[sample]
All arithmetic in float32 whatever the storage dtypes. The statistics read the float32 sum,
before it is rounded to pre's dtype (as the float64 reference does).

Forward: one program per row. A row of N <= 8192 columns lives in registers: read x and
residual once, write pre and out once (the minimum traffic). Wider rows (WIDE) loop over column
blocks twice: pass 1 computes pre, stores it and merges per-block (mean, M2) with Chan's formula
(no sum-of-squares cancellation); pass 2 recomputes pre from x and residual (not from the stored,
rounded pre) and writes out. Dropout is a counter-based Philox draw, `tl.rand(seed, row * N + col)`,
so the backward regenerates the forward's mask from (seed, index) instead of storing it.

Backward: a grid of programs, each owning a run of consecutive rows inside one sample. Per row:
    dxhat = dout * weight * (1 + scale)
    dpre  = rstd * (dxhat - mean(dxhat) * [LayerNorm] - xhat * mean(dxhat * xhat)) + dpre_in
    d_residual = dpre;   dx = dpre * keep / (1 - p)
and per program two float32 sums over its rows, sum(dout * xhat) and sum(dout), from which (its
rows sharing one sample's scale) it writes one (N,) partial row of each reduced gradient:
dweight, dbias, dshift, dscale. The launcher sums those rows in a fixed order (torch .sum,
deterministic, no atomics), per sample for dshift/dscale. mean and rstd are recomputed from the
stored pre (as the reference does), not taken from the forward. Narrow rows take one pass (read pre,
dout once; write dx, d_residual once); WIDE rows take a pass for the row statistics (mean, rstd and
the two row sums, merged block by block), then a pass over column blocks (rows inside) so the
partial sums stay in registers: pre and dout are read twice.

Only the row stride of x/residual/dout/dpre is free (the last dimension is contiguous); every
output is a new contiguous tensor. weight, bias, shift and scale are read as float32 (cast once
here when given in half precision: N or batch * N elements, small next to x).
Optional inputs are runtime flags (do_not_specialize), not constexprs: one compiled kernel per
(dtype pair, block size) instead of 2^7 times as many, at the cost of a uniform branch per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkern.reference.norm import residual_dtype
from mmkern.triton._common import INTERPRETING, KERNEL_DTYPES, TRITON_POINTER, dtype_reasons

MAX_N = 65536          # widest row the kernels take
# Column blocks held in registers; a row takes the smallest that covers it, wider rows loop over
# the largest (WIDE). Few sizes keep the compiled set small (a block up to 4x wider than the row
# only masks lanes: no extra memory traffic). The backward keeps more (N,)-vectors live per row, so
# its largest block is half the forward's (ptxas -v, sm_90, 16 warps: forward 8192 uses 64
# registers, backward 4096 uses 120, neither spills).
FORWARD_BLOCKS = (256, 1024, 2048, 4096, 8192)
BACKWARD_BLOCKS = (256, 1024, 2048, 4096)
# (x dtype, residual-stream dtype) pairs the kernels are compiled for
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))
# runtime flags (and the seed): never specialised, so one compiled kernel serves every combination
_FORWARD_FLAGS = ["has_residual", "has_weight", "has_bias", "has_shift", "has_scale", "has_dropout", "is_rms_norm"]
_BACKWARD_FLAGS = ["has_residual", "has_weight", "has_bias", "has_shift", "has_scale", "has_dropout", "has_dpre",
                   "is_rms_norm"]


def block_size(N: int, blocks: tuple[int, ...]) -> tuple[int, bool]:
    """(BLOCK_N, WIDE) for rows of N columns."""
    for block in blocks:
        if N <= block:
            return block, False
    return blocks[-1], True


def num_warps_for(block: int) -> int:
    return min(max(block // 256, 1), 16)


@triton.jit
def _keep(seed, offsets, dropout_p):
    """True where element `offsets` (row * N + col, int64) survives dropout: Philox, a pure
    function of (seed, index), the same in forward, backward and dropout_keep_mask."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _store(pointer, value, mask, ROUND_BF16: tl.constexpr):
    """Store float32 `value` in the pointer's dtype. Triton's interpreter (3.8) truncates float32 ->
    bfloat16 where a GPU rounds to nearest even; ROUND_BF16 (set only under the interpreter) rounds
    the bits first, so CPU tests see the GPU's bfloat16 outputs."""
    if ROUND_BF16:
        if pointer.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            value = bits.to(tl.float32, bitcast=True)
    tl.store(pointer, value.to(pointer.dtype.element_ty), mask=mask)


@triton.jit
def _load_pre(x_row, residual_row, cols, in_row, index, seed, dropout_p, dropout_scale, has_residual, has_dropout):
    """pre = dropout(x) + residual on one column block, float32 (0 outside the row)."""
    pre = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
    if has_dropout:
        pre = tl.where(_keep(seed, index, dropout_p), pre * dropout_scale, 0.0)
    if has_residual:
        pre += tl.load(residual_row + cols, mask=in_row, other=0.0).to(tl.float32)
    return pre


@triton.jit
def _affine(xhat, cols, in_row, weight_ptr, bias_ptr, has_weight, has_bias):
    """y = xhat * weight + bias on one column block (weight, bias float32)."""
    y = xhat
    if has_weight:
        y = y * tl.load(weight_ptr + cols, mask=in_row, other=0.0)
    if has_bias:
        y += tl.load(bias_ptr + cols, mask=in_row, other=0.0)
    return y


@triton.jit(do_not_specialize=["seed", *_FORWARD_FLAGS])
def _norm_forward_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr,
                         out_ptr, pre_ptr, mean_ptr, rstd_ptr,
                         N, rows_per_sample, x_row_stride, residual_row_stride, eps, dropout_p, dropout_scale, seed,
                         has_residual, has_weight, has_bias, has_shift, has_scale, has_dropout, is_rms_norm,
                         BLOCK_N: tl.constexpr, WIDE: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_row = x_ptr + row * x_row_stride
    residual_row = residual_ptr + row * residual_row_stride
    pre_row = pre_ptr + row * N
    out_row = out_ptr + row * N
    modulation_row = (row // rows_per_sample) * N
    if WIDE:
        # pass 1: pre, stored; running (count, mean, M2) merged block by block (Chan et al.)
        count = 0.0
        mean = 0.0
        m2 = 0.0
        sum_squares = 0.0
        for start in range(0, N, BLOCK_N):
            c = start + cols
            in_row = c < N
            pre = _load_pre(x_row, residual_row, c, in_row, row * N + c, seed, dropout_p, dropout_scale,
                            has_residual, has_dropout)
            _store(pre_row + c, pre, in_row, ROUND_BF16)
            block_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            block_mean = tl.sum(pre, axis=0) / block_count
            centered = tl.where(in_row, pre - block_mean, 0.0)
            block_m2 = tl.sum(centered * centered, axis=0)
            total = count + block_count
            delta = block_mean - mean
            mean = mean + delta * (block_count / total)
            m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
            sum_squares += tl.sum(pre * pre, axis=0)
            count = total
    else:
        in_row = cols < N
        pre = _load_pre(x_row, residual_row, cols, in_row, row * N + cols, seed, dropout_p, dropout_scale,
                        has_residual, has_dropout)
        _store(pre_row + cols, pre, in_row, ROUND_BF16)
        mean = tl.sum(pre, axis=0) / N
        centered = tl.where(in_row, pre - mean, 0.0)
        m2 = tl.sum(centered * centered, axis=0)
        sum_squares = tl.sum(pre * pre, axis=0)
    variance = m2 / N
    if is_rms_norm:
        # mean(pre^2) summed directly (a sum of squares cannot cancel), not var + mean^2: a row holding
        # an inf then gives inf * 0 = NaN in that element and 0 elsewhere, as torch's rms_norm, where
        # var + mean^2 would be inf - inf = NaN across the whole row
        variance = sum_squares / N
        mean = tl.where(is_rms_norm, 0.0, mean)
    else:
        tl.store(mean_ptr + row, mean)
    rstd = 1.0 / tl.sqrt(variance + eps)
    tl.store(rstd_ptr + row, rstd)
    if WIDE:
        # pass 2: recompute pre from x and residual, normalise, write out
        for start in range(0, N, BLOCK_N):
            c = start + cols
            in_row = c < N
            pre = _load_pre(x_row, residual_row, c, in_row, row * N + c, seed, dropout_p, dropout_scale,
                            has_residual, has_dropout)
            y = _affine((pre - mean) * rstd, c, in_row, weight_ptr, bias_ptr, has_weight, has_bias)
            if has_scale:
                y = y * (1.0 + tl.load(scale_ptr + modulation_row + c, mask=in_row, other=0.0))
            if has_shift:
                y += tl.load(shift_ptr + modulation_row + c, mask=in_row, other=0.0)
            _store(out_row + c, y, in_row, ROUND_BF16)
    else:
        y = _affine((pre - mean) * rstd, cols, in_row, weight_ptr, bias_ptr, has_weight, has_bias)
        if has_scale:
            y = y * (1.0 + tl.load(scale_ptr + modulation_row + cols, mask=in_row, other=0.0))
        if has_shift:
            y += tl.load(shift_ptr + modulation_row + cols, mask=in_row, other=0.0)
        _store(out_row + cols, y, in_row, ROUND_BF16)


@triton.jit
def _grad_scale(weight_ptr, scale_ptr, modulation_row, cols, in_row, has_weight, has_scale):
    """weight * (1 + scale[sample]) on one column block, float32: dxhat = dout * that."""
    w = tl.where(in_row, 1.0, 0.0)
    if has_weight:
        w = w * tl.load(weight_ptr + cols, mask=in_row, other=0.0)
    if has_scale:
        w = w * (1.0 + tl.load(scale_ptr + modulation_row + cols, mask=in_row, other=0.0))
    return w


@triton.jit
def _input_grads(dxhat, xhat, rstd, projection, mean_dxhat, row, N, cols, in_row, dpre_row, dx_ptr, dresidual_ptr,
                 seed, dropout_p, dropout_scale, has_dpre, has_residual, has_dropout, ROUND_BF16: tl.constexpr):
    """dpre = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) + dpre_in; store d_residual = dpre
    and dx = dpre * keep / (1 - p) for one row on one column block."""
    dpre = rstd * (dxhat - mean_dxhat - xhat * projection)
    if has_dpre:
        dpre += tl.load(dpre_row + cols, mask=in_row, other=0.0).to(tl.float32)
    if has_residual:
        _store(dresidual_ptr + row * N + cols, dpre, in_row, ROUND_BF16)
    if has_dropout:
        dpre = tl.where(_keep(seed, row * N + cols, dropout_p), dpre * dropout_scale, 0.0)
    _store(dx_ptr + row * N + cols, dpre, in_row, ROUND_BF16)


@triton.jit
def _store_partials(sum_dout_xhat, sum_dout, part_row, cols, in_row, weight_ptr, bias_ptr, scale_ptr, modulation_row,
                    dweight_part_ptr, dbias_part_ptr, dshift_part_ptr, dscale_part_ptr,
                    has_weight, has_bias, has_shift, has_scale):
    """This program's partial sums of the four reduced gradients on one column block. Its rows lie in
    one sample, so (1 + scale) is a constant factor and two sums give all four:
        dweight = (1 + scale) * sum(dout * xhat)    dbias = (1 + scale) * sum(dout)
        dshift  = sum(dout)                         dscale = weight * sum(dout * xhat) + bias * sum(dout)"""
    factor = tl.where(in_row, 1.0, 0.0)
    if has_scale:
        factor = 1.0 + tl.load(scale_ptr + modulation_row + cols, mask=in_row, other=0.0)
    if has_weight:
        tl.store(dweight_part_ptr + part_row + cols, factor * sum_dout_xhat, mask=in_row)
    if has_bias:
        tl.store(dbias_part_ptr + part_row + cols, factor * sum_dout, mask=in_row)
    if has_shift:
        tl.store(dshift_part_ptr + part_row + cols, sum_dout, mask=in_row)
    if has_scale:
        dscale = sum_dout_xhat
        if has_weight:
            dscale = dscale * tl.load(weight_ptr + cols, mask=in_row, other=0.0)
        if has_bias:
            dscale += sum_dout * tl.load(bias_ptr + cols, mask=in_row, other=0.0)
        tl.store(dscale_part_ptr + part_row + cols, dscale, mask=in_row)


@triton.jit(do_not_specialize=["seed", *_BACKWARD_FLAGS])
def _norm_backward_kernel(dout_ptr, dpre_ptr, pre_ptr, weight_ptr, bias_ptr, scale_ptr,
                          dx_ptr, dresidual_ptr, dweight_part_ptr, dbias_part_ptr, dshift_part_ptr, dscale_part_ptr,
                          row_stats_ptr,
                          N, rows_per_sample, rows_per_program, programs_per_sample, dout_row_stride, dpre_row_stride,
                          eps, dropout_p, dropout_scale, seed,
                          has_residual, has_weight, has_bias, has_shift, has_scale, has_dropout, has_dpre, is_rms_norm,
                          BLOCK_N: tl.constexpr, WIDE: tl.constexpr, ROUND_BF16: tl.constexpr):
    # The statistics are recomputed from the stored (rounded) pre, not taken from the forward: with
    # pre in half precision, (rounded pre - unrounded mean) * rstd is rounding noise times up to
    # 1/sqrt(eps) (a width-1 LayerNorm has xhat = 0 exactly). Free for narrow rows (in registers).
    program = tl.program_id(0)
    sample = program // programs_per_sample
    first_row = sample.to(tl.int64) * rows_per_sample + (program % programs_per_sample) * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, (sample.to(tl.int64) + 1) * rows_per_sample)
    cols = tl.arange(0, BLOCK_N)
    part_row = program.to(tl.int64) * N
    modulation_row = sample.to(tl.int64) * N
    centre = 1.0 - is_rms_norm                     # LayerNorm subtracts the means; RMSNorm does not
    if WIDE:
        # pass A, per row: mean and M2 of pre, mean of dxhat and the co-moment sum((pre - mean) * dxhat),
        # merged block by block (Chan et al.), give (mean, rstd, mean(dxhat * xhat), mean(dxhat))
        # -> a (rows, 4) float32 scratch
        for row in range(first_row, end_row):
            count = 0.0
            mean = 0.0
            m2 = 0.0
            mean_dxhat = 0.0
            comoment = 0.0
            for start in range(0, N, BLOCK_N):
                c = start + cols
                in_row = c < N
                pre = tl.load(pre_ptr + row * N + c, mask=in_row, other=0.0).to(tl.float32)
                dout = tl.load(dout_ptr + row * dout_row_stride + c, mask=in_row, other=0.0).to(tl.float32)
                dxhat = dout * _grad_scale(weight_ptr, scale_ptr, modulation_row, c, in_row, has_weight, has_scale)
                block_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
                block_mean = tl.sum(pre, axis=0) / block_count
                block_mean_dxhat = tl.sum(dxhat, axis=0) / block_count
                centered = tl.where(in_row, pre - block_mean, 0.0)
                block_m2 = tl.sum(centered * centered, axis=0)
                block_comoment = tl.sum(centered * (dxhat - block_mean_dxhat), axis=0)
                total = count + block_count
                delta = block_mean - mean
                delta_dxhat = block_mean_dxhat - mean_dxhat
                weight_ab = count * block_count / total
                mean = mean + delta * (block_count / total)
                mean_dxhat = mean_dxhat + delta_dxhat * (block_count / total)
                m2 = m2 + block_m2 + delta * delta * weight_ab
                comoment = comoment + block_comoment + delta * delta_dxhat * weight_ab
                count = total
            variance = m2 / N
            if is_rms_norm:                        # about 0: mean(pre^2), sum(pre * dxhat)
                variance = variance + mean * mean
                comoment = comoment + N * mean * mean_dxhat
                mean = mean * 0.0
            rstd = 1.0 / tl.sqrt(variance + eps)
            tl.store(row_stats_ptr + 4 * row, mean)
            tl.store(row_stats_ptr + 4 * row + 1, rstd)
            tl.store(row_stats_ptr + 4 * row + 2, comoment * rstd / N)
            tl.store(row_stats_ptr + 4 * row + 3, mean_dxhat * centre)
        tl.debug_barrier()   # the scratch written by some threads is read by all below
        # pass B: column blocks outside, rows inside, so the partial sums stay in registers
        for start in range(0, N, BLOCK_N):
            c = start + cols
            in_row = c < N
            grad_scale = _grad_scale(weight_ptr, scale_ptr, modulation_row, c, in_row, has_weight, has_scale)
            sum_dout_xhat = tl.zeros([BLOCK_N], tl.float32)
            sum_dout = tl.zeros([BLOCK_N], tl.float32)
            for row in range(first_row, end_row):
                mean = tl.load(row_stats_ptr + 4 * row)
                rstd = tl.load(row_stats_ptr + 4 * row + 1)
                projection = tl.load(row_stats_ptr + 4 * row + 2)
                mean_dxhat = tl.load(row_stats_ptr + 4 * row + 3)
                pre = tl.load(pre_ptr + row * N + c, mask=in_row, other=0.0).to(tl.float32)
                xhat = tl.where(in_row, (pre - mean) * rstd, 0.0)
                dout = tl.load(dout_ptr + row * dout_row_stride + c, mask=in_row, other=0.0).to(tl.float32)
                _input_grads(dout * grad_scale, xhat, rstd, projection, mean_dxhat, row, N, c, in_row,
                             dpre_ptr + row * dpre_row_stride, dx_ptr, dresidual_ptr, seed, dropout_p, dropout_scale,
                             has_dpre, has_residual, has_dropout, ROUND_BF16)
                sum_dout_xhat += dout * xhat
                sum_dout += dout
            _store_partials(sum_dout_xhat, sum_dout, part_row, c, in_row, weight_ptr, bias_ptr, scale_ptr,
                            modulation_row, dweight_part_ptr, dbias_part_ptr, dshift_part_ptr, dscale_part_ptr,
                            has_weight, has_bias, has_shift, has_scale)
    else:
        in_row = cols < N
        grad_scale = _grad_scale(weight_ptr, scale_ptr, modulation_row, cols, in_row, has_weight, has_scale)
        sum_dout_xhat = tl.zeros([BLOCK_N], tl.float32)
        sum_dout = tl.zeros([BLOCK_N], tl.float32)
        for row in range(first_row, end_row):
            pre = tl.load(pre_ptr + row * N + cols, mask=in_row, other=0.0).to(tl.float32)
            mean = tl.sum(pre, axis=0) / N * centre
            centered = tl.where(in_row, pre - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
            xhat = centered * rstd
            dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
            dxhat = dout * grad_scale
            projection = tl.sum(dxhat * xhat, axis=0) / N
            mean_dxhat = tl.sum(dxhat, axis=0) / N * centre
            _input_grads(dxhat, xhat, rstd, projection, mean_dxhat, row, N, cols, in_row,
                         dpre_ptr + row * dpre_row_stride, dx_ptr, dresidual_ptr, seed, dropout_p, dropout_scale,
                         has_dpre, has_residual, has_dropout, ROUND_BF16)
            sum_dout_xhat += dout * xhat
            sum_dout += dout
        _store_partials(sum_dout_xhat, sum_dout, part_row, cols, in_row, weight_ptr, bias_ptr, scale_ptr,
                        modulation_row, dweight_part_ptr, dbias_part_ptr, dshift_part_ptr, dscale_part_ptr,
                        has_weight, has_bias, has_shift, has_scale)


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(mask_ptr, numel, dropout_p, seed, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(mask_ptr + index, _keep(seed, index, dropout_p).to(tl.int8), mask=index < numel)


# --------------------------------------------------------------------------- launchers

def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index columns with stride 1 and rows with a free stride."""
    if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _seed_value(dropout_p: float, dropout_seed: torch.Tensor | None) -> int:
    return int(dropout_seed.reshape(-1)[0]) if dropout_p > 0 else 0


def _reasons(x_dtype, stream_dtype, N, **tensors) -> list[str]:
    reasons = dtype_reasons(**tensors)
    if x_dtype in KERNEL_DTYPES and stream_dtype in KERNEL_DTYPES and (x_dtype, stream_dtype) not in DTYPE_PAIRS:
        reasons.append(f"the residual stream has dtype {stream_dtype}; with x in {x_dtype} the Triton kernels take "
                       f"a residual stream in {x_dtype} or float32")
    if N > MAX_N:
        reasons.append(f"rows of {N} columns; the Triton kernels take at most {MAX_N}")
    return reasons


def norm_forward_reasons(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm,
                         shift=None, scale=None) -> list[str]:
    return _reasons(x.dtype, residual_dtype(x, residual, residual_in_fp32), x.shape[-1], x=x, residual=residual,
                    weight=weight, bias=bias, shift=shift, scale=scale)


def norm_backward_reasons(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm,
                          has_residual, x_dtype, shift=None, scale=None) -> list[str]:
    reasons = _reasons(x_dtype, pre.dtype, pre.shape[-1], dout=dout, dpre=dpre, pre=pre, weight=weight, bias=bias,
                       shift=shift, scale=scale)
    if x_dtype not in KERNEL_DTYPES:
        reasons.append(f"x had dtype {x_dtype}; the Triton kernels take float16, bfloat16 and float32")
    if dout.dtype != x_dtype:
        reasons.append(f"dout has dtype {dout.dtype}, not x's {x_dtype}")
    if dpre is not None and dpre.dtype != pre.dtype:
        reasons.append(f"dpre has dtype {dpre.dtype}, not pre's {pre.dtype}")
    return reasons


def _rows_per_sample(rows: int, shift, scale) -> int:
    modulation = shift if shift is not None else scale
    if modulation is None or modulation.shape[0] == 0:
        return max(rows, 1)
    return max(rows // modulation.shape[0], 1)


def norm_forward(x, residual, weight, bias, eps, dropout_p, dropout_seed, residual_in_fp32, is_rms_norm, shift=None,
                 scale=None):
    """Kernel of mmkern::norm_residual_forward: (out, pre, mean, rstd), see mmkern/ops/norm.py."""
    x, residual = _rows(x), _rows(residual)
    rows, N = x.shape
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)
    pre = torch.empty((rows, N), dtype=residual_dtype(x, residual, residual_in_fp32), device=x.device)
    mean = torch.empty((0 if is_rms_norm else rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, pre, mean, rstd
    weight, bias, shift, scale = (_float32(t) for t in (weight, bias, shift, scale))
    block, wide = block_size(N, FORWARD_BLOCKS)
    dummy = rstd    # stands in for absent tensors; never read (its flag is 0)
    _norm_forward_kernel[(rows,)](
        x, pre if residual is None else residual, dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if shift is None else shift, dummy if scale is None else scale, out, pre, rstd if is_rms_norm else mean,
        rstd, N, _rows_per_sample(rows, shift, scale), x.stride(0), 0 if residual is None else residual.stride(0),
        float(eps), float(dropout_p), 1.0 / (1.0 - dropout_p), _seed_value(dropout_p, dropout_seed),
        int(residual is not None), int(weight is not None), int(bias is not None), int(shift is not None),
        int(scale is not None), int(dropout_p > 0), int(is_rms_norm), BLOCK_N=block, WIDE=wide,
        ROUND_BF16=INTERPRETING, num_warps=num_warps_for(block))
    return out, pre, mean, rstd


def _programs_per_sample(rows_per_sample: int, batch: int, device: torch.device) -> tuple[int, int]:
    """(programs per sample, rows per program) of the backward grid: two programs per SM on a GPU
    (flash-attn's and Liger's layer norms take one; each program adds one (N,) float32 partial row
    per reduced gradient, written and read again by the final sum: at 4096 x 768 two per SM cost
    ~6% of the backward's traffic), few under the interpreter (it runs programs one by one)."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = min(rows_per_sample, max(1, triton.cdiv(target, batch)))
    rows_per_program = triton.cdiv(rows_per_sample, programs)
    return triton.cdiv(rows_per_sample, rows_per_program), rows_per_program


def norm_backward(dout, dpre, pre, weight, bias, mean, rstd, eps, dropout_p, dropout_seed, is_rms_norm,
                  has_residual, x_dtype, shift=None, scale=None):
    """Kernel of mmkern::norm_residual_backward: (dx, d_residual, dweight, dbias, dshift, dscale)."""
    dout, dpre, pre = _rows(dout), _rows(dpre), pre.contiguous()
    rows, N = pre.shape
    device = pre.device
    dx = torch.empty((rows, N), dtype=x_dtype, device=device)
    d_residual = torch.empty((rows, N) if has_residual else (0,), dtype=pre.dtype, device=device)
    modulation = shift if shift is not None else scale
    batch = 1 if modulation is None else modulation.shape[0]

    def zeros_like(t):   # the result for an input that gets no gradient from zero rows
        return torch.zeros(t.shape, dtype=t.dtype, device=device) if t is not None else pre.new_empty((0,))

    if rows == 0:
        return dx, d_residual, zeros_like(weight), zeros_like(bias), zeros_like(shift), zeros_like(scale)
    rows_per_sample = rows // batch
    programs_per_sample, rows_per_program = _programs_per_sample(rows_per_sample, batch, device)
    programs = batch * programs_per_sample

    def partial(t):      # (programs, N) float32 partial sums of one reduced gradient
        return torch.empty((programs, N), dtype=torch.float32, device=device) if t is not None else None

    parts = [partial(t) for t in (weight, bias, shift, scale)]
    block, wide = block_size(N, BACKWARD_BLOCKS)
    # (mean, rstd, mean(dxhat * xhat), mean(dxhat)) per row, between the two passes over wide rows
    row_stats = torch.empty((rows, 4) if wide else (1,), dtype=torch.float32, device=device)
    weight32, bias32, scale32 = (_float32(t) for t in (weight, bias, scale))
    dummy = row_stats    # stands in for absent tensors; never read or written (its flag is 0)
    _norm_backward_kernel[(programs,)](
        dout, pre if dpre is None else dpre, pre, dummy if weight32 is None else weight32,
        dummy if bias32 is None else bias32, dummy if scale32 is None else scale32,
        dx, d_residual, *(dummy if p is None else p for p in parts), row_stats,
        N, rows_per_sample, rows_per_program, programs_per_sample, dout.stride(0),
        0 if dpre is None else dpre.stride(0), float(eps), float(dropout_p), 1.0 / (1.0 - dropout_p),
        _seed_value(dropout_p, dropout_seed), int(has_residual), int(weight is not None), int(bias is not None),
        int(shift is not None), int(scale is not None), int(dropout_p > 0), int(dpre is not None), int(is_rms_norm),
        BLOCK_N=block, WIDE=wide, ROUND_BF16=INTERPRETING, num_warps=num_warps_for(block))
    dweight_part, dbias_part, dshift_part, dscale_part = parts

    def total(part, like):                     # over every program
        return part.sum(0).to(like.dtype) if part is not None else pre.new_empty((0,))

    def per_sample(part, like):                # over the programs of each sample
        if part is None:
            return pre.new_empty((0,))
        return part.view(batch, programs_per_sample, N).sum(1).to(like.dtype)

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
        _keep_mask_kernel[(triton.cdiv(numel, block),)](mask, numel, float(dropout_p), int(seed), BLOCK=block)
    return mask.view(shape).bool()


# --------------------------------------------------------------------------- ahead-of-time configurations

def aot_configs():
    """Every (dtype pair, block size) the launchers can dispatch, for the ahead-of-time compile check.
    Integer arguments are declared i32 (seed i64): larger values compile the same code with i64."""
    def blocks(sizes):
        return [(b, False) for b in sizes] + [(sizes[-1], True)]

    flags = {name: "i32" for name in _BACKWARD_FLAGS}
    for x_dtype, stream_dtype in DTYPE_PAIRS:
        xp, sp = TRITON_POINTER[x_dtype], TRITON_POINTER[stream_dtype]
        for block, wide in blocks(FORWARD_BLOCKS):
            constexprs = dict(BLOCK_N=block, WIDE=wide, ROUND_BF16=False)
            forward = {"x_ptr": xp, "residual_ptr": sp, "weight_ptr": "*fp32", "bias_ptr": "*fp32",
                       "shift_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": xp, "pre_ptr": sp, "mean_ptr": "*fp32",
                       "rstd_ptr": "*fp32", "N": "i32", "rows_per_sample": "i32", "x_row_stride": "i32",
                       "residual_row_stride": "i32", "eps": "fp32", "dropout_p": "fp32", "dropout_scale": "fp32",
                       "seed": "i64", **{name: "i32" for name in _FORWARD_FLAGS}}
            yield _norm_forward_kernel, forward, constexprs, num_warps_for(block), 1
        for block, wide in blocks(BACKWARD_BLOCKS):
            constexprs = dict(BLOCK_N=block, WIDE=wide, ROUND_BF16=False)
            backward = {"dout_ptr": xp, "dpre_ptr": sp, "pre_ptr": sp, "weight_ptr": "*fp32", "bias_ptr": "*fp32",
                        "scale_ptr": "*fp32", "dx_ptr": xp,
                        "dresidual_ptr": sp, "dweight_part_ptr": "*fp32", "dbias_part_ptr": "*fp32",
                        "dshift_part_ptr": "*fp32", "dscale_part_ptr": "*fp32", "row_stats_ptr": "*fp32", "N": "i32",
                        "rows_per_sample": "i32", "rows_per_program": "i32", "programs_per_sample": "i32",
                        "dout_row_stride": "i32", "dpre_row_stride": "i32", "eps": "fp32", "dropout_p": "fp32",
                        "dropout_scale": "fp32", "seed": "i64", **flags}
            yield _norm_backward_kernel, backward, constexprs, num_warps_for(block), 1


__all__ = ["norm_forward", "norm_backward", "norm_forward_reasons", "norm_backward_reasons", "dropout_keep_mask",
           "aot_configs", "INTERPRETING"]
