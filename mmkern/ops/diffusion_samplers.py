"""Sampler steps as torch ops: mmkern::ddpm_step, ddim_step, euler_step, euler_scale_model_input.

Each step is one fused kernel: gather the schedule at each sample's timestep, predict x0 (and eps)
from the model output, clip or threshold x0, and write the next sample; both (prev_sample,
pred_original_sample) are returned, as diffusers' step does. Dynamic thresholding needs a per-sample
quantile of |x0| first, so with it on the Triton backend runs x0 pass + torch.quantile on the
device + the step kernel (see mmkern/triton/diffusion_samplers.py).

    model_output (B, ...) (DDPM with a learned variance: (B, 2C, ...)), sample (B, C, ...), one dtype
    timesteps, prev_timesteps: 0-d or (B,) integers; prev < 0 means past the end of the chain
    noise: None or like sample (the caller draws it, so that a torch.Generator drives sampling)
No op here reads tensor values on the host for GPU tensors (index checks run for CPU tensors only).

Each call builds one problem record (mmkern/ops/diffusion_samplers_problem.py: DDPMProblem, DDIMProblem,
EulerStepProblem, EulerScaleProblem, EulerAddNoiseProblem, with the checks and the dtype policy
`euler_x0_dtype`), validated once, and hands it to the dispatcher.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops.diffusion_samplers_problem import (  # noqa: F401  (re-exported: the op layer's names)
    EULER_PREDICTION_TYPES, VARIANCE_TYPES, DDIMProblem, DDPMProblem, EulerAddNoiseProblem, EulerScaleProblem,
    EulerStepProblem, build_ddim_step, build_ddpm_step, build_euler_add_noise, build_euler_scale_model_input,
    build_euler_step, check_clip_options, check_step_inputs, check_variance_type, euler_x0_dtype)


def _new_pair(sample, x0_dtype=None):
    return sample.new_empty(sample.shape), sample.new_empty(sample.shape, dtype=x0_dtype or sample.dtype)


# --------------------------------------------------------------------------- DDPM

@torch.library.custom_op("mmkern::ddpm_step", mutates_args=())
def ddpm_step(model_output: Tensor, sample: Tensor, timesteps: Tensor, prev_timesteps: Tensor,
              alphas_cumprod: Tensor, noise: Tensor | None, prediction_type: str, variance_type: str,
              clip_sample_range: float, dynamic_thresholding_ratio: float,
              sample_max_value: float) -> tuple[Tensor, Tensor]:
    return dispatch.call_memoized(
        "ddpm_step", build_ddpm_step, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise,
        prediction_type, variance_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)


@ddpm_step.register_fake
def _(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type, variance_type,
      clip_sample_range, dynamic_thresholding_ratio, sample_max_value):
    build_ddpm_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                    variance_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
                    check_values=False)
    return _new_pair(sample)


# --------------------------------------------------------------------------- DDIM

@torch.library.custom_op("mmkern::ddim_step", mutates_args=())
def ddim_step(model_output: Tensor, sample: Tensor, timesteps: Tensor, prev_timesteps: Tensor,
              alphas_cumprod: Tensor, final_alpha_cumprod: float, eta: float, noise: Tensor | None,
              prediction_type: str, clip_sample_range: float, dynamic_thresholding_ratio: float,
              sample_max_value: float, use_clipped_model_output: bool) -> tuple[Tensor, Tensor]:
    return dispatch.call_memoized(
        "ddim_step", build_ddim_step, model_output, sample, timesteps, prev_timesteps, alphas_cumprod,
        final_alpha_cumprod, eta, noise, prediction_type, clip_sample_range, dynamic_thresholding_ratio,
        sample_max_value, use_clipped_model_output)


@ddim_step.register_fake
def _(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, eta, noise,
      prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value, use_clipped_model_output):
    build_ddim_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, eta, noise,
                    prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
                    use_clipped_model_output, check_values=False)
    return _new_pair(sample)


# --------------------------------------------------------------------------- Euler

@torch.library.custom_op("mmkern::euler_step", mutates_args=())
def euler_step(model_output: Tensor, sample: Tensor, step_index: Tensor, sigmas: Tensor, noise: Tensor | None,
               prediction_type: str, gamma: float, s_tmin: float, s_tmax: float,
               s_noise: float) -> tuple[Tensor, Tensor]:
    return dispatch.call_memoized("euler_step", build_euler_step, model_output, sample, step_index, sigmas, noise,
                                  prediction_type, gamma, s_tmin, s_tmax, s_noise)


@euler_step.register_fake
def _(model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_tmin, s_tmax, s_noise):
    p = build_euler_step(model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_tmin, s_tmax,
                         s_noise, check_values=False)
    return _new_pair(model_output, p.x0_dtype)


@torch.library.custom_op("mmkern::euler_scale_model_input", mutates_args=())
def euler_scale_model_input(sample: Tensor, step_index: Tensor, sigmas: Tensor) -> Tensor:
    return dispatch.call_memoized("euler_scale_model_input", build_euler_scale_model_input, sample, step_index,
                                  sigmas)


@euler_scale_model_input.register_fake
def _(sample, step_index, sigmas):
    build_euler_scale_model_input(sample, step_index, sigmas, check_values=False)
    return sample.new_empty(sample.shape)


@torch.library.custom_op("mmkern::euler_add_noise", mutates_args=())
def euler_add_noise(original_samples: Tensor, noise: Tensor, step_index: Tensor, sigmas: Tensor) -> Tensor:
    """x + sigmas[i] * noise per sample: EulerDiscreteScheduler.add_noise."""
    return dispatch.call_memoized("euler_add_noise", build_euler_add_noise, original_samples, noise, step_index,
                                  sigmas)


@euler_add_noise.register_fake
def _(original_samples, noise, step_index, sigmas):
    build_euler_add_noise(original_samples, noise, step_index, sigmas, check_values=False)
    return original_samples.new_empty(original_samples.shape)


for _op, _build in (("ddpm_step", build_ddpm_step), ("ddim_step", build_ddim_step), ("euler_step", build_euler_step),
                    ("euler_scale_model_input", build_euler_scale_model_input),
                    ("euler_add_noise", build_euler_add_noise)):
    dispatch.define_problem(_op, _build)


def _euler_add_noise_setup(ctx, inputs, output):
    _, _, step_index, sigmas = inputs
    ctx.save_for_backward(step_index, sigmas)


def _euler_add_noise_backward(ctx, grad):
    step_index, sigmas = ctx.saved_tensors
    sigma = sigmas.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)[step_index.long()]
    sigma = sigma.reshape(tuple(sigma.shape) + (1,) * (grad.dim() - sigma.dim()))
    return grad.clone(), (grad * sigma).to(grad.dtype), None, None


torch.library.register_autograd("mmkern::euler_add_noise", _euler_add_noise_backward,
                                setup_context=_euler_add_noise_setup)
