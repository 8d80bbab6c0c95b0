"""The compiled residual + LayerNorm/RMSNorm kernels (mmkern._C) against the float64 oracle.

The `cpu` backend (C++ CPU kernels) runs here, through the public API, for every option and
dtype pair: flash-attn's criterion through `mmkern verify`'s measure (outputs and every gradient
at most 2x as far from float64 as eager PyTorch in the same dtype, plus one ulp). The `cuda`
backend runs the same checks when a GPU is present (those tests skip without one).
Dropout masks are Philox at (seed, row * N + col), the stream of Triton's tl.rand: the tests
check them bit for bit against an independent Python Philox, the Triton kernels' mask and
across devices.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern import dispatch
from mmkern.ops.norm_problem import build_norm_backward, build_norm_forward
from mmkern.reference.precision import compute_in
from mmkern.verify import Case
from conftest import assert_backend_matches_oracle, max_abs_err, seed_drawn_after
from philox_model import philox_keep

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
# (x dtype, residual-stream dtype)
PAIRS = [(f32, f32), (f16, f16), (f16, f32), (bf16, bf16), (bf16, f32)]
PAIR_IDS = ["fp32-fp32", "fp16-fp16", "fp16-fp32", "bf16-bf16", "bf16-fp32"]
WIDTHS = [1, 7, 768, 1000, 4097, 65536]
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="the CUDA kernels run only on a GPU")


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Build mmkern._C if missing or stale (cached: fast after the first build), then load it."""
    from mmkern.build import ensure_built
    return ensure_built()


def native_norm():
    from mmkern.native import norm
    return norm


def _shape(N):
    return (2, 3, N) if N <= 8193 else (2, 1, N)


def _randn(*shape, dtype=torch.float64, scale=1.0, device="cpu"):
    return (torch.randn(*shape, dtype=torch.float64, device=device) * scale).to(dtype)


def norm_case(N, pair, rms, residual=True, prenorm=True, weight="x", bias=True, modulation=False,
              residual_in_fp32=False, device="cpu"):
    """A verify.Case of layer_norm_residual / rms_norm_residual (as in test_triton_norm.py).

    weight: "x" (x's dtype), "fp32" or None; the stream dtype of `pair` is the residual's dtype (or,
    without residual, chosen with residual_in_fp32). With prenorm the first output is out + 0.5 * pre,
    so the gradient arriving on pre is checked too."""
    x_dtype, stream_dtype = pair
    shape = _shape(N)
    residual_fp32 = residual and stream_dtype == f32 and x_dtype != f32
    param_dtype = f32 if weight == "fp32" else torch.float64   # float64 -> cast to x's dtype

    def make():
        inputs = dict(x=_randn(*shape, device=device))
        if residual:
            inputs["r"] = _randn(*shape, dtype=f32 if residual_fp32 else torch.float64, device=device)
        if weight:
            inputs["w"] = _randn(N, dtype=param_dtype, scale=0.5, device=device) + 1
            if bias and not rms:
                inputs["b"] = _randn(N, dtype=param_dtype, device=device)
        if modulation:
            inputs["shift"] = _randn(shape[0], N, device=device)
            inputs["scale"] = _randn(shape[0], N, scale=0.3, device=device)
        return inputs

    def run(x, r=None, w=None, b=None, shift=None, scale=None):
        kwargs = dict(weight=w, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
                      modulation=(shift, scale) if modulation else None)
        if rms:
            result = mmkern.rms_norm_residual(x, r, **kwargs)
        else:
            result = mmkern.layer_norm_residual(x, r, bias=b, **kwargs)
        if not prenorm:
            return (result,)
        out, pre = result
        return out + 0.5 * pre.to(out.dtype), out, pre

    names = make().keys()
    cast = tuple(n for n in names if not (n == "r" and residual_fp32) and not (n in "wb" and weight == "fp32"))
    label = f"{'rms' if rms else 'layer'}_norm_residual"
    return Case(label, f"{shape} {x_dtype}/{stream_dtype}", make, run, cast=cast, grad=tuple(names))


