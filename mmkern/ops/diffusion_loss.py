"""The diffusion training loss as torch ops: mmkern::diffusion_loss and mmkern::diffusion_loss_backward.

    diffusion_loss(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma)
        -> 0-d float32 loss (float64 for float64 inputs); snr_gamma <= 0 means no Min-SNR weighting
    diffusion_loss_backward(grad, ...same...) -> d loss / d model_output, one fused kernel

model_output, original_samples, noise: (B, ...), one shape and dtype; timesteps 0-d or (B,) integers.
The gradients for original_samples and noise (rarely wanted: the target is data) are written
with plain torch ops from d model_output: the target is linear in them.

Each call builds one LossProblem (mmkern/ops/diffusion_loss_problem.py: grad None for the forward; the checks
and the loss's dtype `loss_dtype`), validated once, and hands it to the dispatcher.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops.diffusion_loss_problem import (PREDICTION_TYPES, LossProblem, build_loss,  # noqa: F401
                                               build_loss_backward, check_loss_inputs, check_prediction_type,
                                               loss_dtype)
from mmkern.ops.diffusion_problem import schedule_coefficients


dispatch.define_problem("diffusion_loss", build_loss)
dispatch.define_problem("diffusion_loss_backward", build_loss_backward)


@torch.library.custom_op("mmkern::diffusion_loss", mutates_args=())
def diffusion_loss(model_output: Tensor, original_samples: Tensor, noise: Tensor, timesteps: Tensor,
                   alphas_cumprod: Tensor, prediction_type: str, snr_gamma: float) -> Tensor:
    return dispatch.call_memoized("diffusion_loss", build_loss, model_output, original_samples, noise, timesteps,
                                  alphas_cumprod, prediction_type, snr_gamma)


@diffusion_loss.register_fake
def _(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma):
    p = build_loss(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma,
                   check_values=False)
    return model_output.new_empty((), dtype=p.loss_dtype)


@torch.library.custom_op("mmkern::diffusion_loss_backward", mutates_args=())
def diffusion_loss_backward(grad: Tensor, model_output: Tensor, original_samples: Tensor, noise: Tensor,
                            timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str,
                            snr_gamma: float) -> Tensor:
    return dispatch.call("diffusion_loss_backward", build_loss_backward(
        grad, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma))


@diffusion_loss_backward.register_fake
def _(grad, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma):
    build_loss_backward(grad, model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type,
                        snr_gamma)
    return model_output.new_empty(model_output.shape)


def _setup_context(ctx, inputs, output):
    model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type, snr_gamma = inputs
    ctx.save_for_backward(model_output, original_samples, noise, timesteps, alphas_cumprod)
    ctx.prediction_type, ctx.snr_gamma = prediction_type, snr_gamma


def _backward(ctx, grad):
    model_output, original_samples, noise, timesteps, alphas_cumprod = ctx.saved_tensors
    d_model_output = diffusion_loss_backward(grad, model_output, original_samples, noise, timesteps, alphas_cumprod,
                                             ctx.prediction_type, ctx.snr_gamma)
    d_original = d_noise = None
    # loss depends on the target only through (model_output - target): d target = -d model_output
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        if ctx.prediction_type == "epsilon":
            d_noise = -d_model_output
            d_original = torch.zeros_like(original_samples)
        elif ctx.prediction_type == "sample":
            d_original, d_noise = -d_model_output, torch.zeros_like(noise)
        else:   # target = sqrt(a) noise - sqrt(1 - a) x0
            coefficient_dtype = torch.float64 if d_model_output.dtype == torch.float64 else torch.float32
            sqrt_a, sqrt_one_minus_a = schedule_coefficients(timesteps, alphas_cumprod, d_model_output,
                                                             dtype=coefficient_dtype)
            d_original = (d_model_output * sqrt_one_minus_a).to(original_samples.dtype)
            d_noise = (-d_model_output * sqrt_a).to(noise.dtype)
    return d_model_output, d_original, d_noise, None, None, None, None


torch.library.register_autograd("mmkern::diffusion_loss", _backward, setup_context=_setup_context)
