"""Reference residual + LayerNorm / RMSNorm: the oracle for every norm kernel.

On rows of width N (x is (rows, N); the public functions flatten leading dimensions):
    pre  = dropout(x) + residual                      the new residual stream (returned with prenorm)
    LayerNorm: xhat = (pre - mean(pre)) * rstd,  rstd = 1 / sqrt(var(pre) + eps)   (biased variance)
    RMSNorm:   xhat = pre * rstd,                rstd = 1 / sqrt(mean(pre^2) + eps)
    out  = xhat * weight + bias                       (weight, bias optional)
    adaLN modulation (DiT): out = out * (1 + scale[sample]) + shift[sample], shift/scale (batch, N),
                      row r belongs to sample r // (rows // batch)  (x is (batch, ..., N) flattened)
dtypes: out like x; pre like residual, or (without residual) float32 when residual_in_fp32 else
like x (written out here: the oracle shares no dtype policy with the kernels, mmkern/ops/norm.py holds
theirs). The normalisation reads the float64 sum, before it is rounded to pre's dtype.
Computed in float64 unless precision.compute_in says otherwise. Each kernel takes the op's problem
record (mmkern/ops/norm.py) and reads only its schema arguments.
"""
from __future__ import annotations

import torch

from mmkern.reference.dropout import dropout_keep_mask, seed_value
from mmkern.reference.precision import up


def _keep_scale(dropout_p, dropout_seed, x):
    """keep / (1 - p) in the compute dtype (rows, N), or None without dropout."""
    if dropout_p == 0:
        return None
    keep = dropout_keep_mask(seed_value(dropout_seed), tuple(x.shape), dropout_p, x.device)
    return up(keep) / (1.0 - dropout_p)


def _normalize(pre: torch.Tensor, eps: float, is_rms_norm: bool):
    """(xhat, mean or None, rstd) of rows in the compute dtype."""
    if is_rms_norm:
        rstd = torch.rsqrt(pre.square().mean(-1, keepdim=True) + eps)
        return pre * rstd, None, rstd
    mean = pre.mean(-1, keepdim=True)
    centered = pre - mean
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    return centered * rstd, mean, rstd


def per_row(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """A (batch, N) modulation tensor expanded to (rows, N): row r takes sample r // (rows // batch)."""
    if t is None:
        return None
    batch = t.shape[0]
    return t.repeat_interleave(rows // batch, dim=0) if batch else t


def forward(problem):
    """Kernel of mmkern::norm_residual_forward. Returns (out, pre, mean, rstd); mean and rstd are
    float32 (rows,), mean is empty for RMSNorm."""
    p = problem
    x, residual, weight, bias, shift, scale = p.x, p.residual, p.weight, p.bias, p.shift, p.scale
    eps, dropout_p, dropout_seed, is_rms_norm = p.eps, p.dropout_p, p.dropout_seed, p.is_rms_norm
    if residual is not None:                       # the residual stream's dtype
        stream_dtype = residual.dtype
    elif p.residual_in_fp32:
        stream_dtype = torch.float32
    else:
        stream_dtype = x.dtype
    keep_scale = _keep_scale(dropout_p, dropout_seed, x)
    pre = up(x) if keep_scale is None else up(x) * keep_scale
    if residual is not None:
        pre = pre + up(residual)
    xhat, mean, rstd = _normalize(pre, eps, is_rms_norm)
    out = xhat
    if weight is not None:
        out = out * up(weight)
    if bias is not None:
        out = out + up(bias)
    if scale is not None:
        out = out * (1 + up(per_row(scale, x.shape[0])))
    if shift is not None:
        out = out + up(per_row(shift, x.shape[0]))
    mean = x.new_empty((0,), dtype=torch.float32) if mean is None else mean.squeeze(-1).float()
    # copy=True: with float64 inputs `pre` can be `x` itself, and an op's output may not alias an input
    return out.to(x.dtype).contiguous(), pre.to(stream_dtype, copy=True), mean, rstd.squeeze(-1).float()


def backward(problem):
    """Kernel of mmkern::norm_residual_backward, from the stored residual stream `pre`:

        dy = dout * (1 + scale)    (dout without modulation; y = xhat * weight + bias)
        dshift = sum_rows_of_sample dout,   dscale = sum_rows_of_sample dout * y
        dxhat = dy * weight
        LayerNorm: dpre = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        RMSNorm:   dpre = rstd * (dxhat - xhat * mean(dxhat * xhat))
        dpre += gradient arriving on the returned pre (prenorm)
        d_residual = dpre,   dx = dpre * keep / (1 - p),   dweight = sum_rows dy * xhat,   dbias = sum_rows dy
    Returns (dx, d_residual, dweight, dbias, dshift, dscale); those without a matching input are empty.
    """
    p = problem
    dout, dpre, pre, weight, bias, shift, scale = p.dout, p.dpre, p.pre, p.weight, p.bias, p.shift, p.scale
    eps, dropout_p, dropout_seed, is_rms_norm = p.eps, p.dropout_p, p.dropout_seed, p.is_rms_norm
    pre_c = up(pre)
    rows = pre.shape[0]
    xhat, _, rstd64 = _normalize(pre_c, eps, is_rms_norm)
    dout_c = up(dout)
    dy = dout_c if scale is None else dout_c * (1 + up(per_row(scale, rows)))
    dxhat = dy if weight is None else dy * up(weight)
    projection = (dxhat * xhat).mean(-1, keepdim=True)
    if is_rms_norm:
        d_pre = rstd64 * (dxhat - xhat * projection)
    else:
        d_pre = rstd64 * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * projection)
    if dpre is not None:
        d_pre = d_pre + up(dpre)
    keep_scale = _keep_scale(dropout_p, dropout_seed, pre)
    dx = d_pre if keep_scale is None else d_pre * keep_scale
    def empty():  # a fresh one each time: an op's outputs may not alias each other
        return pre.new_empty((0,))

    d_residual = d_pre.to(pre.dtype, copy=True) if p.has_residual else empty()   # never the same tensor as dx
    dweight = (dy * xhat).sum(0).to(weight.dtype) if weight is not None else empty()
    dbias = dy.sum(0).to(bias.dtype) if bias is not None else empty()

    def per_sample_sum(t, like):  # (rows, N) -> (batch, N): the rows of each sample summed
        if t.shape[0] == 0:
            return like.new_zeros(like.shape)
        return t.reshape(like.shape[0], -1, t.shape[-1]).sum(1).to(like.dtype)

    dshift = per_sample_sum(dout_c, shift) if shift is not None else empty()
    if scale is not None:
        y = xhat if weight is None else xhat * up(weight)
        y = y if bias is None else y + up(bias)
        dscale = per_sample_sum(dout_c * y, scale)
    else:
        dscale = empty()
    return dx.to(p.x_dtype, copy=True), d_residual, dweight, dbias, dshift, dscale
