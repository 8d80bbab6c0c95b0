"""The noise-schedule problem record (mmkern::add_noise / get_velocity: NoiseMixProblem) and the schedule
checks every diffusion op validates with (mmkern/ops/diffusion.py defines the ops).

samples and noise: one shape (B, ...) and dtype; timesteps: integer, 0-d or (B,); alphas_cumprod: 1-D float
table (T,). The output has the samples' shape and dtype (a new contiguous tensor). Validation reads no tensor
data, except the range checks of index values (check_index_values), which read CPU tensors only.
`schedule_coefficients` is the op layer's gather of the schedule (the ops' autograd uses it; the reference backend
gathers on its own).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor

INT_DTYPES = (torch.int32, torch.int64)
SMALL_INDEX_TENSOR = 1024         # index tensors up to this size are range-checked in Python (check_index_values)


def schedule_coefficients(timesteps: Tensor, alphas_cumprod: Tensor, sample: Tensor,
                          dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(sqrt(a_t), sqrt(1 - a_t)) gathered at `timesteps` from the table, in `dtype`, shaped to broadcast
    against `sample` (B, ...): (B, 1, ..., 1) for (B,) timesteps, 0-d for one timestep."""
    a = alphas_cumprod.to(dtype)[timesteps.long()]
    a = a.reshape(tuple(a.shape) + (1,) * (sample.dim() - a.dim()))
    return a.sqrt(), (1 - a).sqrt()


@dataclass(frozen=True, eq=False)
class NoiseMixProblem:
    """One call of mmkern::add_noise (velocity False: sqrt(a) x + sqrt(1 - a) noise) or mmkern::get_velocity
    (velocity True: sqrt(a) noise - sqrt(1 - a) x). `samples` is the schema's first argument: original_samples
    for add_noise, sample for get_velocity (`samples_name`, as the error messages call it)."""
    samples: Tensor                 # (B, ...)
    noise: Tensor                   # like samples
    timesteps: Tensor               # 0-d or (B,) int32/int64
    alphas_cumprod: Tensor          # (T,) float32/float64
    velocity: bool

    @property
    def samples_name(self) -> str:
        return "sample" if self.velocity else "original_samples"

    @property
    def op(self) -> str:
        return "get_velocity" if self.velocity else "add_noise"

    @property
    def device(self) -> torch.device:
        return self.samples.device


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
    numel = values.numel()
    if values.device.type != "cpu" or numel == 0:
        return
    if numel <= SMALL_INDEX_TENSOR:
        # a batch of timesteps: read as Python ints (~1 us; aminmax and two int() cost ~7 us per call)
        listed = values.tolist()
        got_low, got_high = (listed, listed) if values.dim() == 0 else (min(listed), max(listed))
    else:
        got_low, got_high = torch.aminmax(values)
        got_low, got_high = int(got_low), int(got_high)
    if (low is not None and got_low < low) or got_high > high:
        allowed = f"[{low}, {high}]" if low is not None else f"<= {high}"
        raise ValueError(f"{fn}: {name} must lie in {allowed} ({what}); got values in [{got_low}, {got_high}]")


def check_timestep_values(fn: str, timesteps: Tensor, alphas_cumprod: Tensor) -> None:
    """Timesteps index alphas_cumprod: [0, T - 1]. CPU tensors only (see check_index_values)."""
    T = alphas_cumprod.shape[0]
    check_index_values(fn, "timesteps", timesteps, 0, T - 1, f"len(alphas_cumprod) = {T}")


def build_noise_mix(op: str, samples, noise, timesteps, alphas_cumprod, *, validate: bool = True,
                    check_values: bool = True):
    """The validated record of one add_noise / get_velocity call. check_values=False (the fake implementation)
    skips the range check of the timesteps' values, which reads them; validate=False the shape/dtype checks (a
    signature already validated: dispatch.call_memoized)."""
    qualname = f"mmkern::{op}"
    velocity = op == "get_velocity"
    samples_name = "sample" if velocity else "original_samples"
    if validate:
        check_schedule_inputs(qualname, samples_name, samples, noise, timesteps, alphas_cumprod)
    if check_values:
        check_timestep_values(qualname, timesteps, alphas_cumprod)
    return NoiseMixProblem(samples, noise, timesteps, alphas_cumprod, velocity)
