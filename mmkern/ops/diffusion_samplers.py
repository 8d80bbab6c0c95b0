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
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from mmkern.ops.diffusion import INT_DTYPES, check_index_tensor, check_index_values
from mmkern.ops.diffusion_loss import check_prediction_type
from mmkern.reference.diffusion_samplers import VARIANCE_TYPES, euler_x0_dtype

EULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")


def _check_float(fn: str, name: str, value, low: float, high: float = math.inf, *, low_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{fn}: {name} must be a float in {bracket}{low}, {high}], got {value!r}")


def check_step_inputs(fn, model_output, sample, indices: dict, table_name, table, noise, *, learned_split=False):
    check_tensor(fn, "sample", sample, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "model_output", model_output, dtypes=FLOAT_DTYPES)
    if sample.dim() < 1:
        raise ValueError(f"{fn}: sample must have a batch dimension, got shape {tuple(sample.shape)}")
    expected = [tuple(sample.shape)]
    if learned_split and sample.dim() > 1:
        expected.append((sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]))
    if tuple(model_output.shape) not in expected or model_output.dtype != sample.dtype:
        want = " or ".join(str(s) for s in expected)
        raise ValueError(f"{fn}: model_output must have shape {want} and the dtype of sample ({sample.dtype}); got "
                         f"{tuple(model_output.shape)}, {model_output.dtype}")
    if noise is not None:
        check_tensor(fn, "noise", noise, dtypes=FLOAT_DTYPES)
        if noise.shape != sample.shape or noise.dtype != sample.dtype:
            raise ValueError(f"{fn}: noise must have the shape and dtype of sample ({tuple(sample.shape)}, "
                             f"{sample.dtype}); got {tuple(noise.shape)}, {noise.dtype}")
    for name, t in indices.items():
        check_index_tensor(fn, name, t)
        check_tensor(fn, name, t, dtypes=INT_DTYPES, ndim=(0, 1))
        if t.dim() == 1 and t.shape[0] != sample.shape[0]:
            raise ValueError(f"{fn}: {name} must be 0-d or (batch,) with batch = sample.shape[0] = "
                             f"{sample.shape[0]}; got {tuple(t.shape)}")
    first, *rest = indices.items()
    for name, t in rest:
        if t.shape != first[1].shape:
            raise ValueError(f"{fn}: {name} must have the shape of {first[0]} {tuple(first[1].shape)}; "
                             f"got {tuple(t.shape)}")
    check_tensor(fn, table_name, table, dtypes=(torch.float32, torch.float64), ndim=1)
    if table.shape[0] < 1:
        raise ValueError(f"{fn}: {table_name} must not be empty")
    check_same_device(fn, model_output=model_output, sample=sample, noise=noise, **indices, **{table_name: table})


def check_clip_options(fn, clip_sample_range, dynamic_thresholding_ratio, sample_max_value):
    _check_float(fn, "clip_sample_range", clip_sample_range, 0.0)
    _check_float(fn, "dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0.0, 1.0)
    _check_float(fn, "sample_max_value", sample_max_value, 1.0)


def check_variance_type(fn, variance_type, model_output=None, sample=None):
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"{fn}: variance_type must be one of {', '.join(VARIANCE_TYPES)}; got {variance_type!r}")
    if model_output is None:
        return
    learned = variance_type in ("learned", "learned_range")
    # learned: (B, 2C, ...), the prediction then the variance; else exactly sample's shape. Compared as shapes,
    # not as "differs from sample", so C = 0 ((B, 0) is both) is accepted for a learned variance.
    want = (sample.shape[0], 2 * sample.shape[1], *sample.shape[2:]) if learned and sample.dim() > 1 else sample.shape
    if tuple(model_output.shape) != tuple(want):
        raise ValueError(f"{fn}: variance_type {variance_type!r} needs model_output of shape "
                         f"{'(B, 2C, ...): the prediction, then the variance' if learned else '(B, C, ...) = sample'}; "
                         f"got model_output {tuple(model_output.shape)} for sample {tuple(sample.shape)}")


