"""Reference noise-schedule ops: the oracle for the diffusion kernels.

With a_t = alphas_cumprod[t] gathered per sample (timesteps (B,) broadcast over the trailing
dimensions of (B, ...) samples, or one 0-d timestep for all):
    add_noise:    x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise        (q-sample, DDPM eq. 4)
    get_velocity: v   = sqrt(a_t) * noise - sqrt(1 - a_t) * x_0        (v-prediction target)
Computed in float64 (unless precision.compute_in says otherwise); the result has the samples' dtype.
Each kernel takes the op's problem record (mmkern/ops/diffusion.py: NoiseMixProblem) and reads only its
schema arguments.
"""
from __future__ import annotations

import torch

from mmkern.reference.precision import compute_dtype, up


def _coefficients(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, sample: torch.Tensor):
    """(sqrt(a_t), sqrt(1 - a_t)) in the compute dtype, gathered at `timesteps`, shaped to broadcast against
    `sample`."""
    a = alphas_cumprod.to(compute_dtype())[timesteps.long()]
    a = a.reshape(tuple(a.shape) + (1,) * (sample.dim() - a.dim()))
    return a.sqrt(), (1 - a).sqrt()


def add_noise(problem):
    """Kernel of mmkern::add_noise."""
    x0, noise = problem.samples, problem.noise
    sqrt_a, sqrt_one_minus_a = _coefficients(problem.timesteps, problem.alphas_cumprod, x0)
    x_t = sqrt_a * up(x0) + sqrt_one_minus_a * up(noise)
    return x_t.to(x0.dtype).contiguous()


def get_velocity(problem):
    """Kernel of mmkern::get_velocity."""
    sample, noise = problem.samples, problem.noise
    sqrt_a, sqrt_one_minus_a = _coefficients(problem.timesteps, problem.alphas_cumprod, sample)
    velocity = sqrt_a * up(noise) - sqrt_one_minus_a * up(sample)
    return velocity.to(sample.dtype).contiguous()
