"""Sampler steps, fused and per-sample: DDPM, DDIM and Euler discrete (diffusers' step math).

Each returns (prev_sample, pred_original_sample), like diffusers' `step(..., return_dict=False)`,
and unlike diffusers takes per-sample timesteps: `timesteps` (or `step_index` for Euler) may be an
int, a 0-d or a (B,) integer tensor. The caller draws the noise (so its generator decides it) and
passes it; nothing here reads a GPU tensor on the host.

Precision: coefficients are computed in float32 from the (float64 or float32) table whatever the
sample dtype. diffusers computes them with the table in float32 too for float32 samples, so the
two agree to float32 rounding; for half-precision samples the results are closer to the float64
reference than eager half-precision math (diffusers' add_noise casts a_t to the sample's dtype
before the square root, which rounds a_t to 1 near t = 0 in float16/bfloat16).
"""
from __future__ import annotations

import math

import torch

from mmkern.ops import diffusion_samplers as ops
from mmkern.ops import _eager as eager
from mmkern.ops._checks import last_dim_contiguous


def _index(fn, name, value, like):
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.tensor(value, dtype=torch.int64, device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be an int or an integer tensor, got {type(value).__name__}")
    return value


def _clip_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value):
    return (float(clip_sample_range) if clip_sample else 0.0,
            float(dynamic_thresholding_ratio) if thresholding else 0.0, float(sample_max_value))


def ddpm_step(model_output, timesteps, sample, alphas_cumprod, *, prev_timesteps=None, noise=None,
              prediction_type="epsilon", variance_type="fixed_small", clip_sample=False, clip_sample_range=1.0,
              thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """One DDPM ancestral step (Ho et al. 2020, eq. 6-7): the posterior mean plus std * noise where t > 0.

    prev_timesteps: the next (smaller) timestep of the chain, default t - 1; < 0 means the end (a_prev = 1).
    variance_type learned / learned_range: model_output is (B, 2C, ...), its second half the variance.
    noise: None for the mean only. "fixed_large_log" is GLIDE's log variance, exp(0.5 log beta_t)
    (diffusers takes its square root and gives NaN)."""
    fn = "mmkern.diffusion.ddpm_step"
    timesteps = _index(fn, "timesteps", timesteps, sample)
    prev_timesteps = timesteps - 1 if prev_timesteps is None else _index(fn, "prev_timesteps", prev_timesteps,
                                                                          sample)
    return eager.call(ops.ddpm_step, last_dim_contiguous(model_output), last_dim_contiguous(sample), timesteps,
                      prev_timesteps, alphas_cumprod, last_dim_contiguous(noise), prediction_type, variance_type,
                      *_clip_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                  sample_max_value))


def ddim_step(model_output, timesteps, sample, alphas_cumprod, prev_timesteps, *, final_alpha_cumprod=1.0, eta=0.0,
              noise=None, prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0, thresholding=False,
              dynamic_thresholding_ratio=0.995, sample_max_value=1.0, use_clipped_model_output=False):
    """One DDIM step (Song et al. 2021, eq. 12) from timesteps to prev_timesteps (< 0: a_prev =
    final_alpha_cumprod). With eta > 0, noise (like sample) is scaled by eta * sigma_t and added."""
    fn = "mmkern.diffusion.ddim_step"
    if eta > 0 and noise is None:
        raise ValueError(f"{fn}: eta = {eta} > 0 needs noise (a tensor like sample)")
    return eager.call(ops.ddim_step, last_dim_contiguous(model_output), last_dim_contiguous(sample),
                      _index(fn, "timesteps", timesteps, sample), _index(fn, "prev_timesteps", prev_timesteps,
                                                                         sample),
                      alphas_cumprod, float(final_alpha_cumprod), float(eta), last_dim_contiguous(noise),
                      prediction_type,
                      *_clip_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                  sample_max_value), bool(use_clipped_model_output))


def churn_gamma(s_churn: float, sigmas_len: int) -> float:
    """Karras' gamma = min(s_churn / (N - 1), sqrt(2) - 1) (N = len(sigmas), as diffusers)."""
    if not isinstance(s_churn, (int, float)) or isinstance(s_churn, bool):
        raise TypeError(f"mmkern.diffusion.euler_step: s_churn must be a float, got {type(s_churn).__name__}")
    if s_churn <= 0 or sigmas_len < 2:   # fewer than 2 sigmas: the op refuses the table with its own message
        return 0.0
    return min(s_churn / (sigmas_len - 1), 2 ** 0.5 - 1)


def euler_step(model_output, step_index, sample, sigmas, *, noise=None, prediction_type="epsilon", s_churn=0.0,
               s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """One Euler step from sigmas[i] to sigmas[i + 1] (Karras et al. 2022, algorithm 2, with churn).

    sigmas: the sampling schedule (N + 1,) (diffusers' scheduler.sigmas, ending in 0); step_index i:
    int, 0-d or (B,). noise is needed whenever s_churn > 0: churn applies where s_tmin <= sigma <= s_tmax,
    which depends on the step index's values (reading them would stall a GPU), so pass s_churn=0 for a
    step known to be outside [s_tmin, s_tmax] (the EulerDiscreteScheduler drop-in does).
    prev_sample has model_output's dtype, pred_original_sample at least float32 (as diffusers)."""
    fn = "mmkern.diffusion.euler_step"
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"{fn}: sigmas must be a torch.Tensor, got {type(sigmas).__name__}")
    gamma = churn_gamma(s_churn, sigmas.shape[0])
    if gamma > 0 and noise is None:
        raise ValueError(f"{fn}: s_churn = {s_churn} > 0 needs noise (a tensor like sample): churn adds "
                         f"s_noise * noise * sigma * sqrt(gamma (2 + gamma)); pass s_churn=0 to step without churn")
    return eager.call(ops.euler_step, last_dim_contiguous(model_output), last_dim_contiguous(sample),
                      _index(fn, "step_index", step_index, sample), sigmas, last_dim_contiguous(noise),
                      prediction_type, gamma, float(s_tmin), float(s_tmax),
                      float(s_noise))


def euler_scale_model_input(sample, step_index, sigmas):
    """sample / sqrt(sigmas[i]^2 + 1): the Euler sampler's model input (per sample)."""
    fn = "mmkern.diffusion.euler_scale_model_input"
    return eager.call(ops.euler_scale_model_input, last_dim_contiguous(sample),
                      _index(fn, "step_index", step_index, sample), sigmas)


def euler_add_noise(original_samples, noise, step_index, sigmas):
    """x + sigmas[i] * noise (per sample): the Euler scheduler's noising in sigma space."""
    fn = "mmkern.diffusion.euler_add_noise"
    return eager.call(ops.euler_add_noise, last_dim_contiguous(original_samples), last_dim_contiguous(noise),
                      _index(fn, "step_index", step_index, original_samples), sigmas)
