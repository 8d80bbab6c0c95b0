"""The `cpu` and `cuda` backends of the diffusion ops: adapters onto torch.ops.mmkern_C.diffusion_*.

The C++ kernels (csrc/diffusion/: diffusion_cpu.cpp with at::vec + at::parallel_for, diffusion_cuda.cu
with 16-byte vector loads) take contiguous float32/float16/bfloat16 samples, 0-d or (B,) int32/int64
indices (clamped into the table inside the kernels: GPU indices are never read on the host) and a 1-D
float32/float64 table read as fp32; every coefficient and element is computed in fp32, as the Triton
kernels do (mmkern/triton/diffusion*.py), and results are rounded once to the output dtype.

Dynamic thresholding needs a per-sample quantile of |x0| that no streaming pass gives: as on the Triton
path, diffusion_alpha_x0 writes x0 in fp32, torch.quantile runs on the device (no host sync), and the
step kernel takes the per-sample scale s (B,).

Each run function takes the keyword inputs of the matching Triton function; `reasons` lists what the
kernels do not take (float64 samples: the reference backend) and what the loaded build lacks.
"""
from __future__ import annotations

import torch

from mmkern import native

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANTILE_LIMIT = 2 ** 24       # torch.quantile's input limit: larger batches go through it in chunks of samples

# mmkern op -> the C++ ops it calls
CPP_OPS = {
    "add_noise": ("diffusion_add_noise",),
    "get_velocity": ("diffusion_get_velocity",),
    "diffusion_loss": ("diffusion_loss",),
    "diffusion_loss_backward": ("diffusion_loss_backward",),
    "ddpm_step": ("diffusion_ddpm_step", "diffusion_alpha_x0"),
    "ddim_step": ("diffusion_ddim_step", "diffusion_alpha_x0"),
    "euler_step": ("diffusion_euler_step",),
    "euler_scale_model_input": ("diffusion_euler_scale_model_input",),
    "euler_add_noise": ("diffusion_euler_add_noise",),
}
_SAMPLE_NAMES = ("original_samples", "sample", "model_output")


def reasons(**inputs) -> list[str]:
    """Why the C++ kernels cannot take these inputs ([] = they can). The op is found from the inputs'
    names: the dispatcher calls this one function for every diffusion op."""
    samples_name = next((n for n in _SAMPLE_NAMES if isinstance(inputs.get(n), torch.Tensor)), None)
    if samples_name is None:
        return ["no sample tensor among the inputs"]
    samples = inputs[samples_name]
    out = []
    if samples.dtype not in KERNEL_DTYPES:
        out.append(f"{samples_name} has dtype {samples.dtype}; the C++ kernels take float16, bfloat16 and float32")
    out += _missing(_cpp_ops_for(inputs), samples.device.type)
    return out


_PRESENT: set = set()      # (C++ ops, device type) found in the loaded build: a loaded build does not change


def _missing(ops: tuple[str, ...], device_type: str) -> list[str]:
    key = (ops, device_type)
    if key in _PRESENT:
        return []
    missing = native.missing_op_reasons(*ops, device=device_type)
    if not missing:
        _PRESENT.add(key)
    return missing


def _cpp_ops_for(inputs) -> tuple[str, ...]:
    if "grad" in inputs:
        return CPP_OPS["diffusion_loss_backward"]
    if "prediction_type" in inputs and "original_samples" in inputs:
        return CPP_OPS["diffusion_loss"]
    if "variance_type" in inputs:
        return CPP_OPS["ddpm_step"]
    if "eta" in inputs:
        return CPP_OPS["ddim_step"]
    if "gamma" in inputs:
        return CPP_OPS["euler_step"]
    if "sigmas" in inputs:
        return CPP_OPS["euler_add_noise"] if "noise" in inputs else CPP_OPS["euler_scale_model_input"]
    return CPP_OPS["add_noise"] if "original_samples" in inputs else CPP_OPS["get_velocity"]


def _c(t):
    return None if t is None else t.contiguous()


# --------------------------------------------------------------------------- noise schedule

