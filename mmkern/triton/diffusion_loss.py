"""Triton kernels of the diffusion loss: forward (partial sums + a one-program reduction) and the
fused backward. See mmkern/reference/diffusion_loss.py for the math.

Samples (B, ...) are viewed flat (numel elements); element i belongs to sample i // per_sample,
whose a = alphas_cumprod[timesteps[sample]] is gathered inside the kernel (cached loads).
  forward:  program p reads BLOCK elements of model_output (+ noise and/or x0, as the target
            needs), writes one fp32 partial sum of w * (mo - target)^2 to partials[p]; then ONE
            program sums the partials in a fixed order and scales by 1 / numel. Deterministic (no
            atomics): the same inputs give the same bits on every run.
            Traffic: 2-3 reads of numel * itemsize, plus 4 bytes per BLOCK elements.
  backward: d mo = grad * (2 / numel) * w * (mo - target) in one pass; grad (0-d) is read from
            device memory, so there is no host synchronisation. Traffic: 2-3 reads + 1 write.
Everything in float32 whatever the samples' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkern.triton._common import dtype_reasons

BLOCK = 1024
REDUCE_BLOCK = 1024
NUM_WARPS = 4
PREDICTION = {"epsilon": 0, "v_prediction": 1, "sample": 2}


@triton.jit
def _weighted_difference(mo_ptr, x0_ptr, noise_ptr, timesteps_ptr, alphas_cumprod_ptr, offsets, in_bounds,
                         per_sample, timestep_stride, T, snr_gamma, PRED: tl.constexpr, MIN_SNR: tl.constexpr):
    """(w, mo - target) for a block of elements, fp32."""
    sample = offsets // per_sample
    t = tl.load(timesteps_ptr + sample * timestep_stride, mask=in_bounds, other=0)
    t = tl.minimum(tl.maximum(t, 0), T - 1)              # never read outside the table
    a = tl.load(alphas_cumprod_ptr + t, mask=in_bounds, other=0.5).to(tl.float32)
    mo = tl.load(mo_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if PRED == 0:
        target = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    elif PRED == 1:
        noise = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        target = tl.sqrt(a) * noise - tl.sqrt(1.0 - a) * x0
    else:
        target = tl.load(x0_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if MIN_SNR:     # min(SNR, g) / SNR, / (SNR + 1), or min(SNR, g), written without inf / NaN
        # (denominators kept >= 1e-30: a = 0 or 1 gives a huge finite ratio that the min caps, never inf)
        if PRED == 0:
            w = tl.minimum(snr_gamma * (1.0 - a) / tl.maximum(a, 1e-30), 1.0)
        elif PRED == 1:
            w = tl.minimum(a, snr_gamma * (1.0 - a))
        else:
            w = tl.minimum(a / tl.maximum(1.0 - a, 1e-30), snr_gamma)
    else:
        w = tl.full([1], 1.0, tl.float32)
    return w, mo - target


@triton.jit
def _loss_partials_kernel(mo_ptr, x0_ptr, noise_ptr, timesteps_ptr, alphas_cumprod_ptr, partials_ptr, numel,
                          per_sample, timestep_stride, T, snr_gamma, PRED: tl.constexpr, MIN_SNR: tl.constexpr,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    w, diff = _weighted_difference(mo_ptr, x0_ptr, noise_ptr, timesteps_ptr, alphas_cumprod_ptr, offsets, in_bounds,
                                   per_sample, timestep_stride, T, snr_gamma, PRED, MIN_SNR)
    contribution = tl.where(in_bounds, w * diff * diff, 0.0)
    tl.store(partials_ptr + pid, tl.sum(contribution, axis=0))


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    """One program: out = scale * sum(partials[0:n]), always in the same order."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offsets, mask=offsets < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _loss_backward_kernel(grad_ptr, mo_ptr, x0_ptr, noise_ptr, timesteps_ptr, alphas_cumprod_ptr, d_mo_ptr, numel,
                          per_sample, timestep_stride, T, snr_gamma, scale, PRED: tl.constexpr,
                          MIN_SNR: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    w, diff = _weighted_difference(mo_ptr, x0_ptr, noise_ptr, timesteps_ptr, alphas_cumprod_ptr, offsets, in_bounds,
                                   per_sample, timestep_stride, T, snr_gamma, PRED, MIN_SNR)
    grad = tl.load(grad_ptr).to(tl.float32)
    tl.store(d_mo_ptr + offsets, (grad * scale * w * diff).to(d_mo_ptr.dtype.element_ty), mask=in_bounds)


