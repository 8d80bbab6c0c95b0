"""Reference noise-schedule ops: the oracle for the diffusion kernels.

With a_t = alphas_cumprod[t] gathered per sample (timesteps (B,) broadcast over the trailing
dimensions of (B, ...) samples, or one 0-d timestep for all):
    add_noise:    x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise        (q-sample, DDPM eq. 4)
    get_velocity: v   = sqrt(a_t) * noise - sqrt(1 - a_t) * x_0        (v-prediction target)
Computed in float64 (unless precision.compute_in says otherwise); the result has the samples' dtype.
"""
from __future__ import annotations

import torch

from mmkern.reference.precision import compute_dtype, up


def schedule_coefficients(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, sample: torch.Tensor,
                          dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(a_t), sqrt(1 - a_t)) gathered at `timesteps`, shaped to broadcast against `sample`,
    in `dtype` (default: the reference compute dtype)."""
    a = alphas_cumprod.to(dtype or compute_dtype())[timesteps.long()]
    a = a.reshape(tuple(a.shape) + (1,) * (sample.dim() - a.dim()))
    return a.sqrt(), (1 - a).sqrt()


def add_noise(original_samples, noise, timesteps, alphas_cumprod):
    """Kernel of mmkern::add_noise."""
    sqrt_a, sqrt_one_minus_a = schedule_coefficients(timesteps, alphas_cumprod, original_samples)
    x_t = sqrt_a * up(original_samples) + sqrt_one_minus_a * up(noise)
    return x_t.to(original_samples.dtype).contiguous()


def get_velocity(sample, noise, timesteps, alphas_cumprod):
    """Kernel of mmkern::get_velocity."""
    sqrt_a, sqrt_one_minus_a = schedule_coefficients(timesteps, alphas_cumprod, sample)
    velocity = sqrt_a * up(noise) - sqrt_one_minus_a * up(sample)
    return velocity.to(sample.dtype).contiguous()
