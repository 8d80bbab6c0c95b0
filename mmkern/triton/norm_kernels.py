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
dweight, dbias, dshift, dscale. The launcher (mmkern/triton/norm.py) sums those rows in a fixed
order (torch .sum, deterministic, no atomics), per sample for dshift/dscale. mean and rstd are
recomputed from the stored pre (as the reference does), not taken from the forward. Narrow rows take
one pass (read pre, dout once; write dx, d_residual once); WIDE rows take a pass for the row
statistics (mean, rstd and the two row sums, merged block by block), then a pass over column blocks
(rows inside) so the partial sums stay in registers: pre and dout are read twice.

Only the row stride of x/residual/dout/dpre is free (the last dimension is contiguous); weight, bias,
shift and scale are float32. Optional inputs are runtime flags (do_not_specialize), not constexprs:
one compiled kernel per (dtype pair, block size) instead of 2^7 times as many, at the cost of a
uniform branch per row. The block sizes and the backward's grid are in mmkern/triton/norm_tiles.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

# runtime flags (and the seed): never specialised, so one compiled kernel serves every combination
FORWARD_FLAGS = ["has_residual", "has_weight", "has_bias", "has_shift", "has_scale", "has_dropout", "is_rms_norm"]
BACKWARD_FLAGS = ["has_residual", "has_weight", "has_bias", "has_shift", "has_scale", "has_dropout", "has_dpre",
                  "is_rms_norm"]


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


@triton.jit(do_not_specialize=["seed", *FORWARD_FLAGS])
def norm_forward_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr,
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


@triton.jit(do_not_specialize=["seed", *BACKWARD_FLAGS])
def norm_backward_kernel(dout_ptr, dpre_ptr, pre_ptr, weight_ptr, bias_ptr, scale_ptr,
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
def keep_mask_kernel(mask_ptr, numel, dropout_p, seed, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(mask_ptr + index, _keep(seed, index, dropout_p).to(tl.int8), mask=index < numel)
