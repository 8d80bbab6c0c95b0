"""Argument validation shared by the op families.

Every message names the function, the argument, what it got and what is allowed, so a user
can fix the call without reading mmkern's source. Shape and dtype checks only: they run
unchanged on fake tensors while torch.compile traces.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(fn: str, name: str, t, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | Sequence[int] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must have dtype {_names(dtypes)}; got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{fn}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")


def check_same_dtype(fn: str, **tensors: torch.Tensor | None) -> None:
    present = {n: t for n, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in present.items())
        raise TypeError(f"{fn}: {', '.join(present)} must share one dtype; got {got}")


def check_same_device(fn: str, **tensors: torch.Tensor | None) -> None:
    present = {n: t for n, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"{fn}: all tensors must be on one device; got {got}")


def check_dim(fn: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{fn}: {name}.shape[{dim}] ({what}) must be {expected}, got shape {tuple(t.shape)}")


def check_dropout_p(fn: str, dropout_p) -> None:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1), got {dropout_p!r}")


def check_positive_float(fn: str, name: str, value, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        allowed = "a float >= 0" if allow_zero else "a float > 0"
        raise ValueError(f"{fn}: {name} must be {allowed}, got {value!r}")


def last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels index the last dimension with stride 1; copy (never misread) when it is not."""
    if t is not None and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        return t.contiguous()
    return t
