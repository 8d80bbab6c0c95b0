"""Attention implementations a user could call, side by side, each with the reason it cannot run here.

Every implementation is `fn(q, k, v, causal) -> out` in its own layout:
    "blhd"  (batch, seqlen, heads, head_dim): mmkern.flash_attn_func (mmkern_auto: auto dispatch;
            mmkern_<backend>: forced onto that backend), flash-attn, xformers
    (mmkern_cuda: mmkern.flash_attn_func forced onto the cuda backend, the CUDA C++ flash attention of
    mmkern._C: fp16/bf16, head dims 64/96/128; a case it cannot take is skipped with the backend's reasons)
    "bhld"  (batch, heads, seqlen, head_dim): torch SDPA and the eager code
The caller makes inputs directly in that layout (no transpose inside the timed region).
Decode implementations are `fn(q, k_cache, v_cache, cache_seqlens) -> out` (Lq query tokens against
a filled cache; grouped-query heads allowed), layouts as above.

`Unavailable(reason)` is raised when an implementation cannot run at all (package missing, backend not
usable); one that can run in general but not a given case (SDPA's flash kernel and fp32, say) raises
from its first call, which the benchmarks turn into a skip with torch's message.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import mmkern


class Unavailable(Exception):
    """This implementation cannot run in this environment; the message says why."""


@dataclass
class Impl:
    name: str
    layout: str                  # "blhd" or "bhld"
    fn: Callable


SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
# mmkern_<backend>: forced onto that backend; mmkern_auto: what auto dispatch picks (the never-slower rule:
# at least as fast as the torch call it replaces, sdpa_* here)
IMPLS = ("mmkern_auto", "mmkern_cuda", "mmkern_triton", "mmkern_torch", *SDPA_BACKENDS, "torch_eager", "torch_compile",
         "flash_attn", "xformers")
DECODE_IMPLS = ("mmkern_auto", "mmkern_cuda", "mmkern_triton", "mmkern_torch", *SDPA_BACKENDS, "torch_eager",
                "flash_attn")


def _has_enable_gqa() -> bool:
    try:
        F.scaled_dot_product_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8),
                                       enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


HAS_ENABLE_GQA = _has_enable_gqa()  # torch's SDPA takes enable_gqa (torch >= 2.5)


def sdpa_gqa(q, k, v, **kwargs):
    """torch SDPA of q (B, Hq, Lq, D) on k, v (B, Hkv, Lk, D), Hkv dividing Hq: enable_gqa, or k/v heads repeated
    where torch lacks it (the repeat is then part of the timed call)."""
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if HAS_ENABLE_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kwargs)


def _forced(backend: str):
    """mmkern.backend(backend), or nothing for "auto"; Unavailable when the backend is not usable here."""
    if backend == "auto":
        return contextlib.nullcontext()
    reason = _mmkern_backend_reason(backend)
    if reason:
        raise Unavailable(reason)
    return mmkern.backend(backend)


def eager_attention(q, k, v, causal: bool):
    """What a user writes by hand, (B, H, L, D): softmax(q k^T / sqrt(D)) v, the scores materialised."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)    # bottom-right
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _mmkern_backend_reason(backend: str) -> str | None:
    if backend not in mmkern.available_backends():
        b = mmkern.dispatch.backends().get(backend)
        reasons = b.environment_reasons() if b else [f"no backend named {backend}"]
        return f"mmkern's {backend} backend is not usable here: " + ("; ".join(reasons) or "it has no kernels yet")
    if "attention_forward" not in mmkern.dispatch.backends()[backend].kernels:
        return f"mmkern's {backend} backend has no attention kernels yet"
    return None


def _sdpa_context(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, backend_name)])


def make_impl(name: str) -> Impl:
    """The implementation `name` (one of IMPLS), or Unavailable with the reason."""
    if name.startswith("mmkern_"):
        forced = _forced(name[len("mmkern_"):])

        def run(q, k, v, causal):
            with forced:
                return mmkern.flash_attn_func(q, k, v, causal=causal)
        return Impl(name, "blhd", run)
    if name in SDPA_BACKENDS:
        backend_name = SDPA_BACKENDS[name]

        def run(q, k, v, causal):
            with _sdpa_context(backend_name):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return Impl(name, "bhld", run)
    if name == "torch_eager":
        return Impl(name, "bhld", eager_attention)
    if name == "torch_compile":
        return Impl(name, "bhld", torch.compile(eager_attention, dynamic=False))
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise Unavailable("flash-attn is not installed")
        from flash_attn import flash_attn_func
        return Impl(name, "blhd", lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal))
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise Unavailable("xformers is not installed")
        import xformers.ops as xops

        def run(q, k, v, causal):
            bias = xops.LowerTriangularMask() if causal else None
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        return Impl(name, "blhd", run)
    raise ValueError(f"make_impl: unknown implementation {name!r}; known: {', '.join(IMPLS)}")


def make_decode_impl(name: str) -> Impl:
    """Decode against a KV cache: fn(q, k_cache, v_cache, cache_seqlens) -> out (one of DECODE_IMPLS)."""
    if name.startswith("mmkern_"):
        forced = _forced(name[len("mmkern_"):])

        def run(q, k_cache, v_cache, cache_seqlens):
            with forced:
                return mmkern.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True)
        return Impl(name, "blhd", run)
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise Unavailable("flash-attn is not installed")
        from flash_attn import flash_attn_with_kvcache
        return Impl(name, "blhd", lambda q, kc, vc, lens: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                                                  causal=True))
    # torch: the whole cache is valid (the benchmark fills it), heads grouped with enable_gqa
    if name in SDPA_BACKENDS:
        backend_name = SDPA_BACKENDS[name]

        def run(q, k_cache, v_cache, cache_seqlens):
            with _sdpa_context(backend_name):
                return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
        return Impl(name, "bhld", run)
    if name == "torch_eager":
        def run(q, k_cache, v_cache, cache_seqlens):
            group = q.shape[1] // k_cache.shape[1]
            return eager_attention(q, k_cache.repeat_interleave(group, 1), v_cache.repeat_interleave(group, 1), False)
        return Impl(name, "bhld", run)
    raise ValueError(f"make_decode_impl: unknown implementation {name!r}; known: {', '.join(DECODE_IMPLS)}")


def random_qkv(impl: Impl, batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
               dtype: torch.dtype, device, requires_grad: bool = False, kv_heads: int | None = None):
    """Fresh random q, k, v in the implementation's layout."""
    kv_heads = heads if kv_heads is None else kv_heads

    def make(h, length):
        shape = (batch, length, h, head_dim) if impl.layout == "blhd" else (batch, h, length, head_dim)
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=requires_grad)
    return make(heads, seqlen_q), make(kv_heads, seqlen_k), make(kv_heads, seqlen_k)