def add_noise(original_samples, noise, timesteps, alphas_cumprod):
    return native.cpp_op("diffusion_add_noise")(_c(original_samples), _c(noise), _c(timesteps), _c(alphas_cumprod))


def get_velocity(sample, noise, timesteps, alphas_cumprod):
    return native.cpp_op("diffusion_get_velocity")(_c(sample), _c(noise), _c(timesteps), _c(alphas_cumprod))


# --------------------------------------------------------------------------- loss

def diffusion_loss(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma):
    return native.cpp_op("diffusion_loss")(_c(model_output), _c(original_samples), _c(noise), _c(timesteps),
                                           _c(alphas_cumprod), prediction_type, float(snr_gamma or 0.0))


def diffusion_loss_backward(grad, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type,
                            snr_gamma):
    return native.cpp_op("diffusion_loss_backward")(
        grad.to(torch.float32).contiguous(), _c(model_output), _c(original_samples), _c(noise), _c(timesteps),
        _c(alphas_cumprod), prediction_type, float(snr_gamma or 0.0))


# --------------------------------------------------------------------------- sampler steps

def _thresholds(model_output, sample, timesteps, alphas_cumprod, prediction_type, ratio, sample_max_value):
    """s (B,) fp32 = clamp(quantile(|x0|, ratio) per sample, 1, max), on the samples' device (no host sync)."""
    if ratio <= 0 or sample.numel() == 0:
        return None
    x0 = native.cpp_op("diffusion_alpha_x0")(model_output, sample, timesteps, alphas_cumprod, prediction_type)
    rows = max(1, QUANTILE_LIMIT // max(x0.shape[1], 1))
    parts = [torch.quantile(chunk.abs(), ratio, dim=1) for chunk in x0.split(rows)]
    return torch.cat(parts).clamp(1, sample_max_value).contiguous()


def ddpm_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type, variance_type,
              clip_sample_range, dynamic_thresholding_ratio, sample_max_value):
    model_output, sample, timesteps, alphas_cumprod = _c(model_output), _c(sample), _c(timesteps), _c(alphas_cumprod)
    threshold = _thresholds(model_output, sample, timesteps, alphas_cumprod, prediction_type,
                            dynamic_thresholding_ratio, sample_max_value)
    return native.cpp_op("diffusion_ddpm_step")(model_output, sample, timesteps, _c(prev_timesteps), alphas_cumprod,
                                                _c(noise), threshold, prediction_type, variance_type,
                                                float(clip_sample_range))


def ddim_step(model_output, sample, timesteps, prev_timesteps, alphas_cumprod, final_alpha_cumprod, eta, noise,
              prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
              use_clipped_model_output):
    model_output, sample, timesteps, alphas_cumprod = _c(model_output), _c(sample), _c(timesteps), _c(alphas_cumprod)
    threshold = _thresholds(model_output, sample, timesteps, alphas_cumprod, prediction_type,
                            dynamic_thresholding_ratio, sample_max_value)
    return native.cpp_op("diffusion_ddim_step")(model_output, sample, timesteps, _c(prev_timesteps), alphas_cumprod,
                                                float(final_alpha_cumprod), float(eta), _c(noise), threshold,
                                                prediction_type, float(clip_sample_range),
                                                bool(use_clipped_model_output))


def euler_step(model_output, sample, step_index, sigmas, noise, prediction_type, gamma, s_tmin, s_tmax, s_noise):
    return native.cpp_op("diffusion_euler_step")(_c(model_output), _c(sample), _c(step_index), _c(sigmas), _c(noise),
                                                 prediction_type, float(gamma), float(s_tmin), float(s_tmax),
                                                 float(s_noise))


def euler_scale_model_input(sample, step_index, sigmas):
    return native.cpp_op("diffusion_euler_scale_model_input")(_c(sample), _c(step_index), _c(sigmas))


def euler_add_noise(original_samples, noise, step_index, sigmas):
    return native.cpp_op("diffusion_euler_add_noise")(_c(original_samples), _c(noise), _c(step_index), _c(sigmas))
