"""Diffusion noise-schedule ops (diffusers' scheduler math, fused and per-sample).

    x_t = add_noise(x_0, noise, t, alphas_cumprod)         sqrt(a_t) x_0 + sqrt(1 - a_t) noise
    v   = get_velocity(x_0, noise, t, alphas_cumprod)      sqrt(a_t) noise - sqrt(1 - a_t) x_0
    training_target(x_0, noise, t, alphas_cumprod, prediction_type)   what the model should predict
    diffusion_loss(model_output, x_0, noise, t, alphas_cumprod, prediction_type, snr_gamma)   fused loss
    ddpm_step / ddim_step / euler_step, euler_scale_model_input          fused sampler steps (sampling.py)
    NoiseSchedule, make_betas, ...                                      float64 tables (schedules.py)
    DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler                 diffusers drop-ins (schedulers.py)
`timesteps` is an int, a 0-d integer tensor, or (batch,) integers (one per sample); samples have
any trailing shape (batch, ...). Same arguments and results as diffusers' DDPMScheduler methods.
"""
from __future__ import annotations

import torch

from mmkern.ops import diffusion as ops
from mmkern.ops import _eager as eager
from mmkern.ops._checks import last_dim_contiguous
from mmkern.diffusion.schedules import (BETA_SCHEDULES, NoiseSchedule, alphas_cumprod_from_betas,  # noqa: F401
                                        make_betas, rescale_zero_terminal_snr, sigmas_from_alphas_cumprod,
                                        snr_from_alphas_cumprod)
from mmkern.diffusion.loss import diffusion_loss  # noqa: F401,E402
from mmkern.diffusion.sampling import (ddim_step, ddpm_step, euler_add_noise,  # noqa: F401,E402
                                       euler_scale_model_input, euler_step)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _timesteps(fn: str, timesteps, like: torch.Tensor) -> torch.Tensor:
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        return torch.tensor(timesteps, dtype=torch.int64, device=like.device)
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"{fn}: timesteps must be an int or an integer tensor, got {type(timesteps).__name__}")
    return timesteps


def _prepare(fn, samples_name, samples, noise, timesteps):
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{fn}: {samples_name} must be a torch.Tensor, got {type(samples).__name__}")
    return last_dim_contiguous(samples), last_dim_contiguous(noise), _timesteps(fn, timesteps, samples)


def add_noise(original_samples, noise, timesteps, alphas_cumprod):
    """Forward-diffuse clean samples to timestep t: sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise."""
    x0, noise, timesteps = _prepare("mmkern.diffusion.add_noise", "original_samples", original_samples, noise,
                                    timesteps)
    return eager.call(ops.add_noise, x0, noise, timesteps, alphas_cumprod)


def get_velocity(sample, noise, timesteps, alphas_cumprod):
    """The v-prediction target: sqrt(a_t) * noise - sqrt(1 - a_t) * sample."""
    x0, noise, timesteps = _prepare("mmkern.diffusion.get_velocity", "sample", sample, noise, timesteps)
    return eager.call(ops.get_velocity, x0, noise, timesteps, alphas_cumprod)


def training_target(original_samples, noise, timesteps, alphas_cumprod, prediction_type="epsilon"):
    """What a denoiser trained with `prediction_type` should output at timestep t:
    the noise (epsilon), the velocity (v_prediction) or the clean sample (sample)."""
    fn = "mmkern.diffusion.training_target"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{fn}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
    if prediction_type == "v_prediction":
        return get_velocity(original_samples, noise, timesteps, alphas_cumprod)
    # epsilon / sample: validate like the fused ops, then the target is one of the inputs as it is
    x0, noise, timesteps = _prepare(fn, "original_samples", original_samples, noise, timesteps)
    ops.check_schedule_inputs(fn, "original_samples", x0, noise, timesteps, alphas_cumprod)
    ops.check_timestep_values(fn, timesteps, alphas_cumprod)   # as add_noise: CPU tensors only (no GPU sync)
    return noise if prediction_type == "epsilon" else x0


_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")


def __getattr__(name):
    """The diffusers drop-in schedulers, imported on first use: diffusers is optional."""
    if name in _SCHEDULERS:
        try:
            from mmkern.diffusion import schedulers
        except ImportError as exc:
            raise ImportError(f"mmkern.diffusion.{name} subclasses diffusers' scheduler: pip install diffusers "
                              f"(or mmkern[models]); {exc}") from exc
        return getattr(schedulers, name)
    raise AttributeError(f"module 'mmkern.diffusion' has no attribute {name!r}")
