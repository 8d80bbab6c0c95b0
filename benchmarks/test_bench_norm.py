"""Residual + LayerNorm, forward and forward+backward: mmkern's Triton kernels against what a user
would otherwise call, side by side in one run (same inputs, same group per size and mode):

    device_copy    x.clone(): the copy bandwidth of this device, the roof for a memory-bound op
    mmkern_cuda, mmkern_triton, mmkern_torch
                   mmkern.layer_norm_residual forced onto each of mmkern's backends (prenorm=True; mmkern_torch,
                   torch's own kernels behind mmkern's op, forward only: it takes no dropout)
    torch_eager    F.dropout, add, F.layer_norm (three kernels)
    torch_compile  the same under torch.compile (inductor)
    liger / apex / flash_attn   their fused layer norms, when installed (skipped otherwise)

forward: inference, no dropout. forward_backward: training, dropout_p = 0.1, gradients of x,
residual, weight and bias through torch.autograd.grad (nothing accumulates between rounds).
extra_info["GB/s"] counts the minimum bytes: every input read once and every output written once
    forward           x, residual -> out, pre                          4 * rows * N * itemsize
    forward_backward  + dout, pre -> dx, d_residual                     8 * rows * N * itemsize
(weight/bias/dweight/dbias are N-sized and left out). The issue's goal on an H200 (bf16): at least
85% of device_copy's GB/s, 1.5x torch_eager, 1.0x torch_compile and the installed libraries.
On a CPU-only machine the sizes are tiny (a smoke test); mmkern_triton then runs only when the
Triton backend is usable (TRITON_INTERPRET=1 set before import), else it is skipped with the reason.
MMKERN_BENCH_SIZES=quick (gpu_check.sh) keeps 4k x 768, 16k x 4096 and 64k x 8192.
Rates, the L2 flush between rounds and device-time clocks come from the `bench` fixture (conftest.py).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import DEVICE, ON_GPU, QUICK, skip_unless_backend

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# rows x hidden, from 4k x 768 to 64k x 8192 (GPT-2 small .. large-model hidden sizes)
SIZES = [(4096, 768), (16384, 1024), (16384, 4096), (65536, 8192)] if ON_GPU else [(64, 256), (64, 1024)]
if ON_GPU and QUICK:
    SIZES = [(4096, 768), (16384, 4096), (65536, 8192)]
IMPLS = ["device_copy", "mmkern_cuda", "mmkern_triton", "mmkern_torch", "torch_eager", "torch_compile", "liger", "apex", "flash_attn"]
MODES = ["forward", "forward_backward"]
TRAINING_DROPOUT = 0.1


def _eager(x, residual, weight, bias, dropout_p):
    pre = F.dropout(x, dropout_p, training=dropout_p > 0) + residual
    return F.layer_norm(pre, (x.shape[-1],), weight, bias), pre


def _library_impl(impl):
    """(out, pre) = fn(x, residual, weight, bias, dropout_p) from an installed library, or skip."""
    if not ON_GPU:      # all three are Triton / CUDA kernels (Liger's Triton finds no driver on a CPU)
        pytest.skip(f"{impl}: its kernels need a CUDA GPU")
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger-kernel is not installed")
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        def fn(x, residual, weight, bias, dropout_p):
            pre = F.dropout(x, dropout_p, training=dropout_p > 0) + residual
            return LigerLayerNormFunction.apply(pre, weight, bias, 1e-5), pre
        return fn
    if impl == "apex":
        if importlib.util.find_spec("apex") is None:
            pytest.skip("apex is not installed")
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        def fn(x, residual, weight, bias, dropout_p):
            pre = F.dropout(x, dropout_p, training=dropout_p > 0) + residual
            return fused_layer_norm_affine(pre, weight, bias, (x.shape[-1],), 1e-5), pre
        return fn
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    from flash_attn.ops.triton.layer_norm import layer_norm_fn

    def fn(x, residual, weight, bias, dropout_p):
        return layer_norm_fn(x, weight, bias, residual=residual, eps=1e-5, dropout_p=dropout_p, prenorm=True)
    return fn


def _mmkern(backend):
    def fn(x, residual, weight, bias, dropout_p):
        with mmkern.backend(backend):
            return mmkern.layer_norm_residual(x, residual, weight, bias, dropout_p=dropout_p, prenorm=True)
    return fn


def _norm_impl(impl):
    if impl.startswith("mmkern_"):
        backend = impl[len("mmkern_"):]
        skip_unless_backend(backend)
        if "norm_residual_forward" not in mmkern.dispatch.backends()[backend].kernels:
            pytest.skip(f"mmkern's {backend} backend has no norm kernels yet")
        return _mmkern(backend)
    if impl == "torch_eager":
        return _eager
    if impl == "torch_compile":
        torch._dynamo.reset()
        return torch.compile(_eager)
    return _library_impl(impl)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{r}x{n}" for r, n in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_residual(bench, benchmark, impl, size, mode):
    rows, N = size
    series = f"layer_norm_residual {mode} {str(DTYPE).replace('torch.', '')}"
    info = dict(op="layer_norm_residual", impl=impl, series=series, x=N, x_label="hidden size",
                shape=f"{rows}x{N} {DTYPE}", mode=mode)
    benchmark.group = f"layer_norm_residual {mode} {rows}x{N}"
    training = mode == "forward_backward"
    x, residual = (torch.randn(rows, N, device=DEVICE, dtype=DTYPE, requires_grad=training) for _ in range(2))
    weight, bias = (torch.randn(N, device=DEVICE, dtype=DTYPE, requires_grad=training) for _ in range(2))
    itemsize = x.element_size()
    if impl == "device_copy":
        bytes_moved = 2 * rows * N * itemsize
        bench(lambda x: x.detach().clone(), x, bytes=bytes_moved, **info)
        return
    if impl == "mmkern_torch" and training:
        pytest.skip("mmkern's torch backend takes no dropout (mmkern's mask is a function of the seed; torch draws "
                    "its own): torch_eager is that row")
    norm = _norm_impl(impl)
    if training:
        dout = torch.randn(rows, N, device=DEVICE, dtype=DTYPE)

        def fn(x, residual):
            out, _ = norm(x, residual, weight, bias, TRAINING_DROPOUT)
            return torch.autograd.grad(out, (x, residual, weight, bias), dout)
        bytes_moved = 8 * rows * N * itemsize
    else:
        def fn(x, residual):
            with torch.no_grad():
                return norm(x, residual, weight, bias, 0.0)
        bytes_moved = 4 * rows * N * itemsize
    bench(fn, x, residual, bytes=bytes_moved, **info)
