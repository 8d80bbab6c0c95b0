"""Triton residual + LayerNorm/RMSNorm against the float64 oracle (interpreter on CPU, or a GPU).

flash-attn's criterion through `mmkern verify`'s measure: the outputs and every gradient (x,
residual, weight, bias, shift, scale, and the gradient arriving on the returned residual stream)
are at most 2x as far from float64 as eager PyTorch in the same dtype, plus one ulp.
Dropout masks differ between backends (Philox in the kernel, torch's generator in the reference),
so dropout is checked against the reference formula evaluated with the kernel's own mask.
"""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern.ops.norm_problem import build_norm_backward, build_norm_forward
from mmkern.reference.precision import compute_in
from mmkern.triton import norm as triton_norm
from mmkern.verify import Case
from conftest import assert_backend_matches_oracle, max_abs_err, seed_drawn_after

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
# (x dtype, residual-stream dtype)
PAIRS = [(f32, f32), (f16, f16), (f16, f32), (bf16, bf16), (bf16, f32)]
PAIR_IDS = ["fp32-fp32", "fp16-fp16", "fp16-fp32", "bf16-bf16", "bf16-fp32"]
WIDTHS = [1, 7, 768, 1000, 4097, 8192, 65536]
triton_backend = mmkern.backend("triton")


def _shape(N):
    """(batch, seq, N): a few rows, fewer for the wide ones (the interpreter is slow). Rows wider than
    4096 take the backward's column-block loop, wider than 8192 the forward's too."""
    return (2, 3, N) if N <= 4097 else (2, 1, N)


def _randn(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale).to(dtype)


def norm_case(N, pair, rms, residual=True, prenorm=True, weight="x", bias=True, modulation=False,
              residual_in_fp32=False):
    """A verify.Case of layer_norm_residual / rms_norm_residual.

    weight: "x" (x's dtype), "fp32" or None; the stream dtype of `pair` is the residual's dtype
    (or, without residual, chosen with residual_in_fp32). With prenorm the first output is
    out + 0.5 * pre, so the gradient arriving on pre is checked too."""
    x_dtype, stream_dtype = pair
    shape = _shape(N)
    residual_fp32 = residual and stream_dtype == f32 and x_dtype != f32
    param_dtype = f32 if weight == "fp32" else torch.float64   # float64 -> cast to x's dtype

    def make():
        inputs = dict(x=_randn(*shape))
        if residual:
            inputs["r"] = _randn(*shape, dtype=f32 if residual_fp32 else torch.float64)
        if weight:
            inputs["w"] = _randn(N, dtype=param_dtype, scale=0.5) + 1
            if bias and not rms:
                inputs["b"] = _randn(N, dtype=param_dtype)
        if modulation:
            inputs["shift"] = _randn(shape[0], N)
            inputs["scale"] = _randn(shape[0], N, scale=0.3)
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


@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_matches_oracle_prenorm_with_residual(N, pair, rms):
    assert_backend_matches_oracle("triton", norm_case(N, pair, rms), dtypes=[pair[0]])


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


@pytest.mark.parametrize("variant,pair", [pytest.param(v, p, id=f"{v}-{i}") for v in VARIANTS
                                          for p, i in zip(PAIRS, PAIR_IDS) if _reachable(v, p)])
@pytest.mark.parametrize("N", [1000, 8193])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_matches_oracle_variants(variant, pair, N, rms):
    options = VARIANTS[variant]
    assert_backend_matches_oracle("triton", norm_case(N, pair, rms, **options), dtypes=[pair[0]])


def test_modulation_with_one_row_per_sample_and_many_samples():
    """x (batch, N): every row its own sample; (batch, seq, N) with batch=1: one sample for all rows."""
    for shape in [(9, 64), (1, 7, 300)]:
        case = Case("ln modulation", str(shape),
                    lambda: dict(x=_randn(*shape), shift=_randn(shape[0], shape[-1]),
                                 scale=_randn(shape[0], shape[-1], scale=0.3)),
                    lambda x, shift, scale: (mmkern.layer_norm_residual(x, modulation=(shift, scale)),),
                    cast=("x", "shift", "scale"), grad=("x", "shift", "scale"))
        assert_backend_matches_oracle("triton", case, dtypes=[f32, bf16])


