"""An independent numpy model of Triton's tl.rand (Philox-4x32-10) and of the dropout masks built on it.

The kernels draw dropout from `tl.rand(seed, offset) >= p`; their own test paths (`dropout_mask`,
`dropout_keep_mask`) run the very helpers the kernels run, so comparing a kernel with its own mask proves
nothing about the mask. This module computes the same numbers from the published algorithm alone, in numpy,
importing no mmkern code: Philox-4x32-10 on the counter (offset_lo, offset_hi, 0, 0) under the key
(seed_lo, seed_hi), the first output word taken as int32, folded to [0, 2^31) and scaled by
4.6566127342e-10 in float32 (triton/language/random.py: randint4x, philox, uint_to_uniform_float).
"""
from __future__ import annotations

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)


def philox_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """float32 uniforms in [0, 1), as Triton's tl.rand(seed, index) for a 64-bit integer `index`."""
    index = np.asarray(index).astype(np.uint64)
    c0, c1 = index & _MASK32, index >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.full_like(c0, seed & 0xFFFFFFFF)
    k1 = np.full_like(c0, (seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p2 = _ROUND_A * c0, _ROUND_B * c2          # 32 x 32 -> 64 bits, exact in uint64
        c0, c1, c2, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ k0) & _MASK32, p2 & _MASK32, \
            ((p0 >> np.uint64(32)) ^ c3 ^ k1) & _MASK32, p0 & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def philox_keep(seed: int, index: np.ndarray, p: float) -> np.ndarray:
    """Independent Philox-4x32-10 in numpy, as Triton's tl.rand(seed, index) >= p (p compared in float32)."""
    return philox_uniform(seed, index) >= np.float32(p)


def attention_counters(batch: int, heads: int, max_seqlen_q: int, max_seqlen_k: int) -> np.ndarray:
    """(B, H, Lq, Lk) uint64 counters of the attention dropout draws:
    ((b * H + h) * max_seqlen_q + i) * max_seqlen_k + j, i and j positions within sequence b."""
    b = np.arange(batch, dtype=np.uint64)[:, None, None, None]
    h = np.arange(heads, dtype=np.uint64)[None, :, None, None]
    i = np.arange(max_seqlen_q, dtype=np.uint64)[None, None, :, None]
    j = np.arange(max_seqlen_k, dtype=np.uint64)[None, None, None, :]
    return ((b * np.uint64(heads) + h) * np.uint64(max_seqlen_q) + i) * np.uint64(max_seqlen_k) + j


def attention_keep_mask(seed: int, batch: int, heads: int, max_seqlen_q: int, max_seqlen_k: int, p: float,
                        seqlens_q=None, seqlens_k=None) -> np.ndarray:
    """The attention dropout keep mask, (B, H, max_seqlen_q, max_seqlen_k) bool, True where p is kept.

    Dense batches: every entry is a draw. Varlen (seqlens_q, seqlens_k: the B sequence lengths, e.g.
    cu_seqlens.diff()): sequence b's (i, j) draw sits at [b, h, i, j]; entries past its lengths belong to no
    query-key pair and are False here (a kernel never uses them)."""
    keep = philox_keep(seed, attention_counters(batch, heads, max_seqlen_q, max_seqlen_k), p)
    if seqlens_q is not None or seqlens_k is not None:
        lens_q = np.asarray(seqlens_q if seqlens_q is not None else [max_seqlen_q] * batch).reshape(batch)
        lens_k = np.asarray(seqlens_k if seqlens_k is not None else [max_seqlen_k] * batch).reshape(batch)
        inside = (np.arange(max_seqlen_q)[None, :, None] < lens_q[:, None, None]) \
            & (np.arange(max_seqlen_k)[None, None, :] < lens_k[:, None, None])
        keep &= inside[:, None]
    return keep
