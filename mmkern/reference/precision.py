"""The precision the reference backend computes in: float64 (the oracle) unless told otherwise.

`with compute_in(torch.bfloat16):` runs the same eager math in a low precision instead. That is
"what plain PyTorch gives in dtype d", the yardstick of the accuracy criterion: a kernel's error
against the float64 oracle may be at most a small multiple of this baseline's error.
"""
from __future__ import annotations

import contextvars

import torch

_compute_dtype: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("mmkern_reference_dtype",
                                                                            default=torch.float64)


def compute_dtype() -> torch.dtype:
    return _compute_dtype.get()


def up(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` in the compute dtype (None stays None)."""
    return None if t is None else t.to(_compute_dtype.get())


class compute_in:
    """Context manager: the reference backend computes in `dtype` inside the block."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> "compute_in":
        self._tokens.append(_compute_dtype.set(self.dtype))
        return self

    def __exit__(self, *exc) -> None:
        _compute_dtype.reset(self._tokens.pop())
