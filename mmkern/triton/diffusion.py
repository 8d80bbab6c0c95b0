"""Triton kernels of the noise-schedule ops: add_noise and get_velocity, one launch each.

Both are the same per-sample linear combination of two tensors, with coefficients gathered from
the schedule inside the kernel (no (B,) coefficient tensors are materialised):
    a = alphas_cumprod[timesteps[sample]]
    add_noise:    out = sqrt(a) * x + sqrt(1 - a) * noise
    get_velocity: out = sqrt(a) * noise - sqrt(1 - a) * x
Samples (B, ...) are viewed flat; element i belongs to sample i // per_sample. Memory traffic:
read x and noise, write out (3 * numel * itemsize bytes), plus the cached gathers.
Coefficient math in float32 whatever the samples' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkern.triton._common import dtype_reasons

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _noise_mix_kernel(x_ptr, noise_ptr, out_ptr, timesteps_ptr, alphas_cumprod_ptr, numel, per_sample,
                      timestep_stride, T, VELOCITY: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    sample = offsets // per_sample
    t = tl.load(timesteps_ptr + sample * timestep_stride, mask=in_bounds, other=0)
    t = tl.minimum(tl.maximum(t, 0), T - 1)      # GPU timesteps are not range-checked on the host (no sync)
    a = tl.load(alphas_cumprod_ptr + t, mask=in_bounds, other=1.0).to(tl.float32)
    sqrt_a = tl.sqrt(a)
    sqrt_one_minus_a = tl.sqrt(1.0 - a)
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if VELOCITY:
        out = sqrt_a * noise - sqrt_one_minus_a * x
    else:
        out = sqrt_a * x + sqrt_one_minus_a * noise
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


def noise_mix_reasons(problem) -> list[str]:
    """What the kernel does not take in a NoiseMixProblem (add_noise and get_velocity)."""
    return dtype_reasons(samples=problem.samples)


def _noise_mix(problem):
    x, noise, timesteps = problem.samples.contiguous(), problem.noise.contiguous(), problem.timesteps
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = x.numel()
    if numel == 0:
        return out
    per_sample = numel // x.shape[0] if timesteps.dim() == 1 else numel
    grid = (triton.cdiv(numel, BLOCK),)
    _noise_mix_kernel[grid](x, noise, out, timesteps, problem.alphas_cumprod.contiguous(), numel, per_sample,
                            1 if timesteps.dim() == 1 else 0, problem.alphas_cumprod.shape[0],
                            VELOCITY=problem.velocity, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def add_noise(problem):
    return _noise_mix(problem)


def get_velocity(problem):
    return _noise_mix(problem)


def aot_configs():
    """Every configuration the dispatcher can launch, for the ahead-of-time compile check."""
    for dtype in ("*fp16", "*bf16", "*fp32"):
        for t_type in ("*i32", "*i64"):
            for a_type in ("*fp32", "*fp64"):
                for velocity in (False, True):
                    signature = {"x_ptr": dtype, "noise_ptr": dtype, "out_ptr": dtype, "timesteps_ptr": t_type,
                                 "alphas_cumprod_ptr": a_type, "numel": "i64", "per_sample": "i64",
                                 "timestep_stride": "i32", "T": "i32"}
                    yield _noise_mix_kernel, signature, dict(VELOCITY=velocity, BLOCK=BLOCK), NUM_WARPS, 1
