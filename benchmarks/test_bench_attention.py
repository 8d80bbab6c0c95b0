"""Attention forward (+ backward): mmkern (auto backend) against torch's scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import DEVICE, ON_GPU

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SEQLENS = [1024, 4096] if ON_GPU else [64, 256]
B, H, D = (4, 16, 128) if ON_GPU else (1, 4, 64)


def _inputs(L, requires_grad):
    return [torch.randn(B, H, L, D, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad) for _ in range(3)]


def _flops(L, backward):
    forward = 4 * B * H * L * L * D / 2          # causal: half the score matrix
    return forward * (3.5 if backward else 1.0)


IMPLEMENTATIONS = {
    "mmkern": lambda q, k, v: mmkern.scaled_dot_product_attention(q, k, v, is_causal=True),
    "torch_sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


@pytest.mark.parametrize("L", SEQLENS)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_causal_attention(bench, benchmark, impl, L, pass_):
    benchmark.group = f"attention {pass_} L={L}"
    fn = IMPLEMENTATIONS[impl]
    backward = pass_ == "fwd+bwd"
    q, k, v = _inputs(L, backward)

    def step(q, k, v):
        out = fn(q, k, v)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    bench(step, q, k, v, flops=_flops(L, backward), shape=f"B{B} H{H} L{L} D{D} {DTYPE}")
