"""Argument normalisation shared by the public diffusion functions (noising.py, loss.py, sampling.py).

Only what the public API accepts beyond the ops' schemas: a Python int where the op takes an index tensor,
and a copy of a tensor whose last dimension is strided. Validation proper (shapes, dtypes, ranges) is the
op layer's (mmkern/ops/diffusion*.py), done once per call.
"""
from __future__ import annotations

import torch

from mmkern.ops._checks import last_dim_contiguous


def index_tensor(fn: str, name: str, value, like: torch.Tensor) -> torch.Tensor:
    """An int -> a 0-d int64 tensor on like's device; a tensor as it is (the op checks its dtype and shape).
    Anything else: TypeError naming fn and the argument."""
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.tensor(value, dtype=torch.int64, device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be an int or an integer tensor, got {type(value).__name__}")
    return value


def samples_noise_timesteps(fn: str, samples_name: str, samples, noise, timesteps):
    """(samples, noise, timesteps) with last-dimension-contiguous tensors and timesteps as a tensor."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{fn}: {samples_name} must be a torch.Tensor, got {type(samples).__name__}")
    return (last_dim_contiguous(samples), last_dim_contiguous(noise),
            index_tensor(fn, "timesteps", timesteps, samples))
