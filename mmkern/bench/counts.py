"""How much work each benchmarked op does: FLOPs and the fewest bytes it must move through device
memory (every input read once, every output written once), and the rates a time gives.

Attention (issue 3's convention, the one FlashAttention's papers use):
    forward   4 * B * H * Lq * Lk * D        (two matrix products, Q K^T and P V, 2 FLOPs per MAC)
    backward  2.5 x the forward              (five products: dV, dP, dQ, dK and the recomputed S)
    causal    half of either (half the score matrix is masked out; exact for Lq = Lk up to O(1/L))
Decode (Lq of a few tokens against a long KV cache) is memory-bound: its bytes are the cache read.
"""
from __future__ import annotations

from mmkern.bench.ceilings import Ceilings

PASSES = ("fwd", "bwd", "fwd+bwd")


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool = False,
                    pass_: str = "fwd") -> float:
    if pass_ not in PASSES:
        raise ValueError(f"attention_flops: pass_ must be one of {PASSES}, got {pass_!r}")
    forward = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        forward /= 2
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_] * forward


def attention_bytes(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, itemsize: int,
                    kv_heads: int | None = None, pass_: str = "fwd") -> float:
    """Forward: read q, k, v, write out. Backward: read q, k, v, out, dout, write dq, dk, dv.
    (The fp32 log-sum-exp, B*H*Lq*4 bytes, is left out.)"""
    kv_heads = heads if kv_heads is None else kv_heads
    q = batch * heads * seqlen_q * head_dim * itemsize
    kv = batch * kv_heads * seqlen_k * head_dim * itemsize
    fwd = 2 * q + 2 * kv
    bwd = 3 * q + 2 * kv + q + 2 * kv
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def attention_decode_bytes(batch: int, heads: int, kv_heads: int, seqlen_q: int, cache_len: int, head_dim: int,
                           itemsize: int) -> float:
    """Decode: the K and V caches read once dominate; q read and out written are added."""
    return (2 * batch * kv_heads * cache_len * head_dim + 2 * batch * heads * seqlen_q * head_dim) * itemsize


def _sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures (CPU rates are tiny, GPU ones large: fixed decimals fit neither)."""
    return float(f"{x:.{digits}g}")


def rates(seconds: float, flops: float | None = None, bytes_moved: float | None = None,
          ceilings: Ceilings | None = None) -> dict:
    """extra_info entries for one result timed at `seconds` (the median round):
    TFLOP/s, GB/s and, given the device's ceilings, their fractions of the matmul rate and the copy bandwidth."""
    info: dict = {}
    if seconds <= 0:
        return info
    if flops:
        info["flops"] = float(flops)
        info["TFLOP/s"] = _sig(flops / seconds / 1e12)
        if ceilings is not None:
            info["fraction_of_matmul"] = _sig(flops / seconds / 1e12 / ceilings.matmul_tflops)
    if bytes_moved:
        info["bytes"] = float(bytes_moved)
        info["GB/s"] = _sig(bytes_moved / seconds / 1e9)
        if ceilings is not None:
            info["fraction_of_copy"] = _sig(bytes_moved / seconds / 1e9 / ceilings.copy_gbps)
    if ceilings is not None:
        info["ceiling_copy_GB/s"] = _sig(ceilings.copy_gbps)
        info["ceiling_matmul_TFLOP/s"] = _sig(ceilings.matmul_tflops)
    return info
