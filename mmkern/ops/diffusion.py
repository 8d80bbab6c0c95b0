"""Noise-schedule ops: mmkern::add_noise and mmkern::get_velocity.

samples and noise: the same shape (B, ...) and dtype; timesteps: integer, 0-d or (B,);
alphas_cumprod: 1-D float table (T,). Both ops are linear in (samples, noise), so their
backward is a per-sample scaling written with plain torch ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmkern import dispatch
from mmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from mmkern.reference.diffusion import schedule_coefficients

INT_DTYPES = (torch.int32, torch.int64)


class IndexDtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype where an integer index is needed (float timesteps): a TypeError, as
    every dtype error of mmkern, and a ValueError, as the diffusion issue's bad-input list asks."""


def check_index_tensor(fn: str, name: str, t) -> None:
    if isinstance(t, torch.Tensor) and t.dtype not in INT_DTYPES:
        raise IndexDtypeError(f"{fn}: {name} must have dtype int32, int64; got {t.dtype} (an index into the table)")


def check_schedule_inputs(fn: str, samples_name: str, samples, noise, timesteps, alphas_cumprod) -> None:
    """Shape/dtype checks (no data reads: safe on fake tensors)."""
    check_tensor(fn, samples_name, samples, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "noise", noise, dtypes=FLOAT_DTYPES)
    if noise.shape != samples.shape or noise.dtype != samples.dtype:
        raise ValueError(f"{fn}: noise must have the shape and dtype of {samples_name} "
                         f"({tuple(samples.shape)}, {samples.dtype}); got {tuple(noise.shape)}, {noise.dtype}")
    check_index_tensor(fn, "timesteps", timesteps)
    check_tensor(fn, "timesteps", timesteps, dtypes=INT_DTYPES, ndim=(0, 1))
    if timesteps.dim() == 1 and (samples.dim() == 0 or timesteps.shape[0] != samples.shape[0]):
        raise ValueError(f"{fn}: timesteps must be 0-d or (batch,) with batch = {samples_name}.shape[0]; got "
                         f"timesteps {tuple(timesteps.shape)} for {samples_name} {tuple(samples.shape)}")
    check_tensor(fn, "alphas_cumprod", alphas_cumprod, dtypes=(torch.float32, torch.float64), ndim=1)
    if alphas_cumprod.shape[0] < 1:
        raise ValueError(f"{fn}: alphas_cumprod must hold at least one timestep, got shape {tuple(alphas_cumprod.shape)}")
    check_same_device(fn, **{samples_name: samples}, noise=noise, timesteps=timesteps, alphas_cumprod=alphas_cumprod)


def check_index_values(fn: str, name: str, values: Tensor, low: int | None, high: int, what: str) -> None:
    """Range check of an index tensor's values, for CPU tensors only.

    Reading a GPU tensor's values on the host (.min(), .item(), int(...)) waits for the stream: one
    sampling step would stall the GPU every call (issue 5: no host synchronisation in add_noise, the
    loss or a step). So on a GPU values are not checked here; the kernels clamp every gathered index
    into the table, so a bad value gives a wrong number, never an out-of-bounds read.
    """
    if values.device.type != "cpu" or values.numel() == 0:
        return
    got_low, got_high = torch.aminmax(values)
    got_low, got_high = int(got_low), int(got_high)
    if (low is not None and got_low < low) or got_high > high:
        allowed = f"[{low}, {high}]" if low is not None else f"<= {high}"
        raise ValueError(f"{fn}: {name} must lie in {allowed} ({what}); got values in [{got_low}, {got_high}]")


def check_timestep_values(fn: str, timesteps: Tensor, alphas_cumprod: Tensor) -> None:
    """Timesteps index alphas_cumprod: [0, T - 1]. CPU tensors only (see check_index_values)."""
    T = alphas_cumprod.shape[0]
    check_index_values(fn, "timesteps", timesteps, 0, T - 1, f"len(alphas_cumprod) = {T}")


def _define(name: str, samples_name: str):
    """Registers mmkern::<name>(samples, noise, timesteps, alphas_cumprod) -> Tensor with fake and autograd."""
    qualname = f"mmkern::{name}"

    @torch.library.custom_op(qualname, mutates_args=())
    def op(samples: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
        check_schedule_inputs(qualname, samples_name, samples, noise, timesteps, alphas_cumprod)
        check_timestep_values(qualname, timesteps, alphas_cumprod)
        return dispatch.call(name, samples.device, **{samples_name: samples}, noise=noise, timesteps=timesteps,
                             alphas_cumprod=alphas_cumprod)

    @op.register_fake
    def _(samples, noise, timesteps, alphas_cumprod):
        check_schedule_inputs(qualname, samples_name, samples, noise, timesteps, alphas_cumprod)
        return samples.new_empty(samples.shape)   # outputs are contiguous

    return op


add_noise = _define("add_noise", "original_samples")      # sqrt(a) * x0 + sqrt(1 - a) * noise
get_velocity = _define("get_velocity", "sample")          # sqrt(a) * noise - sqrt(1 - a) * x0


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
