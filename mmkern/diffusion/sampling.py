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

from mmkern.diffusion._args import index_tensor as _index
from mmkern.ops import diffusion_samplers as ops
from mmkern.ops import _eager as eager
from mmkern.ops._checks import last_dim_contiguous


def _clip_args(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value):
    return (float(clip_sample_range) if clip_sample else 0.0,
            float(dynamic_thresholding_ratio) if thresholding else 0.0, float(sample_max_value))


def ddpm_step(model_output, timesteps, sample, alphas_cumprod, *, prev_timesteps=None, noise=None,
              prediction_type="epsilon", variance_type="fixed_small", clip_sample=False, clip_sample_range=1.0,
              thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """One DDPM ancestral step (Ho et al. 2020, eq. 6-7): the posterior mean plus std * noise where t > 0, in one
    fused kernel (diffusers' DDPMScheduler.step, per sample).

    Arguments:
        model_output: (batch, C, ...) like sample, or (batch, 2C, ...) with variance_type "learned" or
            "learned_range" (the prediction, then the variance); sample's dtype, on its device.
        timesteps: an int, or an int32/int64 tensor on sample's device, 0-d (one timestep for all) or (batch,);
            values in [0, T - 1] (checked for CPU tensors only: no GPU sync).
        sample: (batch, ...), float16, bfloat16, float32 or float64. The current x_t.
        alphas_cumprod: (T,) float32 or float64, on sample's device.
        prev_timesteps: like timesteps (an int, or a tensor of timesteps' shape): the next (smaller) timestep of
            the chain, default timesteps - 1; values <= T - 1, < 0 meaning the end (a_prev = 1).
        noise: None (the mean only), or the shape and dtype of sample: added as std_t * noise where t > 0.
            The caller draws it, so its generator decides the chain.
        prediction_type: "epsilon", "v_prediction" or "sample": what model_output predicts.
        variance_type: "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned" or
            "learned_range", diffusers' meanings; "fixed_large_log" is GLIDE's log variance,
            exp(0.5 log beta_t) (diffusers takes its square root and gives NaN).
        clip_sample: clamp the predicted x_0 to [-clip_sample_range, clip_sample_range] (bool).
        clip_sample_range: a float >= 0.
        thresholding: Imagen's dynamic thresholding of x_0 instead (bool; it takes precedence over
            clip_sample): s = clamp(quantile(|x_0|, dynamic_thresholding_ratio) per sample, 1, sample_max_value),
            x_0 -> clamp(x_0, -s, s) / s.
        dynamic_thresholding_ratio: a float in [0, 1].
        sample_max_value: a float >= 1.
    Return:
        (prev_sample, pred_original_sample): x_{t-1} and the predicted x_0, each the shape and dtype of sample
        (new tensors).
    """
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
    """One DDIM step (Song et al. 2021, eq. 12) from timesteps to prev_timesteps, in one fused kernel
    (diffusers' DDIMScheduler.step, per sample).

    Arguments:
        model_output: the shape and dtype of sample, on its device.
        timesteps: an int, or an int32/int64 tensor on sample's device, 0-d or (batch,); values in [0, T - 1].
        sample: (batch, ...), float16, bfloat16, float32 or float64. The current x_t.
        alphas_cumprod: (T,) float32 or float64, on sample's device.
        prev_timesteps: like timesteps (an int, or a tensor of timesteps' shape): the timestep to step to;
            values <= T - 1, < 0 meaning past the end (a_prev = final_alpha_cumprod).
        final_alpha_cumprod: a float in [0, 1]: a_prev past the end (diffusers' set_alpha_to_one: 1.0, else
            alphas_cumprod[0]).
        eta: a float >= 0: the stochasticity (0: deterministic DDIM; 1: DDPM-like), sigma_t scaled by eta.
        noise: None, or the shape and dtype of sample; needed when eta > 0 (scaled by eta * sigma_t and added).
        prediction_type: "epsilon", "v_prediction" or "sample".
        clip_sample: clamp the predicted x_0 to [-clip_sample_range, clip_sample_range] (bool).
        clip_sample_range: a float >= 0.
        thresholding: Imagen's dynamic thresholding of x_0 instead (bool; it takes precedence over
            clip_sample): s = clamp(quantile(|x_0|, dynamic_thresholding_ratio) per sample, 1, sample_max_value),
            x_0 -> clamp(x_0, -s, s) / s.
        dynamic_thresholding_ratio: a float in [0, 1].
        sample_max_value: a float >= 1.
        use_clipped_model_output: re-derive the noise from the clipped x_0 (diffusers' meaning) (bool).
    Return:
        (prev_sample, pred_original_sample): each the shape and dtype of sample (new tensors).
    """
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
    """Karras' churn gamma = min(s_churn / (N - 1), sqrt(2) - 1), N = len(sigmas), as diffusers' Euler step.

    Arguments:
        s_churn: a float (<= 0: no churn). A bool or another type: TypeError.
        sigmas_len: N, the length of the sampling schedule's sigmas (int).
    Return:
        gamma: a Python float >= 0 (0.0 when s_churn <= 0 or N < 2).
    """
    if not isinstance(s_churn, (int, float)) or isinstance(s_churn, bool):
        raise TypeError(f"mmkern.diffusion.euler_step: s_churn must be a float, got {type(s_churn).__name__}")
    if s_churn <= 0 or sigmas_len < 2:   # fewer than 2 sigmas: the op refuses the table with its own message
        return 0.0
    return min(s_churn / (sigmas_len - 1), 2 ** 0.5 - 1)


def euler_step(model_output, step_index, sample, sigmas, *, noise=None, prediction_type="epsilon", s_churn=0.0,
               s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """One Euler step from sigmas[i] to sigmas[i + 1] (Karras et al. 2022, algorithm 2, with churn), in one fused
    kernel (diffusers' EulerDiscreteScheduler.step, per sample).

    Arguments:
        model_output: the shape and dtype of sample, on its device.
        step_index: i, an int or an int32/int64 tensor on sample's device, 0-d or (batch,); values in
            [0, len(sigmas) - 2] (sigmas[i + 1] is read; checked for CPU tensors only).
        sample: (batch, ...), float16, bfloat16, float32 or float64. The current x (in sigma space).
        sigmas: (N + 1,) float32 or float64, on sample's device, at least 2 values: the sampling schedule,
            decreasing and ending in 0 (diffusers' scheduler.sigmas).
        noise: None, or the shape and dtype of sample; needed whenever s_churn > 0. Churn applies where
            s_tmin <= sigma_i <= s_tmax, which depends on the step index's values (reading them would stall a
            GPU), so pass s_churn=0 for a step known to be outside [s_tmin, s_tmax] (the EulerDiscreteScheduler
            drop-in does).
        prediction_type: "epsilon", "v_prediction", "sample" or "original_sample" (diffusers' Euler names).
        s_churn: a float >= 0: the churn amount (gamma from churn_gamma(s_churn, len(sigmas))).
        s_tmin, s_tmax: floats: the sigma range in which churn applies.
        s_noise: a float >= 0: the scale of the churn noise.
    Return:
        (prev_sample, pred_original_sample): prev_sample the shape and dtype of model_output,
        pred_original_sample the shape of sample in at least float32 (promote(dtype, float32), as diffusers).
    """
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
    """The Euler sampler's model input, sample / sqrt(sigmas[i]^2 + 1) per sample (EulerDiscreteScheduler's
    scale_model_input).

    Arguments:
        sample: (batch, ...), float16, bfloat16, float32 or float64.
        step_index: i, an int or an int32/int64 tensor on sample's device, 0-d or (batch,); values in
            [0, len(sigmas) - 1].
        sigmas: (N,) float32 or float64, on sample's device: the sampling schedule.
    Return:
        scaled: the shape and dtype of sample (a new tensor).
    """
    fn = "mmkern.diffusion.euler_scale_model_input"
    return eager.call(ops.euler_scale_model_input, last_dim_contiguous(sample),
                      _index(fn, "step_index", step_index, sample), sigmas)


def euler_add_noise(original_samples, noise, step_index, sigmas):
    """The Euler scheduler's noising in sigma space, x + sigmas[i] * noise per sample (EulerDiscreteScheduler's
    add_noise), one fused kernel.

    Arguments:
        original_samples: (batch, ...), float16, bfloat16, float32 or float64. The clean samples.
        noise: the shape and dtype of original_samples, on its device.
        step_index: i, an int or an int32/int64 tensor on the samples' device, 0-d or (batch,); values in
            [0, len(sigmas) - 1].
        sigmas: (N,) float32 or float64, on the samples' device: the sampling schedule.
    Return:
        noisy: the shape and dtype of original_samples. Differentiable in original_samples and noise.
    """
    fn = "mmkern.diffusion.euler_add_noise"
    return eager.call(ops.euler_add_noise, last_dim_contiguous(original_samples), last_dim_contiguous(noise),
                      _index(fn, "step_index", step_index, original_samples), sigmas)
