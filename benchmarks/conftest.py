"""Shared pieces of the pytest-benchmark suites.

Sizes are small on a CPU-only machine (the suites then serve as smoke tests and as a record of the
reference backend's cost) and larger on a GPU. On a GPU the target synchronises, so that
pytest-benchmark's host timer measures the kernels and not just their launch.
"""
import pytest
import torch

import mmkern  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def synchronized(fn):
    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        if ON_GPU:
            torch.cuda.synchronize()
        return result
    return run


@pytest.fixture
def bench(benchmark):
    """benchmark(fn, *args) with a synchronising target and a warm-up call outside the measurement."""
    def run(fn, *args, **extra_info):
        target = synchronized(fn)
        target(*args)
        benchmark.extra_info.update(extra_info, device=torch.cuda.get_device_name() if ON_GPU else "cpu")
        return benchmark(target, *args)
    return run
