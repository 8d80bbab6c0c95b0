"""The reference residual + LayerNorm/RMSNorm backend against torch.nn.functional, in float64.

Gradients (x, residual, weight, bias, and the gradient arriving on the prenorm residual stream)
are compared with autograd through F.layer_norm / F.rms_norm applied to dropout(x) + residual.
"""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern.reference.dropout import dropout_keep_mask
from conftest import DTYPES, max_abs_err, randn, seed_drawn_after

TOL = 1e-10
ref = mmkern.backend("reference")


def torch_norm(pre, weight, bias, eps, rms):
    N = pre.shape[-1]
    if rms:
        return F.rms_norm(pre, (N,), weight, eps=eps)
    return F.layer_norm(pre, (N,), weight, bias, eps=eps)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", [(3, 5, 8), (7, 1), (4, 33), (2, 3, 4, 17)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
@pytest.mark.parametrize("prenorm", [False, True])
def test_matches_torch_norm(rms, shape, with_residual, affine, prenorm):
    N = shape[-1]
    x = randn(*shape, requires_grad=True)
    residual = randn(*shape, requires_grad=True) if with_residual else None
    weight = randn(N, requires_grad=True) if affine != "none" else None
    bias = randn(N, requires_grad=True) if (affine == "weight_bias" and not rms) else None
    eps = 1e-5
    with ref:
        if rms:
            result = mmkern.rms_norm_residual(x, residual, weight, eps=eps, prenorm=prenorm)
        else:
            result = mmkern.layer_norm_residual(x, residual, weight, bias, eps=eps, prenorm=prenorm)
    out, pre = result if prenorm else (result, None)
    want_pre = x + residual if with_residual else x
    want = torch_norm(want_pre, weight, bias, eps, rms)
    assert out.shape == x.shape and max_abs_err(out, want) < TOL
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    dout = randn(*shape)
    if prenorm:
        assert max_abs_err(pre, want_pre) < TOL
        dpre = randn(*shape)
        got = torch.autograd.grad((out, pre), inputs, (dout, dpre))
        expected = torch.autograd.grad((want, want_pre), inputs, (dout, dpre))
    else:
        got = torch.autograd.grad(out, inputs, dout)
        expected = torch.autograd.grad(want, inputs, dout)
    for g, e in zip(got, expected):
        assert max_abs_err(g, e) < TOL


@pytest.mark.parametrize("rms", [False, True])
def test_dropout_uses_one_mask_in_forward_and_backward(rms):
    shape, p = (6, 24), 0.25
    x, residual = randn(*shape, requires_grad=True), randn(*shape, requires_grad=True)
    weight = randn(24, requires_grad=True)
    seed = seed_drawn_after(99)
    torch.manual_seed(99)
    fn = mmkern.rms_norm_residual if rms else mmkern.layer_norm_residual
    with ref:
        out, pre = fn(x, residual, weight, dropout_p=p, prenorm=True)
    keep = dropout_keep_mask(seed, shape, p, "cpu")
    want_pre = x * keep / (1 - p) + residual
    want = torch_norm(want_pre, weight, None, 1e-6 if rms else 1e-5, rms)
    assert max_abs_err(pre, want_pre) < TOL and max_abs_err(out, want) < TOL
    dout = randn(*shape)
    for g, e in zip(torch.autograd.grad(out, (x, residual, weight), dout),
                    torch.autograd.grad(want, (x, residual, weight), dout)):
        assert max_abs_err(g, e) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_mixed_precision_dtypes(dtype, weight_fp32):
    x, residual = randn(4, 64).to(dtype), randn(4, 64).to(dtype)
    weight = randn(64).to(torch.float32 if weight_fp32 else dtype)
    bias = randn(64).to(weight.dtype)
    with ref:
        out, pre = mmkern.layer_norm_residual(x, residual, weight, bias, prenorm=True)
        _, pre32 = mmkern.layer_norm_residual(x, None, weight, bias, prenorm=True, residual_in_fp32=True)
    assert out.dtype == dtype and pre.dtype == dtype and pre32.dtype == torch.float32
    want = F.layer_norm(x.double() + residual.double(), (64,), weight.double(), bias.double())
    assert max_abs_err(out, want) <= max_abs_err(want.to(dtype), want) + 1e-12


def test_empty_rows_and_strided_rows():
    with ref:
        x = randn(0, 3, 16, requires_grad=True)
        w = randn(16, requires_grad=True)
        out = mmkern.layer_norm_residual(x, weight=w)
        assert out.shape == (0, 3, 16)
        out.sum().backward()
        assert torch.equal(w.grad, torch.zeros(16, dtype=torch.float64))
        wide = randn(5, 40)
        strided = wide[:, ::2]                      # last dim not contiguous: copied
        out = mmkern.rms_norm_residual(strided)
    assert max_abs_err(out, F.rms_norm(strided, (20,), eps=1e-6)) < TOL


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 12), (3, 12), (1, 2, 2, 12)])
def test_modulation_matches_the_adaln_formula(rms, shape):
    """out = Norm(x + residual) * (1 + scale[b]) + shift[b]; gradients for all six inputs."""
    N, B = shape[-1], shape[0]
    x, residual = randn(*shape, requires_grad=True), randn(*shape, requires_grad=True)
    weight, bias = randn(N, requires_grad=True), (None if rms else randn(N, requires_grad=True))
    shift, scale = randn(B, N, requires_grad=True), randn(B, N, requires_grad=True)
    fn = mmkern.rms_norm_residual if rms else mmkern.layer_norm_residual
    kwargs = dict(weight=weight) if rms else dict(weight=weight, bias=bias)
    with ref:
        out, pre = fn(x, residual, **kwargs, prenorm=True, modulation=(shift, scale))
    view = (B,) + (1,) * (len(shape) - 2) + (N,)
    want = torch_norm(x + residual, weight, bias, 1e-6 if rms else 1e-5, rms) * (1 + scale.view(view)) + \
        shift.view(view)
    assert max_abs_err(out, want) < TOL
    inputs = [t for t in (x, residual, weight, bias, shift, scale) if t is not None]
    dout, dpre = randn(*shape), randn(*shape)
    got = torch.autograd.grad((out, pre), inputs, (dout, dpre))
    expected = torch.autograd.grad((want, x + residual), inputs, (dout, dpre))
    for g, e in zip(got, expected):
        assert max_abs_err(g, e) < TOL
