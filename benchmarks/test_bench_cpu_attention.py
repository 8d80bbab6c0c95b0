"""Attention on a CPU, as a new user runs it without a GPU and without `mmkern build`: the issue's shape,
B1 H12 D64 causal, forward, L 512 and 2048, fp32 and bf16, side by side in one run:

    mmkern_auto       mmkern.flash_attn_func under auto dispatch (the `torch` backend here)
    mmkern_torch      forced onto the torch backend (torch's CPU flash attention behind mmkern's op)
    mmkern_reference  forced onto the float64 oracle (what auto used to pick here: 330 ms at L512,
                      3.3 s at L2048 on the 2-core CI machine); L512 only, it is quadratic
    sdpa              torch.nn.functional.scaled_dot_product_attention (the call mmkern replaces)

The rule these rows show: mmkern_auto is at least as fast as sdpa (a few us of op overhead apart).
Timed on the host clock even on a GPU machine (device="cpu").
"""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import QUICK

SEQLENS = [512] if QUICK else [512, 2048]      # quick: the selection gpu_check.sh runs
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["mmkern_auto", "mmkern_torch", "mmkern_reference", "sdpa"]
B, H, D = 1, 12, 64


def _mmkern(backend):
    def run(q, k, v):
        if backend == "auto":
            return mmkern.flash_attn_func(q, k, v, causal=True)
        with mmkern.backend(backend):
            return mmkern.flash_attn_func(q, k, v, causal=True)
    return run


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seqlen", SEQLENS, ids=[f"L{l}" for l in SEQLENS])
@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_attention(bench, benchmark, impl, seqlen, dtype):
    if impl == "mmkern_reference" and seqlen > 512:
        pytest.skip("the float64 oracle is quadratic: L512 only")
    benchmark.group = f"cpu attention fwd {str(dtype).replace('torch.', '')} causal L{seqlen}"
    shape = (B, seqlen, H, D) if impl.startswith("mmkern") else (B, H, seqlen, D)
    q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
    fn = _sdpa if impl == "sdpa" else _mmkern(impl[len("mmkern_"):])
    with torch.no_grad():
        bench(fn, q, k, v, device="cpu", op="attention", impl=impl, series=f"cpu attention {dtype}", x=seqlen,
              x_label="sequence length", shape=f"B{B} H{H} L{seqlen} D{D}", dtype=str(dtype))
