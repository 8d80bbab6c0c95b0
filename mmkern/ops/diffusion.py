"""Noise-schedule ops: mmkern::add_noise and mmkern::get_velocity.

samples and noise: the same shape (B, ...) and dtype; timesteps: integer, 0-d or (B,);
alphas_cumprod: 1-D float table (T,). Both ops are linear in (samples, noise), so their
backward is a per-sample scaling written with plain torch ops.

Each call builds one NoiseMixProblem (mmkern/ops/diffusion_problem.py, with the checks), validated once, and
hands it to the dispatcher.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops.diffusion_problem import (INT_DTYPES, IndexDtypeError, NoiseMixProblem, build_noise_mix,  # noqa: F401
                                          check_index_tensor, check_index_values, check_schedule_inputs,
                                          check_timestep_values, schedule_coefficients)


def _define(name: str):
    """Registers mmkern::<name>(samples, noise, timesteps, alphas_cumprod) -> Tensor with fake, autograd and its
    problem builder."""
    qualname = f"mmkern::{name}"

    @torch.library.custom_op(qualname, mutates_args=())
    def op(samples: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
        return dispatch.call_memoized(name, build_noise_mix, name, samples, noise, timesteps, alphas_cumprod)

    @op.register_fake
    def _(samples, noise, timesteps, alphas_cumprod):
        build_noise_mix(name, samples, noise, timesteps, alphas_cumprod, check_values=False)
        return samples.new_empty(samples.shape)   # outputs are contiguous

    def build(samples, noise, timesteps, alphas_cumprod):
        return build_noise_mix(name, samples, noise, timesteps, alphas_cumprod)

    dispatch.define_problem(name, build)
    return op


add_noise = _define("add_noise")          # sqrt(a) * x0 + sqrt(1 - a) * noise
get_velocity = _define("get_velocity")    # sqrt(a) * noise - sqrt(1 - a) * x0


def _setup_context(ctx, inputs, output):
    _, _, timesteps, alphas_cumprod = inputs
    ctx.save_for_backward(timesteps, alphas_cumprod)


def _coefficients(ctx, grad):
    timesteps, alphas_cumprod = ctx.saved_tensors
    return schedule_coefficients(timesteps, alphas_cumprod, grad, dtype=torch.float32)


def _add_noise_backward(ctx, grad):
    sqrt_a, sqrt_one_minus_a = _coefficients(ctx, grad)
    return (grad * sqrt_a).to(grad.dtype), (grad * sqrt_one_minus_a).to(grad.dtype), None, None


def _get_velocity_backward(ctx, grad):
    sqrt_a, sqrt_one_minus_a = _coefficients(ctx, grad)
    return (-grad * sqrt_one_minus_a).to(grad.dtype), (grad * sqrt_a).to(grad.dtype), None, None


torch.library.register_autograd("mmkern::add_noise", _add_noise_backward, setup_context=_setup_context)
torch.library.register_autograd("mmkern::get_velocity", _get_velocity_backward, setup_context=_setup_context)