def _check_alpha_step(fn, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                      clip_sample_range, dynamic_thresholding_ratio, sample_max_value, learned_split=False):
    check_step_inputs(fn, model_output, sample, dict(timesteps=timesteps, prev_timesteps=prev_timesteps),
                      "alphas_cumprod", alphas_cumprod, noise, learned_split=learned_split)
    check_prediction_type(fn, prediction_type)
    check_clip_options(fn, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)


def _check_alpha_values(fn, timesteps, prev_timesteps, alphas_cumprod):
    T = alphas_cumprod.shape[0]
    check_index_values(fn, "timesteps", timesteps, 0, T - 1, f"len(alphas_cumprod) = {T}")
    check_index_values(fn, "prev_timesteps", prev_timesteps, None, T - 1, f"len(alphas_cumprod) = {T}; < 0 = end")


def _new_pair(sample, x0_dtype=None):
    return sample.new_empty(sample.shape), sample.new_empty(sample.shape, dtype=x0_dtype or sample.dtype)


# --------------------------------------------------------------------------- DDPM

@torch.library.custom_op("mmkern::ddpm_step", mutates_args=())
def ddpm_step(model_output: Tensor, sample: Tensor, timesteps: Tensor, prev_timesteps: Tensor,
              alphas_cumprod: Tensor, noise: Tensor | None, prediction_type: str, variance_type: str,
              clip_sample_range: float, dynamic_thresholding_ratio: float,
              sample_max_value: float) -> tuple[Tensor, Tensor]:
    fn = "mmkern::ddpm_step"
    _check_alpha_step(fn, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                      clip_sample_range, dynamic_thresholding_ratio, sample_max_value, learned_split=True)
    check_variance_type(fn, variance_type, model_output, sample)
    _check_alpha_values(fn, timesteps, prev_timesteps, alphas_cumprod)
    return dispatch.call("ddpm_step", sample.device, model_output=model_output, sample=sample, timesteps=timesteps,
                         prev_timesteps=prev_timesteps, alphas_cumprod=alphas_cumprod, noise=noise,
                         prediction_type=prediction_type, variance_type=variance_type,
                         clip_sample_range=clip_sample_range, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                         sample_max_value=sample_max_value)


@ddpm_step.register_fake
def _(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type, variance_type,
      clip_sample_range, dynamic_thresholding_ratio, sample_max_value):
    fn = "mmkern::ddpm_step"
    _check_alpha_step(fn, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                      clip_sample_range, dynamic_thresholding_ratio, sample_max_value, learned_split=True)
    check_variance_type(fn, variance_type, model_output, sample)
    return _new_pair(sample)


# --------------------------------------------------------------------------- DDIM