# --------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("N", [1000, 8193])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_dropout_mask_is_the_same_in_forward_and_backward(rms, N, dtype):
    shape, p = (2, 3, N), 0.3
    x = _randn(*shape, dtype=dtype).requires_grad_()
    residual = _randn(*shape, dtype=dtype).requires_grad_()
    weight = (_randn(N, dtype=dtype) + 1).requires_grad_()
    fn = mmkern.rms_norm_residual if rms else mmkern.layer_norm_residual
    seed = seed_drawn_after(7)
    torch.manual_seed(7)
    with triton_backend:
        out, pre = fn(x, residual, weight, dropout_p=p, prenorm=True)
    keep = triton_norm.dropout_keep_mask(seed, (6, N), p, DEVICE).view(shape)
    assert 0.6 < keep.float().mean().item() < 0.8
    # forward: dropped elements leave the residual exactly; kept ones are x / (1 - p) + residual
    want_pre = torch.where(keep, x.detach().double() / (1 - p), 0.0) + residual.detach().double()
    assert torch.equal(pre[~keep], residual.detach()[~keep])
    assert max_abs_err(pre, want_pre) <= 2 * torch.finfo(dtype).eps * want_pre.abs().max().item()
    # backward: dx is zero exactly where the forward dropped, d_residual / (1 - p) where it kept
    dout = _randn(*shape, dtype=dtype)
    dx, dres, dw = torch.autograd.grad(out, (x, residual, weight), dout)
    assert torch.equal(dx == 0, ~keep | (dres == 0))
    kept = torch.where(keep, dres.double() / (1 - p), 0.0)
    assert max_abs_err(dx, kept) <= 2 * torch.finfo(dtype).eps * kept.abs().max().item()
    # and the whole thing against the float64 oracle fed the kernel's mask (dropout(x) = x * keep / (1 - p))
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
    with triton_backend:
        torch.manual_seed(3)
        a = mmkern.layer_norm_residual(x, residual, dropout_p=0.5)
        torch.manual_seed(3)
        b = mmkern.layer_norm_residual(x, residual, dropout_p=0.5)
        c = mmkern.layer_norm_residual(x, residual, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_keep_mask_has_the_requested_rate_and_depends_on_the_seed():
    a = triton_norm.dropout_keep_mask(11, (64, 256), 0.25, DEVICE)
    b = triton_norm.dropout_keep_mask(12, (64, 256), 0.25, DEVICE)
    assert a.shape == (64, 256) and a.dtype == torch.bool
    assert abs(a.float().mean().item() - 0.75) < 0.02 and not torch.equal(a, b)
    assert torch.equal(a, triton_norm.dropout_keep_mask(11, (64, 256), 0.25, DEVICE))


# --------------------------------------------------------------------------- layouts, shapes, dispatch

@pytest.mark.parametrize("N", [300, 8193])
def test_strided_rows_are_read_in_place(N):
    """x and residual rows with a row stride of 2N (last dim contiguous); dout broadcast (stride 0)."""
    big_x, big_r = _randn(5, 2 * N, dtype=f32), _randn(5, 2 * N, dtype=f32)
    x = big_x.requires_grad_()[:, N:]
    residual = big_r.requires_grad_()[:, :N]
    assert x.stride() == (2 * N, 1) and not x.is_contiguous()
    w, b = _randn(N, dtype=f32), _randn(N, dtype=f32)
    with triton_backend:
        out, pre = mmkern.layer_norm_residual(x, residual, w, b, prenorm=True)
        (out.sum() + pre.sum()).backward()
    xc, rc = x.detach().contiguous().requires_grad_(), residual.detach().contiguous().requires_grad_()
    want = F.layer_norm(xc + rc, (N,), w, b)
    (want.sum() + (xc + rc).sum()).backward()
    assert max_abs_err(out, want) < 1e-5 and max_abs_err(pre, xc + rc) == 0
    assert max_abs_err(big_x.grad[:, N:], xc.grad) < 1e-4 and big_x.grad[:, :N].abs().max() == 0
    assert max_abs_err(big_r.grad[:, :N], rc.grad) < 1e-4


@pytest.mark.parametrize("rms", [False, True])
def test_empty_rows(rms):
    x = _randn(0, 3, 96, dtype=bf16).requires_grad_()
    w = _randn(96, dtype=f32).requires_grad_()
    shift, scale = _randn(0, 96, dtype=bf16).requires_grad_(), _randn(0, 96, dtype=bf16).requires_grad_()
    fn = mmkern.rms_norm_residual if rms else mmkern.layer_norm_residual
    with triton_backend:
        out, pre = fn(x, None, w, prenorm=True, modulation=(shift, scale))
        out.sum().backward()
    assert out.shape == pre.shape == (0, 3, 96)
    assert torch.equal(w.grad, torch.zeros(96, device=DEVICE)) and x.grad.shape == x.shape
    assert shift.grad.shape == (0, 96)


def test_weight_gradient_is_deterministic_and_reduced_over_all_programs():
    x, w, b = _randn(64, 257, dtype=f32).requires_grad_(), _randn(257, dtype=f32).requires_grad_(), \
        _randn(257, dtype=f32).requires_grad_()
    dout = _randn(64, 257, dtype=f32)
    grads = []
    for _ in range(2):
        with triton_backend:
            out = mmkern.layer_norm_residual(x, None, w, b)
        grads.append(torch.autograd.grad(out, (w, b), dout))
    assert all(torch.equal(a, c) for a, c in zip(*grads))
    xhat = F.layer_norm(x.detach().double(), (257,))
    assert max_abs_err(grads[0][0], (dout.double() * xhat).sum(0)) < 1e-4
    assert max_abs_err(grads[0][1], dout.double().sum(0)) < 1e-4


def test_auto_dispatch_and_reasons():
    x = _randn(4, 16, dtype=f16)
    inputs = dict(x=x, residual=None, weight=None, bias=None, eps=1e-5, dropout_p=0.0, dropout_seed=None,
                  residual_in_fp32=False, is_rms_norm=False)

    def problem(**changes):
        return mmkern.dispatch.problem("norm_residual_forward", **dict(inputs, **changes))

    assert mmkern.dispatch.select("norm_residual_forward", problem()) == "triton"
    assert mmkern.dispatch.select("norm_residual_forward", problem(x=x.double())) == "reference"
    odd_stream = problem(x=x.float(), residual=x)        # fp32 x with an fp16 stream: not a compiled pair
    assert "residual stream has dtype torch.float16" in \
        triton_norm.norm_forward_reasons(odd_stream)[0]
    wide = _randn(1, 65537, dtype=f32)
    assert "at most 65536" in triton_norm.norm_forward_reasons(problem(x=wide))[0]
    with triton_backend, pytest.raises(mmkern.NoBackendError, match="x has dtype torch.float64"):
        mmkern.layer_norm_residual(x.double())


def test_backward_runs_on_the_forward_backend_so_the_dropout_mask_matches():
    """Forward forced onto the reference, backward called outside the block (where auto would pick Triton)."""
    x = _randn(4, 64, dtype=f32).requires_grad_()
    residual = _randn(4, 64, dtype=f32)
    seed = seed_drawn_after(21)
    torch.manual_seed(21)
    with mmkern.backend("reference"):
        out, pre = mmkern.layer_norm_residual(x, residual, dropout_p=0.5, prenorm=True)
    (dx,) = torch.autograd.grad(pre, x, torch.ones_like(pre))          # dpre/dx = keep / (1 - p)
    keep = mmkern.reference.dropout.dropout_keep_mask(seed, (4, 64), 0.5, DEVICE)
    assert torch.equal(dx, keep.float() * 2) and torch.equal(pre, torch.where(keep, x.detach() * 2, 0.0) + residual)


@pytest.mark.parametrize("N", [1000, 4097, 8193])
def test_bfloat16_outputs_are_the_float32_results_rounded_to_nearest_even(N):
    """Same float32 math either way, so the bf16 kernels' outputs must be torch's round-to-nearest-even of the
    float32 kernels' outputs, bit for bit (Triton's interpreter truncates on its own; the kernels round as a GPU)."""
    x, residual = _randn(3, N, dtype=bf16), _randn(3, N, dtype=bf16)
    weight, bias, dout = _randn(N, dtype=f32), _randn(N, dtype=f32), _randn(3, N, dtype=bf16)
    half = triton_norm.norm_forward(build_norm_forward(x, residual, weight, bias, 1e-5, 0.0, None, False, False))
    full = triton_norm.norm_forward(build_norm_forward(x.float(), residual.float(), weight, bias, 1e-5, 0.0, None,
                                                       False, False))
    for h, f in zip(half, full):
        assert torch.equal(h, f.to(h.dtype))
    pre = half[1]          # the backward reads the stored stream: give both the same values
    half = triton_norm.norm_backward(build_norm_backward(dout, None, pre, weight, bias, None, None, 1e-5, 0.0, None,
                                                         False, True, bf16))
    full = triton_norm.norm_backward(build_norm_backward(dout.float(), None, pre.float(), weight, bias, None, None,
                                                         1e-5, 0.0, None, False, True, f32))
    for h, f in zip(half, full):
        assert torch.equal(h, f.to(h.dtype))
