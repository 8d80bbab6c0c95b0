"""Residual + LayerNorm on the CPU: mmkern's C++ kernels (the `cpu` backend of mmkern._C) against torch
eager, at the issue's size 8192 x 1024 float32 (and 2048 x 4096), side by side in one group per size and mode:

    mmkern_cpu     mmkern.layer_norm_residual forced onto the cpu backend (prenorm=True: out and pre)
    torch_eager    F.dropout, add, F.layer_norm (three passes over memory, and pre kept)

forward:          inference, no dropout (torch.no_grad)
forward_dropout:  training forward, dropout_p = 0.1 (mmkern: Philox per element; torch: its bernoulli mask)
forward_backward: dropout_p = 0.1, gradients of x, residual, weight and bias
The issue's goal: mmkern_cpu at least 1.3x torch_eager for the forward at 8192 x 1024 float32 (compare the
two rows of a group; no timed assertion here). extra_info["GB/s"] counts the minimum bytes (inputs read
once, outputs written once: 4 * rows * N * 4 forward, 8 * rows * N * 4 forward+backward).
Needs the extension (`mmkern build`); without it the mmkern rows skip with the reason.
At these sizes page faults on the fresh 32 MiB outputs cost as much as the arithmetic: the C++ kernels advise
their large outputs MADV_HUGEPAGE (csrc/common/cpu_output.h) and torch eager's do not, unless the process runs
with THP_MEM_ALLOC_ENABLE=1 (torch's switch for all its CPU allocations: run with it to compare the kernels alone).
"""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import skip_unless_backend

SIZES = [(8192, 1024), (2048, 4096)]
MODES = ["forward", "forward_dropout", "forward_backward"]
IMPLS = ["mmkern_cpu", "torch_eager"]
DROPOUT = 0.1


def _eager(x, residual, weight, bias, dropout_p):
    pre = F.dropout(x, dropout_p, training=dropout_p > 0) + residual
    return F.layer_norm(pre, (x.shape[-1],), weight, bias), pre


def _mmkern_cpu(x, residual, weight, bias, dropout_p):
    with mmkern.backend("cpu"):
        return mmkern.layer_norm_residual(x, residual, weight, bias, dropout_p=dropout_p, prenorm=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{r}x{n}" for r, n in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_residual_cpu(bench, benchmark, impl, size, mode):
    rows, N = size
    if impl == "mmkern_cpu":
        skip_unless_backend("cpu")
    norm = _mmkern_cpu if impl == "mmkern_cpu" else _eager
    benchmark.group = f"layer_norm_residual cpu {mode} {rows}x{N} float32"
    info = dict(op="layer_norm_residual", impl=impl, series=f"layer_norm_residual cpu {mode} float32", x=N,
                x_label="hidden size", shape=f"{rows}x{N} float32", mode=mode)
    training = mode == "forward_backward"
    x, residual = (torch.randn(rows, N, requires_grad=training) for _ in range(2))
    weight, bias = (torch.randn(N, requires_grad=training) for _ in range(2))
    if training:
        dout = torch.randn(rows, N)

        def fn(x, residual):
            out, _ = norm(x, residual, weight, bias, DROPOUT)
            return torch.autograd.grad(out, (x, residual, weight, bias), dout)
        bytes_moved = 8 * rows * N * 4
    else:
        p = DROPOUT if mode == "forward_dropout" else 0.0

        def fn(x, residual):
            with torch.no_grad():
                return norm(x, residual, weight, bias, p)
        bytes_moved = 4 * rows * N * 4
    bench(fn, x, residual, bytes=bytes_moved, device="cpu", **info)   # CPU rows: host clock, CPU ceilings
