"""The rotary-embedding problem record (mmkern::rotary_embedding: RotaryProblem) and its checks.

x: (B, L, H, D) or, varlen, (total, H, D) with cu_seqlens (B + 1,) int32; cos, sin: (seqlen_ro, rotary_dim / 2),
x's dtype or float32. Token t of sequence b sits at position t + offset_b (offset_b = seqlen_offsets[b] when that
(B,) tensor is given, else the int seqlen_offset); its first rotary_dim features are rotated by the angle of
table row `position`, pairs (2i, 2i + 1) when interleaved (GPT-J), (i, i + rotary_dim / 2) otherwise (GPT-NeoX);
conjugate rotates by the opposite angle (sin negated: the backward). The output is a new contiguous tensor of
x's shape and dtype; features rotary_dim.. are copied.

Validation reads no tensor data, except the value checks (check_values), which read CPU tensors only: offsets
>= 0, the table long enough for every position, cu_seqlens a non-decreasing run from 0 to total whose longest
sequence is at most max_seqlen. On a GPU, reading them would wait for the stream (a decode step must not); the
kernels clamp each position into the table there instead, so a bad value gives wrong numbers, never a wild read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmkern.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor

OFFSET_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True, eq=False)
class RotaryProblem:
    """One call of mmkern::rotary_embedding."""
    x: Tensor                       # (B, L, H, D), or (total, H, D) when varlen
    cos: Tensor                     # (seqlen_ro, rotary_dim / 2)
    sin: Tensor                     # like cos
    seqlen_offsets: Tensor | None   # (B,) int32/int64: per-sequence position of token 0 (None: seqlen_offset)
    cu_seqlens: Tensor | None       # (B + 1,) int32, varlen only
    seqlen_offset: int              # the position of token 0 of every sequence, when seqlen_offsets is None
    max_seqlen: int                 # varlen: >= the longest sequence (sizes the kernels' grid)
    interleaved: bool               # True: GPT-J pairs (2i, 2i + 1); False: GPT-NeoX halves (i, i + rotary_dim / 2)
    conjugate: bool                 # rotate by -angle (the backward of the rotation)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def rotary_dim(self) -> int:
        return 2 * self.cos.shape[1]

    @property
    def batch(self) -> int:
        return self.cu_seqlens.shape[0] - 1 if self.varlen else self.x.shape[0]

    @property
    def seqlen(self) -> int:
        """The longest sequence: L, or max_seqlen when varlen."""
        return self.max_seqlen if self.varlen else self.x.shape[1]


def _check_shapes(fn: str, x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen) -> None:
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES, ndim=3 if cu_seqlens is not None else 4)
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(fn, name, table, dtypes=FLOAT_DTYPES, ndim=2)
        if table.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{fn}: {name} must have x's dtype ({x.dtype}) or float32; got {table.dtype}")
    if sin.shape != cos.shape or sin.dtype != cos.dtype:
        raise ValueError(f"{fn}: sin must have the shape and dtype of cos ({tuple(cos.shape)}, {cos.dtype}); got "
                         f"{tuple(sin.shape)}, {sin.dtype}")
    head_dim, rotary_dim = x.shape[-1], 2 * cos.shape[1]
    if not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"{fn}: rotary_dim = 2 * cos.shape[1] must be in 2..head_dim = {head_dim}; got cos of shape "
                         f"{tuple(cos.shape)} (rotary_dim {rotary_dim})")
    if cu_seqlens is not None:
        check_tensor(fn, "cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
        if cu_seqlens.shape[0] < 1:
            raise ValueError(f"{fn}: cu_seqlens must hold batch + 1 >= 1 offsets starting at 0; got shape "
                             f"{tuple(cu_seqlens.shape)}")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"{fn}: max_seqlen must be an int >= the longest sequence of cu_seqlens; got "
                             f"{max_seqlen!r}")
    batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else x.shape[0]
    if seqlen_offsets is not None:
        check_tensor(fn, "seqlen_offsets", seqlen_offsets, dtypes=OFFSET_DTYPES, ndim=1)
        if seqlen_offsets.shape[0] != batch:
            raise ValueError(f"{fn}: seqlen_offsets must be (batch,) = ({batch},); got {tuple(seqlen_offsets.shape)}")
    elif isinstance(seqlen_offset, bool) or not isinstance(seqlen_offset, int) or seqlen_offset < 0:
        raise ValueError(f"{fn}: seqlen_offsets must be an int >= 0 or a (batch,) int32/int64 tensor; got "
                         f"{seqlen_offset!r}")
    rows = x.shape[0] if cu_seqlens is not None else x.shape[1]
    if x.numel() and cos.shape[0] == 0:
        raise ValueError(f"{fn}: cos and sin hold no positions (shape {tuple(cos.shape)}) for x of shape "
                         f"{tuple(x.shape)}")
    if cu_seqlens is None and seqlen_offsets is None and x.numel() and seqlen_offset + rows > cos.shape[0]:
        raise ValueError(f"{fn}: cos and sin hold {cos.shape[0]} positions; seqlen_offsets {seqlen_offset} + seqlen "
                         f"{rows} needs {seqlen_offset + rows}")
    check_same_device(fn, x=x, cos=cos, sin=sin, seqlen_offsets=seqlen_offsets, cu_seqlens=cu_seqlens)


def _check_values(fn: str, x, cos, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen) -> None:
    """The checks that read data: CPU tensors only (see the module docstring)."""
    if x.device.type != "cpu" or x.numel() == 0:
        return
    seqlen_ro = cos.shape[0]
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != x.shape[0] or min(lengths, default=0) < 0:
            raise ValueError(f"{fn}: cu_seqlens must rise from 0 to total = x.shape[0] = {x.shape[0]} without "
                             f"decreasing; got {bounds}")
        if max(lengths, default=0) > max_seqlen:
            raise ValueError(f"{fn}: max_seqlen ({max_seqlen}) is shorter than the longest sequence of cu_seqlens "
                             f"({max(lengths)})")
    else:
        lengths = [x.shape[1]] * x.shape[0]
    offsets = seqlen_offsets.tolist() if seqlen_offsets is not None else [seqlen_offset] * len(lengths)
    if min(offsets, default=0) < 0:
        raise ValueError(f"{fn}: seqlen_offsets must be >= 0; got {offsets}")
    needed = max((o + n for o, n in zip(offsets, lengths) if n > 0), default=0)
    if needed > seqlen_ro:
        raise ValueError(f"{fn}: cos and sin hold {seqlen_ro} positions; seqlen_offsets + seqlen needs {needed}")


def build_rotary(x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved, conjugate, *,
                 validate: bool = True, check_values: bool = True) -> RotaryProblem:
    """The validated record of one rotary_embedding call. check_values=False (the fake implementation) skips the
    checks that read data; validate=False the shape/dtype checks (a signature already validated:
    dispatch.call_memoized)."""
    fn = "mmkern.apply_rotary_emb"
    if validate:
        _check_shapes(fn, x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen)
    if check_values:
        _check_values(fn, x, cos, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen)
    return RotaryProblem(x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, bool(interleaved),
                         bool(conjugate))
