"""Residual + LayerNorm forward: mmkern (auto backend) against torch eager (add, then F.layer_norm)."""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import DEVICE, ON_GPU

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ROWS = 16384 if ON_GPU else 256
HIDDEN = [1024, 4096, 8192] if ON_GPU else [128, 1024]


@pytest.mark.parametrize("N", HIDDEN)
@pytest.mark.parametrize("impl", ["mmkern", "torch_eager"])
def test_layer_norm_residual(bench, benchmark, impl, N):
    benchmark.group = f"layer_norm_residual N={N}"
    x, residual = (torch.randn(ROWS, N, device=DEVICE, dtype=DTYPE) for _ in range(2))
    weight, bias = torch.randn(N, device=DEVICE, dtype=DTYPE), torch.randn(N, device=DEVICE, dtype=DTYPE)
    if impl == "mmkern":
        def fn(x, residual):
            return mmkern.layer_norm_residual(x, residual, weight, bias, prenorm=True)
    else:
        def fn(x, residual):
            pre = x + residual
            return F.layer_norm(pre, (N,), weight, bias), pre
    bytes_moved = 4 * ROWS * N * x.element_size()      # read x, residual; write out, pre
    bench(fn, x, residual, bytes=bytes_moved, shape=f"{ROWS}x{N} {DTYPE}")
