"""Guards written for scripts/mutants.py: each test kills a planted mistake that the rest of the suite let through.

One short test per guard; its docstring names the mistake. Small shapes (the Triton kernels run through the
interpreter on a CPU). The cpu-backend guards build mmkern._C if it is missing or stale, as tests/test_native_*.py do.
"""
import pytest
import torch

import mmkern
from conftest import forced


@pytest.fixture(scope="module")
def extension():
    from mmkern.build import ensure_built
    return ensure_built()


def _assert_residual_stream_is_float32(backend):
    # x in half, the residual stream in float32: pre = x + residual must be the float32 sum, stored as float32.
    # (The oracle comparisons allow one ulp of x's dtype in every output, so pre rounded to half passes them.)
    x = torch.randn(3, 7, dtype=torch.float64).half()
    residual = torch.randn(3, 7, dtype=torch.float32)
    weight = torch.randn(7, dtype=torch.float64).half()
    with forced(backend):                  # CPU tensors: on a GPU machine Triton skips with its reasons
        _, pre = mmkern.layer_norm_residual(x, residual, weight=weight, prenorm=True)
        _, pre_fp32 = mmkern.rms_norm_residual(x, None, weight=weight, prenorm=True, residual_in_fp32=True)
    assert pre.dtype == torch.float32, f"{backend}: pre is {pre.dtype} for a float32 residual"
    assert torch.equal(pre, x.float() + residual), f"{backend}: pre is not the float32 sum x + residual"
    assert pre_fp32.dtype == torch.float32, f"{backend}: pre is {pre_fp32.dtype} with residual_in_fp32=True"
    assert torch.equal(pre_fp32, x.float())


def test_triton_residual_stream_stays_float32():
    """Guards against: the Triton forward storing the fp32 residual stream (pre) in x's half dtype."""
    _assert_residual_stream_is_float32("triton")


def test_cpu_residual_stream_stays_float32(extension):
    """Guards against: the C++ CPU forward ignoring residual_in_fp32 (pre stored in x's half dtype)."""
    _assert_residual_stream_is_float32("cpu")
