"""The diffusion-loss problem record: one call of mmkern::diffusion_loss (grad None) or
diffusion_loss_backward (mmkern/ops/diffusion_loss.py defines the ops).

model_output, original_samples, noise: (B, ...), one shape and dtype; timesteps 0-d or (B,) integers. The loss
is 0-d in `loss_dtype`; the backward's d model_output is like model_output (a new contiguous tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmkern.ops._checks import FLOAT_DTYPES, check_tensor
from mmkern.ops.diffusion_problem import check_schedule_inputs, check_timestep_values


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def loss_dtype(model_output: Tensor) -> torch.dtype:
    """The loss is float32 (float64 for float64 inputs), like F.mse_loss(pred.float(), target.float())."""
    return torch.float64 if model_output.dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class LossProblem:
    """One call of mmkern::diffusion_loss (grad None) or mmkern::diffusion_loss_backward (grad: the 0-d
    gradient of the loss)."""
    model_output: Tensor            # (B, ...)
    original_samples: Tensor        # like model_output
    noise: Tensor                   # like model_output
    timesteps: Tensor               # 0-d or (B,) int32/int64
    alphas_cumprod: Tensor          # (T,) float32/float64
    prediction_type: str            # epsilon | v_prediction | sample
    snr_gamma: float                # <= 0: no Min-SNR weighting
    grad: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.model_output.device

    @property
    def backward(self) -> bool:
        return self.grad is not None

    @property
    def min_snr(self) -> bool:
        return self.snr_gamma > 0

    @property
    def loss_dtype(self) -> torch.dtype:
        return loss_dtype(self.model_output)


def check_prediction_type(fn: str, prediction_type: str, allowed=PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise ValueError(f"{fn}: prediction_type must be one of {', '.join(allowed)}; got {prediction_type!r}")


def check_loss_inputs(fn, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type):
    check_schedule_inputs(fn, "original_samples", original_samples, noise, timesteps, alphas_cumprod)
    check_tensor(fn, "model_output", model_output, dtypes=FLOAT_DTYPES)
    if model_output.shape != original_samples.shape or model_output.dtype != original_samples.dtype:
        raise ValueError(f"{fn}: model_output must have the shape and dtype of original_samples "
                         f"({tuple(original_samples.shape)}, {original_samples.dtype}); got "
                         f"{tuple(model_output.shape)}, {model_output.dtype}")
    if model_output.device != original_samples.device:
        raise ValueError(f"{fn}: all tensors must be on one device; got model_output on {model_output.device}, "
                         f"original_samples on {original_samples.device}")
    check_prediction_type(fn, prediction_type)


def build_loss(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma, *,
               validate: bool = True, check_values: bool = True) -> LossProblem:
    """The validated record of one diffusion_loss call (check_values=False, the fake's: no read of the
    timesteps' values; validate=False: no shape/dtype checks, a signature dispatch.call_memoized has seen)."""
    fn = "mmkern::diffusion_loss"
    if validate:
        check_loss_inputs(fn, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type)
    if check_values:
        check_timestep_values(fn, timesteps, alphas_cumprod)
    return LossProblem(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma)


def build_loss_backward(grad, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type,
                        snr_gamma) -> LossProblem:
    """The validated record of one diffusion_loss_backward call."""
    fn = "mmkern::diffusion_loss_backward"
    check_loss_inputs(fn, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type)
    check_tensor(fn, "grad", grad, dtypes=FLOAT_DTYPES, ndim=0)
    return LossProblem(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma,
                       grad)