def loss_reasons(problem) -> list[str]:
    """What the kernels do not take in a LossProblem (forward and backward)."""
    return dtype_reasons(model_output=problem.model_output)


def _common(p):
    numel = p.model_output.numel()
    timesteps = p.timesteps
    per_sample = max(numel // p.model_output.shape[0], 1) if timesteps.dim() == 1 else max(numel, 1)
    return (p.model_output.contiguous(), p.original_samples.contiguous(), p.noise.contiguous(), timesteps,
            p.alphas_cumprod.contiguous(), numel, per_sample, 1 if timesteps.dim() == 1 else 0,
            p.alphas_cumprod.shape[0])


def forward(problem):
    mo, x0, noise, timesteps, ac, numel, per_sample, t_stride, T = _common(problem)
    n_programs = triton.cdiv(numel, BLOCK)
    partials = torch.empty(max(n_programs, 1), dtype=torch.float32, device=mo.device)
    if n_programs:
        _loss_partials_kernel[(n_programs,)](mo, x0, noise, timesteps, ac, partials, numel, per_sample, t_stride, T,
                                             float(problem.snr_gamma), PRED=PREDICTION[problem.prediction_type],
                                             MIN_SNR=problem.min_snr, BLOCK=BLOCK, num_warps=NUM_WARPS)
    out = torch.empty((), dtype=torch.float32, device=mo.device)     # loss_dtype: float32 (no float64 here)
    _sum_partials_kernel[(1,)](partials, out, n_programs, 1.0 / numel if numel else float("nan"),
                               BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    return out


def backward(problem):
    mo, x0, noise, timesteps, ac, numel, per_sample, t_stride, T = _common(problem)
    d_mo = torch.empty(mo.shape, dtype=mo.dtype, device=mo.device)
    if numel:
        _loss_backward_kernel[(triton.cdiv(numel, BLOCK),)](
            problem.grad.to(torch.float32).contiguous(), mo, x0, noise, timesteps, ac, d_mo, numel, per_sample,
            t_stride, T, float(problem.snr_gamma), 2.0 / numel, PRED=PREDICTION[problem.prediction_type],
            MIN_SNR=problem.min_snr, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return d_mo


def aot_configs():
    """Every configuration the dispatcher can launch, for the ahead-of-time compile check."""
    for dtype in ("*fp16", "*bf16", "*fp32"):
        for t_type in ("*i32", "*i64"):
            for a_type in ("*fp32", "*fp64"):
                for pred in PREDICTION.values():
                    for min_snr in (False, True):
                        common = {"mo_ptr": dtype, "x0_ptr": dtype, "noise_ptr": dtype, "timesteps_ptr": t_type,
                                  "alphas_cumprod_ptr": a_type}
                        consts = dict(PRED=pred, MIN_SNR=min_snr, BLOCK=BLOCK)
                        yield _loss_partials_kernel, dict(common, partials_ptr="*fp32", numel="i64",
                                                          per_sample="i64", timestep_stride="i32", T="i32",
                                                          snr_gamma="fp32"), consts, NUM_WARPS, 1
                        # grad is the loss's gradient: float32 like the loss
                        yield _loss_backward_kernel, dict(grad_ptr="*fp32", **common, d_mo_ptr=dtype, numel="i64",
                                                          per_sample="i64", timestep_stride="i32", T="i32",
                                                          snr_gamma="fp32", scale="fp32"), consts, NUM_WARPS, 1
    yield _sum_partials_kernel, {"partials_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "scale": "fp32"}, \
        dict(BLOCK=REDUCE_BLOCK), NUM_WARPS, 1
