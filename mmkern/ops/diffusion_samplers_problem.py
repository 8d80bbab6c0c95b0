"""The sampler-step problem records: one call of mmkern::ddpm_step, ddim_step, euler_step, euler_scale_model_input
or euler_add_noise (mmkern/ops/diffusion_samplers.py defines the ops), validated once.

    model_output (B, ...) (DDPM with a learned variance: (B, 2C, ...)), sample (B, C, ...), one dtype
    timesteps, prev_timesteps: 0-d or (B,) integers; prev < 0 means past the end of the chain
    noise: None or like sample (the caller draws it, so that a torch.Generator drives sampling)
Outputs: (prev_sample, pred_original_sample) like sample; Euler's pred_original_sample in `euler_x0_dtype`.
Validation reads no tensor data, except the range checks of index values, for CPU tensors only
(check_values=False, the fake implementations': none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from mmkern.ops.diffusion_loss_problem import check_prediction_type
from mmkern.ops.diffusion_problem import INT_DTYPES, check_index_tensor, check_index_values

EULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def euler_x0_dtype(model_output: Tensor) -> torch.dtype:
    """diffusers' Euler step upcasts the sample to float32, so pred_original_sample is at least float32."""
    return torch.promote_types(model_output.dtype, torch.float32)


# --------------------------------------------------------------------------- the problem records

class _OnSampleDevice:
    @property
    def device(self) -> torch.device:
        return self.sample.device


@dataclass(frozen=True, eq=False)
class DDPMProblem(_OnSampleDevice):
    """One call of mmkern::ddpm_step."""
    model_output: Tensor            # (B, C, ...), or (B, 2C, ...) with a learned variance
    sample: Tensor                  # (B, C, ...)
    timesteps: Tensor               # 0-d or (B,) int32/int64
    prev_timesteps: Tensor          # like timesteps; < 0: past the end of the chain
    alphas_cumprod: Tensor          # (T,) float32/float64
    noise: Tensor | None            # like sample
    prediction_type: str
    variance_type: str              # one of VARIANCE_TYPES
    clip_sample_range: float        # > 0: clamp x0 to [-range, range]
    dynamic_thresholding_ratio: float   # > 0: dynamic thresholding (wins over clipping)
    sample_max_value: float

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in ("learned", "learned_range")


@dataclass(frozen=True, eq=False)
class DDIMProblem(_OnSampleDevice):
    """One call of mmkern::ddim_step."""
    model_output: Tensor            # (B, ...) like sample
    sample: Tensor
    timesteps: Tensor
    prev_timesteps: Tensor          # < 0: takes final_alpha_cumprod
    alphas_cumprod: Tensor
    final_alpha_cumprod: float
    eta: float
    noise: Tensor | None            # used only when eta > 0
    prediction_type: str
    clip_sample_range: float
    dynamic_thresholding_ratio: float
    sample_max_value: float
    use_clipped_model_output: bool


@dataclass(frozen=True, eq=False)
class EulerStepProblem(_OnSampleDevice):
    """One call of mmkern::euler_step: prev_sample like model_output, pred_original_sample in x0_dtype."""
    model_output: Tensor
    sample: Tensor
    step_index: Tensor              # 0-d or (B,): sigma = sigmas[i], sigma_next = sigmas[i + 1]
    sigmas: Tensor                  # (N + 1,) float32/float64
    noise: Tensor | None            # churn noise
    prediction_type: str            # one of EULER_PREDICTION_TYPES
    gamma: float
    s_tmin: float
    s_tmax: float
    s_noise: float

    @property
    def x0_dtype(self) -> torch.dtype:
        return euler_x0_dtype(self.model_output)


@dataclass(frozen=True, eq=False)
class EulerScaleProblem(_OnSampleDevice):
    """One call of mmkern::euler_scale_model_input: sample / sqrt(sigmas[i]^2 + 1)."""
    sample: Tensor
    step_index: Tensor
    sigmas: Tensor


