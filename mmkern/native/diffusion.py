"""The `cpu` and `cuda` backends of the diffusion ops: adapters onto torch.ops.mmkern_C.diffusion_*.

The C++ kernels (csrc/diffusion/: diffusion_cpu.cpp with at::vec + at::parallel_for, diffusion_cuda.cu
with 16-byte vector loads) take contiguous float32/float16/bfloat16 samples, 0-d or (B,) int32/int64
indices (clamped into the table inside the kernels: GPU indices are never read on the host) and a 1-D
float32/float64 table read as fp32; every coefficient and element is computed in fp32, as the Triton
kernels do (mmkern/triton/diffusion*.py), and results are rounded once to the output dtype.

Dynamic thresholding needs a per-sample quantile of |x0| that no streaming pass gives: as on the Triton
path, diffusion_alpha_x0 writes x0 in fp32, torch.quantile runs on the device (no host sync), and the
step kernel takes the per-sample scale s (B,).

Each run function takes the op's problem record (mmkern/ops/diffusion*.py); `reasons(problem)` lists what the
kernels do not take (float64 samples: the reference backend) and what the loaded build lacks.
"""
from __future__ import annotations

import torch

from mmkern import native
from mmkern.ops.diffusion_loss_problem import LossProblem
from mmkern.ops.diffusion_problem import NoiseMixProblem
from mmkern.ops.diffusion_samplers_problem import (DDIMProblem, DDPMProblem, EulerAddNoiseProblem, EulerScaleProblem,
                                                   EulerStepProblem)

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


def _op_of(problem) -> str:
    """The mmkern op a record is for (one reasons function serves every diffusion op)."""
    if isinstance(problem, NoiseMixProblem):
        return problem.op
    if isinstance(problem, LossProblem):
        return "diffusion_loss_backward" if problem.backward else "diffusion_loss"
    return {DDPMProblem: "ddpm_step", DDIMProblem: "ddim_step", EulerStepProblem: "euler_step",
            EulerScaleProblem: "euler_scale_model_input", EulerAddNoiseProblem: "euler_add_noise"}[type(problem)]


def _samples(problem) -> tuple[str, torch.Tensor]:
    """(name, tensor) of the samples whose dtype the kernels run in, as the op's errors name them."""
    if isinstance(problem, NoiseMixProblem):
        return problem.samples_name, problem.samples
    if isinstance(problem, LossProblem):
        return "model_output", problem.model_output
    if isinstance(problem, EulerAddNoiseProblem):
        return "original_samples", problem.original_samples
    return "sample", problem.sample


def reasons(problem) -> list[str]:
    """Why the C++ kernels cannot take this problem ([] = they can)."""
    samples_name, samples = _samples(problem)
    out = []
    if samples.dtype not in KERNEL_DTYPES:
        out.append(f"{samples_name} has dtype {samples.dtype}; the C++ kernels take float16, bfloat16 and float32")
    out += _missing(CPP_OPS[_op_of(problem)], samples.device.type)
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


def _c(t):
    return None if t is None else t.contiguous()


# --------------------------------------------------------------------------- noise schedule

def add_noise(p):
    return native.cpp_op("diffusion_add_noise")(_c(p.samples), _c(p.noise), _c(p.timesteps), _c(p.alphas_cumprod))


def get_velocity(p):
    return native.cpp_op("diffusion_get_velocity")(_c(p.samples), _c(p.noise), _c(p.timesteps), _c(p.alphas_cumprod))


# --------------------------------------------------------------------------- loss

def diffusion_loss(p):
    return native.cpp_op("diffusion_loss")(_c(p.model_output), _c(p.original_samples), _c(p.noise), _c(p.timesteps),
                                           _c(p.alphas_cumprod), p.prediction_type, float(p.snr_gamma or 0.0))


def diffusion_loss_backward(p):
    return native.cpp_op("diffusion_loss_backward")(
        p.grad.to(torch.float32).contiguous(), _c(p.model_output), _c(p.original_samples), _c(p.noise),
        _c(p.timesteps), _c(p.alphas_cumprod), p.prediction_type, float(p.snr_gamma or 0.0))


# --------------------------------------------------------------------------- sampler steps

def _thresholds(model_output, sample, timesteps, alphas_cumprod, prediction_type, ratio, sample_max_value):
    """s (B,) fp32 = clamp(quantile(|x0|, ratio) per sample, 1, max), on the samples' device (no host sync)."""
    if ratio <= 0 or sample.numel() == 0:
        return None
    x0 = native.cpp_op("diffusion_alpha_x0")(model_output, sample, timesteps, alphas_cumprod, prediction_type)
    rows = max(1, QUANTILE_LIMIT // max(x0.shape[1], 1))
    parts = [torch.quantile(chunk.abs(), ratio, dim=1) for chunk in x0.split(rows)]
    return torch.cat(parts).clamp(1, sample_max_value).contiguous()


def ddpm_step(p):
    model_output, sample, timesteps, alphas_cumprod = _c(p.model_output), _c(p.sample), _c(p.timesteps), \
        _c(p.alphas_cumprod)
    threshold = _thresholds(model_output, sample, timesteps, alphas_cumprod, p.prediction_type,
                            p.dynamic_thresholding_ratio, p.sample_max_value)
    return native.cpp_op("diffusion_ddpm_step")(model_output, sample, timesteps, _c(p.prev_timesteps), alphas_cumprod,
                                                _c(p.noise), threshold, p.prediction_type, p.variance_type,
                                                float(p.clip_sample_range))


def ddim_step(p):
    model_output, sample, timesteps, alphas_cumprod = _c(p.model_output), _c(p.sample), _c(p.timesteps), \
        _c(p.alphas_cumprod)
    threshold = _thresholds(model_output, sample, timesteps, alphas_cumprod, p.prediction_type,
                            p.dynamic_thresholding_ratio, p.sample_max_value)
    return native.cpp_op("diffusion_ddim_step")(model_output, sample, timesteps, _c(p.prev_timesteps), alphas_cumprod,
                                                float(p.final_alpha_cumprod), float(p.eta), _c(p.noise), threshold,
                                                p.prediction_type, float(p.clip_sample_range),
                                                bool(p.use_clipped_model_output))


def euler_step(p):
    return native.cpp_op("diffusion_euler_step")(_c(p.model_output), _c(p.sample), _c(p.step_index), _c(p.sigmas),
                                                 _c(p.noise), p.prediction_type, float(p.gamma), float(p.s_tmin),
                                                 float(p.s_tmax), float(p.s_noise))


def euler_scale_model_input(p):
    return native.cpp_op("diffusion_euler_scale_model_input")(_c(p.sample), _c(p.step_index), _c(p.sigmas))


def euler_add_noise(p):
    return native.cpp_op("diffusion_euler_add_noise")(_c(p.original_samples), _c(p.noise), _c(p.step_index),
                                                      _c(p.sigmas))