@torch.library.custom_op("mmkern::ddim_step", mutates_args=())
def ddim_step(model_output: Tensor, sample: Tensor, timesteps: Tensor, prev_timesteps: Tensor,
              alphas_cumprod: Tensor, final_alpha_cumprod: float, eta: float, noise: Tensor | None,
              prediction_type: str, clip_sample_range: float, dynamic_thresholding_ratio: float,
              sample_max_value: float, use_clipped_model_output: bool) -> tuple[Tensor, Tensor]:
    fn = "mmkern::ddim_step"
    _check_alpha_step(fn, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                      clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    _check_float(fn, "eta", eta, 0.0)
    _check_float(fn, "final_alpha_cumprod", final_alpha_cumprod, 0.0, 1.0)
    _check_alpha_values(fn, timesteps, prev_timesteps, alphas_cumprod)
    return dispatch.call("ddim_step", sample.device, model_output=model_output, sample=sample, timesteps=timesteps,
                         prev_timesteps=prev_timesteps, alphas_cumprod=alphas_cumprod,
                         final_alpha_cumprod=final_alpha_cumprod, eta=eta, noise=noise,
                         prediction_type=prediction_type, clip_sample_range=clip_sample_range,
                         dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                         use_clipped_model_output=use_clipped_model_output)


@ddim_step.register_fake
def _(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, eta, noise,
      prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value, use_clipped_model_output):
    _check_alpha_step("mmkern::ddim_step", model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise,
                      prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    return _new_pair(sample)


# --------------------------------------------------------------------------- Euler

def _check_euler(fn, model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_noise):
    check_step_inputs(fn, model_output, sample, dict(step_index=step_index), "sigmas", sigmas, noise)
    check_prediction_type(fn, prediction_type, EULER_PREDICTION_TYPES)
    _check_float(fn, "gamma", gamma, 0.0)
    _check_float(fn, "s_noise", s_noise, 0.0)
    if sigmas.shape[0] < 2:
        raise ValueError(f"{fn}: sigmas must hold at least 2 values (sigma, sigma_next), got {tuple(sigmas.shape)}")


@torch.library.custom_op("mmkern::euler_step", mutates_args=())
def euler_step(model_output: Tensor, sample: Tensor, step_index: Tensor, sigmas: Tensor, noise: Tensor | None,
               prediction_type: str, gamma: float, s_tmin: float, s_tmax: float,
               s_noise: float) -> tuple[Tensor, Tensor]:
    fn = "mmkern::euler_step"
    _check_euler(fn, model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_noise)
    N = sigmas.shape[0]
    check_index_values(fn, "step_index", step_index, 0, N - 2, f"len(sigmas) = {N}: sigmas[i + 1] is read")
    return dispatch.call("euler_step", sample.device, model_output=model_output, sample=sample,
                         step_index=step_index, sigmas=sigmas, noise=noise, prediction_type=prediction_type,
                         gamma=gamma, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


@euler_step.register_fake
def _(model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_tmin, s_tmax, s_noise):
    _check_euler("mmkern::euler_step", model_output, sample, step_index, sigmas, noise, prediction_type, gamma,
                 s_noise)
    return _new_pair(model_output, euler_x0_dtype(model_output))


def _check_scale(fn, sample, step_index, sigmas):
    check_step_inputs(fn, sample, sample, dict(step_index=step_index), "sigmas", sigmas, None)


@torch.library.custom_op("mmkern::euler_scale_model_input", mutates_args=())
def euler_scale_model_input(sample: Tensor, step_index: Tensor, sigmas: Tensor) -> Tensor:
    fn = "mmkern::euler_scale_model_input"
    _check_scale(fn, sample, step_index, sigmas)
    N = sigmas.shape[0]
    check_index_values(fn, "step_index", step_index, 0, N - 1, f"len(sigmas) = {N}")
    return dispatch.call("euler_scale_model_input", sample.device, sample=sample, step_index=step_index,
                         sigmas=sigmas)


@euler_scale_model_input.register_fake
def _(sample, step_index, sigmas):
    _check_scale("mmkern::euler_scale_model_input", sample, step_index, sigmas)
    return sample.new_empty(sample.shape)


def _check_euler_add_noise(fn, original_samples, noise, step_index, sigmas):
    check_step_inputs(fn, original_samples, original_samples, dict(step_index=step_index), "sigmas", sigmas, noise)
    if noise is None:
        raise ValueError(f"{fn}: noise must be a tensor like original_samples, got None")


@torch.library.custom_op("mmkern::euler_add_noise", mutates_args=())
def euler_add_noise(original_samples: Tensor, noise: Tensor, step_index: Tensor, sigmas: Tensor) -> Tensor:
    """x + sigmas[i] * noise per sample: EulerDiscreteScheduler.add_noise."""
    fn = "mmkern::euler_add_noise"
    _check_euler_add_noise(fn, original_samples, noise, step_index, sigmas)
    N = sigmas.shape[0]
    check_index_values(fn, "step_index", step_index, 0, N - 1, f"len(sigmas) = {N}")
    return dispatch.call("euler_add_noise", original_samples.device, original_samples=original_samples, noise=noise,
                         step_index=step_index, sigmas=sigmas)


@euler_add_noise.register_fake
def _(original_samples, noise, step_index, sigmas):
    _check_euler_add_noise("mmkern::euler_add_noise", original_samples, noise, step_index, sigmas)
    return original_samples.new_empty(original_samples.shape)


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