@dataclass(frozen=True, eq=False)
class EulerAddNoiseProblem:
    """One call of mmkern::euler_add_noise: original_samples + sigmas[i] * noise."""
    original_samples: Tensor
    noise: Tensor
    step_index: Tensor
    sigmas: Tensor

    @property
    def device(self) -> torch.device:
        return self.original_samples.device


# --------------------------------------------------------------------------- validation


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


def build_ddpm_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                    variance_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value, *,
                    validate: bool = True, check_values: bool = True) -> DDPMProblem:
    """The validated record of one ddpm_step call (check_values=False, the fake's: no read of index values)."""
    fn = "mmkern::ddpm_step"
    if validate:
        _check_alpha_step(fn, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                          clip_sample_range, dynamic_thresholding_ratio, sample_max_value, learned_split=True)
        check_variance_type(fn, variance_type, model_output, sample)
    if check_values:
        _check_alpha_values(fn, timesteps, prev_timesteps, alphas_cumprod)
    return DDPMProblem(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                       variance_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)


def build_ddim_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, eta, noise,
                    prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
                    use_clipped_model_output, *, validate: bool = True, check_values: bool = True) -> DDIMProblem:
    """The validated record of one ddim_step call (check_values=False, the fake's: no read of index values)."""
    fn = "mmkern::ddim_step"
    if validate:
        _check_alpha_step(fn, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                          clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
        _check_float(fn, "eta", eta, 0.0)
        _check_float(fn, "final_alpha_cumprod", final_alpha_cumprod, 0.0, 1.0)
    if check_values:
        _check_alpha_values(fn, timesteps, prev_timesteps, alphas_cumprod)
    return DDIMProblem(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, eta,
                       noise, prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
                       use_clipped_model_output)


def _check_euler(fn, model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_noise):
    check_step_inputs(fn, model_output, sample, dict(step_index=step_index), "sigmas", sigmas, noise)
    check_prediction_type(fn, prediction_type, EULER_PREDICTION_TYPES)
    _check_float(fn, "gamma", gamma, 0.0)
    _check_float(fn, "s_noise", s_noise, 0.0)
    if sigmas.shape[0] < 2:
        raise ValueError(f"{fn}: sigmas must hold at least 2 values (sigma, sigma_next), got {tuple(sigmas.shape)}")


def build_euler_step(model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_tmin, s_tmax,
                     s_noise, *, validate: bool = True, check_values: bool = True) -> EulerStepProblem:
    """The validated record of one euler_step call (check_values=False, the fake's: no read of index values)."""
    fn = "mmkern::euler_step"
    if validate:
        _check_euler(fn, model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_noise)
    if check_values:
        N = sigmas.shape[0]
        check_index_values(fn, "step_index", step_index, 0, N - 2, f"len(sigmas) = {N}: sigmas[i + 1] is read")
    return EulerStepProblem(model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_tmin, s_tmax,
                            s_noise)


def build_euler_scale_model_input(sample, step_index, sigmas, *, validate: bool = True,
                                  check_values: bool = True) -> EulerScaleProblem:
    """The validated record of one euler_scale_model_input call."""
    fn = "mmkern::euler_scale_model_input"
    if validate:
        check_step_inputs(fn, sample, sample, dict(step_index=step_index), "sigmas", sigmas, None)
    if check_values:
        N = sigmas.shape[0]
        check_index_values(fn, "step_index", step_index, 0, N - 1, f"len(sigmas) = {N}")
    return EulerScaleProblem(sample, step_index, sigmas)


def build_euler_add_noise(original_samples, noise, step_index, sigmas, *,
                          validate: bool = True, check_values: bool = True) -> EulerAddNoiseProblem:
    """The validated record of one euler_add_noise call."""
    fn = "mmkern::euler_add_noise"
    if validate:
        check_step_inputs(fn, original_samples, original_samples, dict(step_index=step_index), "sigmas", sigmas,
                          noise)
    if noise is None:
        raise ValueError(f"{fn}: noise must be a tensor like original_samples, got None")
    if check_values:
        N = sigmas.shape[0]
        check_index_values(fn, "step_index", step_index, 0, N - 1, f"len(sigmas) = {N}")
    return EulerAddNoiseProblem(original_samples, noise, step_index, sigmas)