VARIANTS = {
    "postnorm": dict(prenorm=False),
    "no_residual": dict(residual=False),
    "no_residual_stream_fp32": dict(residual=False, residual_in_fp32=True),
    "no_bias": dict(bias=False),
    "no_weight": dict(weight=None),
    "weight_fp32": dict(weight="fp32"),
    "modulation": dict(modulation=True),
    "modulation_postnorm_no_weight": dict(modulation=True, prenorm=False, weight=None),
}


def _reachable(variant, pair):
    """Without a residual the stream dtype is x's, or float32 with residual_in_fp32: only those pairs."""
    options = VARIANTS[variant]
    if options.get("residual", True):
        return True
    return pair[1] == (f32 if options.get("residual_in_fp32") else pair[0])


VARIANT_PARAMS = [pytest.param(v, p, id=f"{v}-{i}") for v in VARIANTS for p, i in zip(PAIRS, PAIR_IDS)
                  if _reachable(v, p)]


# --------------------------------------------------------------------------- the cpu backend against float64

@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_cpu_matches_oracle_prenorm_with_residual(N, pair, rms):
    assert_backend_matches_oracle("cpu", norm_case(N, pair, rms), dtypes=[pair[0]])


@pytest.mark.parametrize("variant,pair", VARIANT_PARAMS)
@pytest.mark.parametrize("N", [7, 1000])   # (N = 1 RMSNorm's gradient is ill-conditioned: 1 - xhat^2 -> 0)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_cpu_matches_oracle_variants(variant, pair, N, rms):
    assert_backend_matches_oracle("cpu", norm_case(N, pair, rms, **VARIANTS[variant]), dtypes=[pair[0]])


def test_cpu_modulation_with_one_row_per_sample_and_many_samples():
    for shape in [(9, 64), (1, 7, 300)]:
        case = Case("ln modulation", str(shape),
                    lambda: dict(x=_randn(*shape), shift=_randn(shape[0], shape[-1]),
                                 scale=_randn(shape[0], shape[-1], scale=0.3)),
                    lambda x, shift, scale: (mmkern.layer_norm_residual(x, modulation=(shift, scale)),),
                    cast=("x", "shift", "scale"), grad=("x", "shift", "scale"))
        assert_backend_matches_oracle("cpu", case, dtypes=[f32, bf16])


def test_cpu_many_rows_take_many_backward_chunks():
    """300 rows: the backward cuts them into 64 chunks whose partial sums are added in a fixed order."""
    case = norm_case(96, (f32, f32), False, modulation=True)
    case.make = lambda: dict(x=_randn(3, 100, 96), r=_randn(3, 100, 96), w=_randn(96) + 1, b=_randn(96),
                             shift=_randn(3, 96), scale=_randn(3, 96, scale=0.3))
    assert_backend_matches_oracle("cpu", case, dtypes=[f32, bf16])


# --------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("seed", [0, 12345, 2**62 - 1])
def test_dropout_mask_is_philox_bit_for_bit(seed):
    shape, p = (3, 4099), 0.3
    got = native_norm().dropout_keep_mask(seed, shape, p, "cpu")
    want = philox_keep(seed, np.arange(3 * 4099), p).reshape(shape)
    assert got.dtype == torch.bool and np.array_equal(got.numpy(), want)


