"""The accuracy criterion itself (mmkern.verify.compare / measure) and the checks built on it can fail.

Each test feeds the criterion a deliberately wrong "kernel" (a run function that misbehaves only in the
call the criterion judges: low-precision inputs while the reference computes in float64) and asserts the
row fails, for the ways the criterion used to let such kernels pass:
- one max over all outputs of a pass (an error in a small output hid behind a large output's yardstick);
- the oracle on the unrounded float64 inputs (the input rounding inflated the yardstick);
- a float32 output of a half-precision call (the fp32 residual stream) judged at half precision, or at the
  precision of whatever dtype the backend returned;
- a tolerance of inf (eager half overflowed) counted as a pass;
- fuzz suites satisfied by the reference alone; a test naming a backend that ran none of its ops.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mmkern
import fuzz_profiles as fz
from conftest import forced
from mmkern import dispatch, verify
from mmkern.reference.precision import compute_dtype


def _judged_call(x: torch.Tensor) -> bool:
    """True in the call the criterion judges (the backend's): low-precision x, reference math not overridden."""
    return x.dtype != torch.float64 and compute_dtype() == torch.float64


def _identity(x: torch.Tensor) -> torch.Tensor:
    """x, exactly, through an mmkern op (the criterion requires an op of the judged backend to run): Euler's
    scale_model_input at sigma 0 divides by sqrt(0 + 1)."""
    sigmas = torch.zeros(2)
    return mmkern.diffusion.euler_scale_model_input(x, torch.zeros(x.shape[0], dtype=torch.long), sigmas)


def _rows(case, dtype):
    return {r.op.split(" ")[-1]: r for r in verify.measure(case, "reference", dtype)}


def test_each_output_is_judged_on_its_own():
    """An error of 100 ulps in a small output passes under a large output's yardstick, fails on its own."""
    def run(x):
        x = _identity(x)
        big, small = x * 1e4, x * 1e-2
        if _judged_call(x):
            small = small + 100 * torch.finfo(torch.float32).eps * small.abs().max()
        return big, small

    case = verify.Case("two outputs", "8x4", lambda: dict(x=torch.randn(8, 4, dtype=torch.float64)), run,
                       cast=("x",), outputs=("big", "small"))
    rows = _rows(case, torch.float32)
    assert rows["big"].passed and not rows["small"].passed, rows
    # the old criterion (one error and one yardstick over both) would have passed it
    assert max(r.error for r in rows.values()) <= max(r.tolerance for r in rows.values())


def test_the_oracle_gets_the_rounded_inputs():
    """An exact kernel of an exact op (the identity in bfloat16) has error 0 against an oracle on the same
    rounded inputs; against the unrounded float64 inputs it would show bf16's input rounding (~2^-9 relative)."""
    case = verify.Case("identity", "16x4", lambda: dict(x=torch.randn(16, 4, dtype=torch.float64)),
                       lambda x: (_identity(x),), cast=("x",))
    (row,) = verify.measure(case, "reference", torch.bfloat16)
    assert row.error == 0.0
    # the bound is then the one-ulp floor alone: a kernel off by a few bf16 ulps fails
    assert row.tolerance <= torch.finfo(torch.bfloat16).eps * 4.5 + 1e-12      # |x| < 4.5 (randn, 64 draws)


def _stream_case(run) -> verify.Case:
    """x (6, 40) cast to the dtype under test, r a float32 residual stream; run(x, r) -> (out, pre)."""
    return verify.Case("fp32 stream", "6x40", lambda: dict(x=torch.randn(6, 40, dtype=torch.float64),
                                                           r=torch.randn(6, 40, dtype=torch.float64)),
                       run, cast=("x",), outputs=("out", "residual"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_float32_residual_stream_rounded_to_half_fails(dtype):
    """residual_in_fp32: the stream is float32 whatever x's dtype; a kernel that stores it in x's dtype and
    widens it back passed when judged at x's precision."""
    def run(x, r):
        out, pre = mmkern.layer_norm_residual(x, r.float(), prenorm=True, residual_in_fp32=True)
        if _judged_call(x):
            pre = pre.to(x.dtype).float()           # the mistake
        return out, pre

    rows = _rows(_stream_case(run), dtype)
    assert rows["out"].passed and not rows["residual"].passed, rows
    assert "judged at float32" in rows["residual"].note


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_float32_output_returned_in_half_fails(dtype):
    """The precision an output is judged at comes from the op (the reference's output dtype), never from the
    judged backend's: a stream returned in x's dtype is wrong, not judged at half precision."""
    def run(x, r):
        out, pre = mmkern.layer_norm_residual(x, r.float(), prenorm=True)
        return out, (pre.to(x.dtype) if _judged_call(x) else pre)

    rows = _rows(_stream_case(run), dtype)
    assert rows["out"].passed and not rows["residual"].passed, rows
    assert "the op returns torch.float32" in rows["residual"].note


def test_a_bound_that_is_not_finite_fails():
    assert not verify.Row("op", "b", "float16", "s", 0.0, math.inf).passed
    assert not verify.Row("op", "b", "float16", "s", 0.0, math.nan).passed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_where_eager_half_overflows_the_bound_comes_from_the_float32_yardstick(dtype):
    """ddpm_step learned_range in half precision: eager half gives inf/NaN (log of a tiny variance), so the
    baseline is the float32 yardstick's scaled by eps(dtype) / eps(float32), finite, and the row says so."""
    (case,) = [c for c in verify.cases() if c.op.startswith("diffusion.ddpm_step learned_range")]
    torch.manual_seed(0)
    rows = verify.measure(case, "reference", dtype)
    assert all(math.isfinite(r.tolerance) for r in rows), rows
    assert any("float32 yardstick" in r.note for r in rows), rows


def test_every_backend_checks_fails_when_only_the_reference_checked():
    """The fuzz suites' per-backend requirement: a usable backend that takes the typical input but checked no
    drawn example fails the test (the count of examples the reference checked always held)."""
    x, t = torch.zeros(2, 3, device=fz.DEVICE), torch.zeros(2, dtype=torch.long, device=fz.DEVICE)
    typical = dict(model_output=x, sample=x, timesteps=t, prev_timesteps=t - 1,
                   alphas_cumprod=torch.full((10,), 0.5, device=fz.DEVICE), noise=None, prediction_type="epsilon",
                   variance_type="fixed_small", clip_sample_range=0.0, dynamic_thresholding_ratio=0.0,
                   sample_max_value=1.0)
    ops = ("ddpm_step",)
    required = [b for b in fz.backends() if b != "reference" and ops[0] in dispatch.backends()[b].kernels
                and fz.takes(b, ops[0], fz.DEVICE, typical)]
    if not required:
        pytest.skip("no usable non-reference backend with ddpm_step here")

    @fz.every_backend_checks(["synthetic"], ops, typical)
    @settings(max_examples=2, database=None, deadline=None)
    @given(st.integers(0, 1))
    def synthetic(i):
        fz.COUNTS[("synthetic", "checks[reference]")] += 1

    with pytest.raises(AssertionError, match="checked no example"):
        synthetic()


def test_forced_fails_when_no_op_ran_on_the_named_backend():
    with pytest.raises(AssertionError, match="no mmkern op ran on backend 'reference'"):
        with forced("reference"):
            torch.ones(3) * 2                      # not an mmkern op


def test_dispatch_log_records_the_backend_of_forward_and_backward():
    x = torch.randn(3, 16, requires_grad=True)
    with mmkern.backend("reference"), mmkern.dispatch_log() as log:
        mmkern.rms_norm_residual(x, torch.randn(3, 16)).sum().backward()
    assert log.ran("reference", "norm_residual_forward") and log.ran("reference", "norm_residual_backward")
    assert log.backends() == {"reference"}
