"""Where the C++ CPU norm and diffusion kernels start to gain from OpenMP (issue 21: "no OpenMP fan-out for tensors
too small to pay for it"), one run, side by side per size:

    threads_1    the op on mmkern's cpu backend with torch.set_num_threads(1): never fans out
    threads_all  the same with every thread torch has (the default): at::parallel_for splits the work into
                 tasks of a fixed grain (diffusion_cpu.cpp kGrain = 32768 elements; norm_cpu.cpp 16384 / N
                 rows) and runs inline, on the calling thread, while there is only one task

ops: add_noise (samples (8, n)) and layer_norm_residual (rows of 1024, prenorm), float32 and bfloat16, at
8 KiB - 4 MiB per tensor. The crossover is the smallest size where threads_all is faster than threads_1; below the
grain both rows run the same single-threaded code, and the difference there is the noise of the run. A smoke
run (--benchmark-disable) calls the two smallest sizes once each.
"""
import pytest
import torch

import mmkern
from conftest import skip_unless_backend

D = mmkern.diffusion
SIZES_KIB = [8, 32, 64, 128, 256, 512, 1024, 4096]
HIDDEN = 1024


def _call(op, kib, dtype):
    numel = kib * 1024 // dtype.itemsize
    if op == "add_noise":
        a, b = torch.randn(8, numel // 8, dtype=dtype), torch.randn(8, numel // 8, dtype=dtype)
        t, alphas_cumprod = torch.randint(0, 1000, (8,)), torch.linspace(0.9999, 0.01, 1000)
        return lambda: D.add_noise(a, b, t, alphas_cumprod)
    x, residual = (torch.randn(max(1, numel // HIDDEN), HIDDEN, dtype=dtype) for _ in range(2))
    weight, bias = torch.randn(HIDDEN, dtype=dtype), torch.randn(HIDDEN, dtype=dtype)
    return lambda: mmkern.layer_norm_residual(x, residual, weight, bias, prenorm=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kib", SIZES_KIB, ids=lambda k: f"{k}KiB")
@pytest.mark.parametrize("op", ["add_noise", "layer_norm_residual"])
@pytest.mark.parametrize("impl", ["threads_1", "threads_all"])
def test_cpu_thread_crossover(bench, benchmark, impl, op, kib, dtype):
    if benchmark.disabled and kib > SIZES_KIB[1]:
        pytest.skip("the smoke run (--benchmark-disable) calls the smallest sizes; the others are timed runs")
    skip_unless_backend("cpu")
    name = str(dtype).replace("torch.", "")
    threads = torch.get_num_threads()
    use = 1 if impl == "threads_1" else threads
    benchmark.group = f"cpu threads {op} {kib}KiB {name}"
    mine = _call(op, kib, dtype)

    def fn():
        with mmkern.backend("cpu"):
            return mine()
    torch.set_num_threads(use)
    try:
        with torch.no_grad():
            bench(fn, device="cpu", op=op, impl=impl, series=f"cpu threads {op} {name}", x=kib,
                  x_label="KiB per tensor", shape=f"{kib}KiB", dtype=name, threads=use)
    finally:
        torch.set_num_threads(threads)