def test_dropout_mask_matches_the_triton_kernels():
    """Same (seed, index) -> same mask on every backend: the Triton kernels' mask (interpreter here)."""
    from mmkern.triton import norm as triton_norm
    for seed in (7, 2**61 + 3):
        a = native_norm().dropout_keep_mask(seed, (5, 333), 0.25, "cpu")
        b = triton_norm.dropout_keep_mask(seed, (5, 333), 0.25, "cpu")
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("N", [7, 1000, 4097])
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
def test_dropout_forward_and_backward_use_the_same_mask(rms, N, dtype, device="cpu", backend="cpu"):
    shape, p = (2, 3, N), 0.3
    x = _randn(*shape, dtype=dtype, device=device).requires_grad_()
    residual = _randn(*shape, dtype=dtype, device=device).requires_grad_()
    weight = (_randn(N, dtype=dtype, device=device) + 1).requires_grad_()
    fn = mmkern.rms_norm_residual if rms else mmkern.layer_norm_residual
    seed = seed_drawn_after(7)
    torch.manual_seed(7)
    with mmkern.backend(backend):
        out, pre = fn(x, residual, weight, dropout_p=p, prenorm=True)
    keep = native_norm().dropout_keep_mask(seed, (6, N), p, device).view(shape)
    if N >= 1000:
        assert 0.6 < keep.float().mean().item() < 0.8
    # forward: dropped elements leave the residual exactly; kept ones are x / (1 - p) + residual
    want_pre = torch.where(keep, x.detach().double() / (1 - p), 0.0) + residual.detach().double()
    assert torch.equal(pre[~keep], residual.detach()[~keep])
    assert max_abs_err(pre, want_pre) <= 2 * torch.finfo(dtype).eps * want_pre.abs().max().item()
    dout = _randn(*shape, dtype=dtype, device=device)
    dx, dres, dw = torch.autograd.grad(out, (x, residual, weight), dout)
    assert torch.equal(dx == 0, ~keep | (dres == 0))
    kept = torch.where(keep, dres.double() / (1 - p), 0.0)
    assert max_abs_err(dx, kept) <= 2 * torch.finfo(dtype).eps * max(kept.abs().max().item(), 1e-30)
    # and the whole thing against the float64 oracle fed the kernel's mask
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    with mmkern.backend("reference"):
        want_out = fn(x64 * keep / (1 - p), r64, w64)
    want_grads = torch.autograd.grad(want_out, (x64, r64, w64), dout.double())
    with mmkern.backend("reference"), compute_in(dtype):     # eager PyTorch in dtype: the yardstick
        base_out = fn(x64.to(dtype) * keep / (1 - p), r64.to(dtype), w64.to(dtype))
        base_grads = torch.autograd.grad(base_out, (x64, r64, w64), dout)
    for got, want, base in zip((out, dx, dres, dw), (want_out, *want_grads), (base_out, *base_grads)):
        assert max_abs_err(got, want) <= 2 * max_abs_err(base, want) + torch.finfo(dtype).eps * want.abs().max().item()


