"""Diffusion noise-schedule ops (diffusers' scheduler math, fused and per-sample).

    x_t = add_noise(x_0, noise, t, alphas_cumprod)         sqrt(a_t) x_0 + sqrt(1 - a_t) noise    (noising.py)
    v   = get_velocity(x_0, noise, t, alphas_cumprod)      sqrt(a_t) noise - sqrt(1 - a_t) x_0    (noising.py)
    training_target(x_0, noise, t, alphas_cumprod, prediction_type)   what the model should predict (noising.py)
    diffusion_loss(model_output, x_0, noise, t, alphas_cumprod, prediction_type, snr_gamma)   fused loss (loss.py)
    ddpm_step / ddim_step / euler_step, euler_scale_model_input, euler_add_noise   sampler steps (sampling.py)
    NoiseSchedule, make_betas, ...                                      float64 tables (schedules.py)
    DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler                 diffusers drop-ins (schedulers.py)
`timesteps` is an int, a 0-d integer tensor, or (batch,) integers (one per sample); samples have
any trailing shape (batch, ...). Same arguments and results as diffusers' DDPMScheduler methods.

This file only re-exports: each function lives in the module named above, and none of them imports
from here (the schedulers are imported on first use, below: diffusers is optional).
"""
from __future__ import annotations

from mmkern.diffusion.schedules import (BETA_SCHEDULES, NoiseSchedule, alphas_cumprod_from_betas,  # noqa: F401
                                        make_betas, rescale_zero_terminal_snr, sigmas_from_alphas_cumprod,
                                        snr_from_alphas_cumprod)
from mmkern.diffusion.noising import PREDICTION_TYPES, add_noise, get_velocity, training_target  # noqa: F401
from mmkern.diffusion.loss import diffusion_loss  # noqa: F401
from mmkern.diffusion.sampling import (ddim_step, ddpm_step, euler_add_noise,  # noqa: F401
                                       euler_scale_model_input, euler_step)

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
