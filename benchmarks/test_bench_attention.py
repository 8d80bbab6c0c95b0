"""Attention, issue 3's benchmark: forward, backward and forward+backward TFLOP/s, and decode latency.

Side by side in one run, same inputs per case (mmkern.bench.attention.IMPLS):
    mmkern_auto                  mmkern.flash_attn_func under auto dispatch (the never-slower rule: at least the
                                 speed of the sdpa_* row a user would call instead)
    mmkern_cuda, mmkern_triton, mmkern_torch
                                 mmkern.flash_attn_func forced onto each of mmkern's backends (mmkern_cuda: the
                                 CUDA C++ kernels of mmkern._C, csrc/attention/; skipped without a GPU or a build;
                                 mmkern_torch: torch's CPU flash attention behind mmkern's op, CPU only)
    sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math
                                 torch's scaled_dot_product_attention under torch.nn.attention.sdpa_kernel
                                 with one backend each (a row is skipped with torch's reason when that
                                 backend cannot run the case: fp32 on flash, cuDNN on a CPU, ...)
    torch_eager, torch_compile   softmax(q k^T / sqrt(D)) v written out, and that under torch.compile
    flash_attn, xformers         when installed (skipped with the reason otherwise)

FLOPs (mmkern.bench.counts.attention_flops): 4*B*H*L*L*D forward, 2.5x that backward, halved when
causal. On a GPU: bf16 and fp16, head dims 64 and 128 with B*L = 16k tokens and H*D = 2048, L from 512
to 16k, causal and not. Decode: B=4 sequences of one new token, 32 query heads on 8 KV heads, D=128,
against a filled cache of 4k to 64k tokens (memory-bound: GB/s of the cache read).
MMKERN_BENCH_SIZES=quick keeps bf16, D=128, L in {1k, 4k, 16k}, 4k and 64k caches (gpu_check.sh).
On a CPU: fp32, D=64, L in {64, 128}, two heads (a smoke test; mmkern_triton only under TRITON_INTERPRET=1).
CPU sizes worth timing (not the smoke test): benchmarks/test_bench_cpu_attention.py.

The issue's goal on an H200 (bf16, D=128, L >= 4k): mmkern_triton >= the best SDPA backend (cuDNN) in
forward and in backward.
"""
import warnings

import pytest
import torch

from conftest import DEVICE, ON_GPU, QUICK
from mmkern.bench import attention as A
from mmkern.bench.counts import attention_bytes, attention_decode_bytes, attention_flops

if ON_GPU:
    DTYPES = [torch.bfloat16] if QUICK else [torch.bfloat16, torch.float16]
    HEAD_DIMS = [128] if QUICK else [64, 128]
    SEQLENS = [1024, 4096, 16384] if QUICK else [512, 1024, 2048, 4096, 8192, 16384]
    TOKENS, HIDDEN = 16384, 2048
    CACHE_LENS = [4096, 65536] if QUICK else [4096, 16384, 65536]
    DECODE = dict(batch=4, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
else:
    DTYPES, HEAD_DIMS, SEQLENS = [torch.float32], [64], [64, 128]
    TOKENS, HIDDEN = 128, 128
    CACHE_LENS = [256]
    DECODE = dict(batch=1, heads=4, kv_heads=2, head_dim=64, dtype=torch.float32)
PASSES = ["fwd", "bwd", "fwd+bwd"]
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _impl(make, name):
    try:
        return make(name)
    except A.Unavailable as exc:
        pytest.skip(str(exc))


def _probe(name, fn, *args):
    """One call outside the measurement: the implementation cannot run this case -> skip with its reason."""
    with warnings.catch_warnings(record=True) as caught:      # torch warns the reasons, then raises
        warnings.simplefilter("always")
        try:
            return fn(*args)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            reasons = [str(w.message).strip().splitlines()[0] for w in caught] or [str(exc).strip().splitlines()[0]]
            pytest.skip(f"{name} cannot run this case on {DEVICE}: " + " | ".join(reasons)[:400])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", SEQLENS, ids=[f"L{l}" for l in SEQLENS])
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=[f"d{d}" for d in HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=[_DT[d] for d in DTYPES])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", A.IMPLS)
def test_attention(bench, benchmark, impl, pass_, dtype, head_dim, seqlen, causal):
    batch, heads = max(1, TOKENS // seqlen), max(1, HIDDEN // head_dim)
    series = f"attention {pass_} {_DT[dtype]} d{head_dim} {'causal' if causal else 'full'}"
    benchmark.group = f"{series} L{seqlen}"
    implementation = _impl(A.make_impl, impl)
    fn = implementation.fn
    training = pass_ != "fwd"
    make_inputs = lambda: A.random_qkv(implementation, batch, heads, seqlen, seqlen, head_dim, dtype,  # noqa: E731
                                       DEVICE, requires_grad=training)
    q, k, v = make_inputs()
    out = _probe(impl, fn, q, k, v, causal)
    dout = torch.randn_like(out)
    info = dict(op="attention", impl=impl, series=series, x=seqlen, x_label="sequence length",
                shape=f"B{batch} H{heads} L{seqlen} D{head_dim}", dtype=_DT[dtype], causal=causal, pass_=pass_,
                flops=attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, pass_),
                bytes=attention_bytes(batch, heads, seqlen, seqlen, head_dim, q.element_size(), pass_=pass_))
    if pass_ == "fwd":
        def forward(q, k, v):
            with torch.no_grad():
                return fn(q, k, v, causal)
        bench(forward, q, k, v, **info)
    elif pass_ == "fwd+bwd":
        def forward_backward(q, k, v):
            return torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
        bench(forward_backward, q, k, v, **info)
    else:       # the backward alone: each round's forward runs in the setup, outside the timed interval
        def fresh_forward():
            q, k, v = make_inputs()
            return (fn(q, k, v, causal), q, k, v)

        def backward(out, q, k, v):
            return torch.autograd.grad(out, (q, k, v), dout)
        bench(backward, setup=fresh_forward, **info)


@pytest.mark.parametrize("cache_len", CACHE_LENS, ids=[f"cache{c}" for c in CACHE_LENS])
@pytest.mark.parametrize("impl", A.DECODE_IMPLS)
def test_attention_decode(bench, benchmark, impl, cache_len):
    """One new token per sequence attends to a full KV cache (latency: the median round)."""
    b, h, hk, d, dtype = (DECODE[key] for key in ("batch", "heads", "kv_heads", "head_dim", "dtype"))
    series = f"attention decode {_DT[dtype]} d{d} B{b} H{h}/{hk}"
    benchmark.group = f"{series} cache{cache_len}"
    implementation = _impl(A.make_decode_impl, impl)
    q, k_cache, v_cache = A.random_qkv(implementation, b, h, 1, cache_len, d, dtype, DEVICE, kv_heads=hk)
    cache_seqlens = torch.full((b,), cache_len, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        _probe(impl, implementation.fn, q, k_cache, v_cache, cache_seqlens)

        def decode(q):
            with torch.no_grad():
                return implementation.fn(q, k_cache, v_cache, cache_seqlens)
    bench(decode, q, op="attention_decode", impl=impl, metric="GB/s", series=series, x=cache_len, x_label="KV cache length",
          shape=f"B{b} Hq{h} Hkv{hk} Lq1 Lk{cache_len} D{d}", dtype=_DT[dtype],
          flops=attention_flops(b, h, 1, cache_len, d), bytes=attention_decode_bytes(b, h, hk, 1, cache_len, d,
                                                                                      q.element_size()),
          flush_l2=True)