def test_dropout_is_reproducible_under_manual_seed_and_differs_without():
    x, residual = _randn(4, 200, dtype=f32), _randn(4, 200, dtype=f32)
    with mmkern.backend("cpu"):
        torch.manual_seed(3)
        a = mmkern.layer_norm_residual(x, residual, dropout_p=0.5)
        torch.manual_seed(3)
        b = mmkern.layer_norm_residual(x, residual, dropout_p=0.5)
        c = mmkern.layer_norm_residual(x, residual, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- layouts, shapes, determinism

@pytest.mark.parametrize("N", [300, 4097])
def test_strided_rows_are_read_in_place(N):
    """x and residual rows with a row stride of 2N (last dim contiguous); dout broadcast (stride 0)."""
    big_x, big_r = _randn(5, 2 * N, dtype=f32), _randn(5, 2 * N, dtype=f32)
    x = big_x.requires_grad_()[:, N:]
    residual = big_r.requires_grad_()[:, :N]
    assert x.stride() == (2 * N, 1) and not x.is_contiguous()
    w, b = _randn(N, dtype=f32), _randn(N, dtype=f32)
    with mmkern.backend("cpu"):
        out, pre = mmkern.layer_norm_residual(x, residual, w, b, prenorm=True)
        (out.sum() + pre.sum()).backward()
    xc, rc = x.detach().contiguous().requires_grad_(), residual.detach().contiguous().requires_grad_()
    want = F.layer_norm(xc + rc, (N,), w, b)
    (want.sum() + (xc + rc).sum()).backward()
    assert max_abs_err(out, want) < 1e-5 and max_abs_err(pre, xc + rc) == 0
    assert max_abs_err(big_x.grad[:, N:], xc.grad) < 1e-4 and big_x.grad[:, :N].abs().max() == 0
    assert max_abs_err(big_r.grad[:, :N], rc.grad) < 1e-4


def test_strided_last_dimension_is_copied_not_misread():
    x = _randn(64, 6, dtype=f32).t()          # (6, 64) with strides (1, 6)
    with mmkern.backend("cpu"):
        out = mmkern.layer_norm_residual(x)
    assert max_abs_err(out, F.layer_norm(x, (64,))) < 1e-5


@pytest.mark.parametrize("rms", [False, True])
def test_empty_rows(rms):
    x = _randn(0, 3, 96, dtype=bf16).requires_grad_()
    w = _randn(96, dtype=f32).requires_grad_()
    shift, scale = _randn(0, 96, dtype=bf16).requires_grad_(), _randn(0, 96, dtype=bf16).requires_grad_()
    fn = mmkern.rms_norm_residual if rms else mmkern.layer_norm_residual
    with mmkern.backend("cpu"):
        out, pre = fn(x, None, w, prenorm=True, modulation=(shift, scale))
        out.sum().backward()
    assert out.shape == pre.shape == (0, 3, 96)
    assert torch.equal(w.grad, torch.zeros(96)) and x.grad.shape == x.shape
    assert shift.grad.shape == (0, 96)


def test_empty_rows_with_a_strided_last_dimension():
    """An empty view may keep any strides (torch counts it as contiguous, so .contiguous() returns it
    as it is): the adapter hands the kernel a fresh empty tensor instead (found by the norm fuzz suite)."""
    x = _randn(0, 4, dtype=f32)[:, ::2]           # (0, 2) with strides (4, 2)
    with mmkern.backend("cpu"):
        out = mmkern.rms_norm_residual(x)
    assert out.shape == (0, 2)


def test_gradients_are_bitwise_deterministic():
    x = _randn(4, 128, 257, dtype=f32).requires_grad_()
    r = _randn(4, 128, 257, dtype=f32).requires_grad_()
    w, b = _randn(257, dtype=f32).requires_grad_(), _randn(257, dtype=f32).requires_grad_()
    shift, scale = _randn(4, 257, dtype=f32).requires_grad_(), _randn(4, 257, dtype=f32).requires_grad_()
    dout = _randn(4, 128, 257, dtype=f32)
    grads = []
    for threads in (torch.get_num_threads(), 1):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with mmkern.backend("cpu"):
                out = mmkern.layer_norm_residual(x, r, w, b, modulation=(shift, scale))
            grads.append(torch.autograd.grad(out, (x, r, w, b, shift, scale), dout))
        finally:
            torch.set_num_threads(old)
    assert all(torch.equal(a, c) for a, c in zip(*grads))
    xhat = F.layer_norm((x + r).detach().double(), (257,))
    dy = dout.double() * (1 + scale.detach().double()[:, None])
    assert max_abs_err(grads[0][2], (dy * xhat).sum((0, 1))) < 1e-3
    assert max_abs_err(grads[0][4], dout.double().sum(1)) < 1e-4


@pytest.mark.parametrize("N", [1000, 4097])
def test_bfloat16_outputs_are_the_float32_results_rounded_to_nearest_even(N):
    """Same float32 math either way: bf16 outputs are torch's round-to-nearest-even of the float32 ones."""
    norm = native_norm()
    x, residual = _randn(3, N, dtype=bf16), _randn(3, N, dtype=bf16)
    weight, bias, dout = _randn(N, dtype=f32), _randn(N, dtype=f32), _randn(3, N, dtype=bf16)
    half = norm.norm_forward(build_norm_forward(x, residual, weight, bias, 1e-5, 0.0, None, False, False))
    full = norm.norm_forward(build_norm_forward(x.float(), residual.float(), weight, bias, 1e-5, 0.0, None, False,
                                                False))
    for h, f in zip(half, full):
        assert torch.equal(h, f.to(h.dtype))
    pre = half[1]
    half = norm.norm_backward(build_norm_backward(dout, None, pre, weight, bias, None, None, 1e-5, 0.0, None, False,
                                                  True, bf16))
    full = norm.norm_backward(build_norm_backward(dout.float(), None, pre.float(), weight, bias, None, None, 1e-5,
                                                  0.0, None, False, True, f32))
    for h, f in zip(half, full):
        assert torch.equal(h, f.to(h.dtype))


def test_opcheck_through_the_cpu_backend():
    x, r, w, b = _randn(3, 40, dtype=f32), _randn(3, 40, dtype=f32), _randn(40, dtype=f32), _randn(40, dtype=f32)
    with mmkern.backend("cpu"):
        torch.library.opcheck(torch.ops.mmkern.norm_residual_forward,
                              (x.requires_grad_(), r, w, b, 1e-5, 0.0, None, False, False),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --------------------------------------------------------------------------- dispatch and reasons

def test_cpu_backend_is_usable_and_lists_its_ops():
    assert "cpu" in mmkern.available_backends()
    backend = dispatch.backends()["cpu"]
    assert not backend.environment_reasons()
    assert {"norm_residual_forward", "norm_residual_backward"} <= set(backend.kernels)


def test_auto_dispatch_prefers_cpu_for_cpu_tensors_without_the_interpreter():
    code = ("import torch, mmkern; from mmkern import dispatch; x = torch.randn(4, 16);"
            "i = dict(x=x, residual=None, weight=None, bias=None, eps=1e-5, dropout_p=0.0, dropout_seed=None,"
            "residual_in_fp32=False, is_rms_norm=False);"
            "problem = lambda **c: dispatch.problem('norm_residual_forward', **dict(i, **c));"
            "print(dispatch.select('norm_residual_forward', problem()),"
            "dispatch.select('norm_residual_forward', problem(x=x.double())))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", "MMKERN_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu", "reference"]


def test_reasons_send_what_the_kernels_do_not_take_elsewhere():
    norm = native_norm()
    x = _randn(4, 16, dtype=f16)
    inputs = dict(x=x, residual=None, weight=None, bias=None, eps=1e-5, dropout_p=0.0, dropout_seed=None,
                  residual_in_fp32=False, is_rms_norm=False)

    def problem(**changes):
        return dispatch.problem("norm_residual_forward", **dict(inputs, **changes))

    assert norm.norm_forward_reasons(problem()) == []
    assert "x has dtype torch.float64" in norm.norm_forward_reasons(problem(x=x.double()))[0]
    assert "residual stream has dtype torch.float16" in norm.norm_forward_reasons(problem(x=x.float(),
                                                                                        residual=x))[0]
    assert "at most 65536" in norm.norm_forward_reasons(problem(x=_randn(1, 65537, dtype=f32)))[0]
    with mmkern.backend("cpu"), pytest.raises(mmkern.NoBackendError, match="x has dtype torch.float64"):
        mmkern.layer_norm_residual(x.double())


# --------------------------------------------------------------------------- the CUDA kernels (GPU only)

@needs_gpu
@pytest.mark.parametrize("N", [1, 7, 768, 1000, 4097, 8192, 65536])
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_cuda_matches_oracle_prenorm_with_residual(N, pair, rms):
    assert_backend_matches_oracle("cuda", norm_case(N, pair, rms, device="cuda"), dtypes=[pair[0]])


@needs_gpu
@pytest.mark.parametrize("variant,pair", VARIANT_PARAMS)
@pytest.mark.parametrize("N", [1000, 8193])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_cuda_matches_oracle_variants(variant, pair, N, rms):
    assert_backend_matches_oracle("cuda", norm_case(N, pair, rms, device="cuda", **VARIANTS[variant]),
                                  dtypes=[pair[0]])


@needs_gpu
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("N", [1000, 8193])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_cuda_dropout_forward_and_backward_use_the_same_mask(rms, N, dtype):
    test_dropout_forward_and_backward_use_the_same_mask(rms, N, dtype, device="cuda", backend="cuda")


@needs_gpu
def test_cuda_dropout_mask_matches_cpu_and_triton():
    from mmkern.triton import norm as triton_norm
    for seed in (7, 2**61 + 3):
        a = native_norm().dropout_keep_mask(seed, (37, 4099), 0.4, "cuda").cpu()
        assert torch.equal(a, native_norm().dropout_keep_mask(seed, (37, 4099), 0.4, "cpu"))
        assert torch.equal(a, triton_norm.dropout_keep_mask(seed, (37, 4099), 0.4, "cuda").cpu())


@needs_gpu
@pytest.mark.parametrize("N", [300, 8193])
def test_cuda_matches_cpu_on_misaligned_strided_rows_and_is_deterministic(N):
    """Row stride 2N + 1 (no 16-byte vectors: the K = 1 kernels) and aligned rows, forward and backward."""
    for stride in (2 * N, 2 * N + 1):
        big_x = _randn(37 * stride, dtype=bf16)
        x = big_x.as_strided((37, N), (stride, 1))
        r, w, b = _randn(37, N, dtype=f32), _randn(N, dtype=f32), _randn(N, dtype=f32)
        dout = _randn(37, N, dtype=bf16)
        results = []
        for device, backend in (("cpu", "cpu"), ("cuda", "cuda"), ("cuda", "cuda")):
            xs, rs, ws, bs = (t.to(device).requires_grad_() for t in (x, r, w, b))
            xs = xs if device == "cpu" else big_x.to(device).as_strided((37, N), (stride, 1)).requires_grad_()
            with mmkern.backend(backend):
                out, pre = mmkern.layer_norm_residual(xs, rs, ws, bs, prenorm=True)
            grads = torch.autograd.grad(out, (xs, rs, ws, bs), dout.to(device))
            results.append([t.cpu() for t in (out, pre, *grads)])
        assert all(torch.equal(a, c) for a, c in zip(results[1], results[2]))        # deterministic
        for got, want in zip(results[1], results[0]):
            assert max_abs_err(got, want) <= 1e-2 * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("N", [1, 2])
def test_narrow_rms_rows_backward_within_twice_the_eager_error_row_by_row(N, device="cpu", backend="cpu"):
    """Width 1-2 RMSNorm rows: dx = rstd (dxhat - xhat mean(dxhat xhat)) nearly cancels (1 - xhat^2 = eps rstd^2
    at width 1), so each row's gradient error is checked on its own against 2x eager fp32's (found by the fuzz
    suite: the fused multiply-subtract and the width-1 cancellation gave up to 2.5x on ~1% of rows)."""
    for _ in range(60):
        x, dy = _randn(1, N, dtype=torch.float64), _randn(1, N, dtype=torch.float64)

        def grad(dtype, backend, device="cpu"):
            xx = x.to(device, dtype).requires_grad_()
            with mmkern.backend(backend):
                out = mmkern.rms_norm_residual(xx, eps=1e-5)
            return torch.autograd.grad(out, xx, dy.to(device, dtype))[0].double().cpu()
        with mmkern.backend("reference"):
            oracle = grad(torch.float64, "reference")
            with compute_in(torch.float32):
                eager = grad(torch.float32, "reference")
        got = grad(torch.float32, backend, device)
        tolerance = 2 * (eager - oracle).abs().max() + torch.finfo(torch.float32).eps * max(oracle.abs().max(), 1e-3)
        assert (got - oracle).abs().max() <= tolerance, (x, dy)


@needs_gpu
@pytest.mark.parametrize("N", [1, 2])
def test_cuda_narrow_rms_rows_backward_within_twice_the_eager_error_row_by_row(N):
    """The CUDA kernel's width-1 branch (dxhat eps rstd^2, as the CPU kernel's); width 2 runs with nvcc's FMA."""
    test_narrow_rms_rows_backward_within_twice_the_eager_error_row_by_row(N, device="cuda", backend="cuda")
