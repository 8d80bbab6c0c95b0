"""mmkern.nn.LayerNormResidual / RMSNormResidual against torch.nn.LayerNorm / torch.nn.RMSNorm with the
same state dict, on the Triton backend (interpreter on CPU) and the reference."""
import pytest
import torch
from torch import nn

import mmkern
from mmkern.triton import norm as triton_norm
from conftest import max_abs_err, seed_drawn_after

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "reference"]


def _randomised(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def _check_against_torch(ours, theirs, shape, backend, with_residual=True, tol=1e-5):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    residual = torch.randn(shape, device=DEVICE, requires_grad=True) if with_residual else None
    with mmkern.backend(backend):
        got = ours(x, residual)
    out = got[0] if ours.prenorm else got
    pre_want = x + residual if with_residual else x
    want = theirs(pre_want)
    assert max_abs_err(out, want) < tol
    if ours.prenorm:
        assert max_abs_err(got[1], pre_want) < tol
    dout = torch.randn(shape, device=DEVICE)
    inputs = [t for t in (x, residual) if t is not None]
    params = list(ours.parameters())
    with mmkern.backend(backend):
        grads = torch.autograd.grad(out, inputs + params, dout)
    want_grads = torch.autograd.grad(want, inputs + list(theirs.parameters()), dout)
    for g, w in zip(grads, want_grads):
        assert max_abs_err(g, w) < 1e-3 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("elementwise_affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("prenorm", [False, True])
def test_layer_norm_residual_loads_a_torch_layer_norm_state_dict(backend, elementwise_affine, bias, prenorm):
    theirs = _randomised(nn.LayerNorm(96, eps=1e-6, elementwise_affine=elementwise_affine, bias=bias).to(DEVICE))
    ours = mmkern.nn.LayerNormResidual(96, eps=1e-6, elementwise_affine=elementwise_affine, bias=bias,
                                       prenorm=prenorm).to(DEVICE)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())                      # strict: same names and shapes
    _check_against_torch(ours, theirs, (2, 5, 96), backend)
    _check_against_torch(ours, theirs, (3, 96), backend, with_residual=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("elementwise_affine", [True, False])
def test_rms_norm_residual_loads_a_torch_rms_norm_state_dict(backend, eps, elementwise_affine):
    theirs = _randomised(nn.RMSNorm(80, eps=eps, elementwise_affine=elementwise_affine).to(DEVICE))
    ours = mmkern.nn.RMSNormResidual(80, eps=eps, elementwise_affine=elementwise_affine, prenorm=True).to(DEVICE)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    _check_against_torch(ours, theirs, (4, 3, 80), backend)


def test_state_dicts_load_both_ways_and_wide_rows_match():
    ours = _randomised(mmkern.nn.LayerNormResidual(5000).to(DEVICE))
    theirs = nn.LayerNorm(5000).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    _check_against_torch(ours, theirs, (2, 5000), "triton", tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_normalized_dimensions(backend):
    theirs = _randomised(nn.LayerNorm((4, 6)).to(DEVICE))
    ours = mmkern.nn.LayerNormResidual((4, 6)).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    _check_against_torch(ours, theirs, (3, 4, 6), backend)
    with pytest.raises(ValueError, match=r"x must end in normalized_shape \(4, 6\), got \(3, 6, 4\)"):
        ours(torch.randn(3, 6, 4, device=DEVICE))


def test_dropout_only_in_training_mode():
    module = mmkern.nn.LayerNormResidual(64, dropout_p=0.4, prenorm=True).to(DEVICE)
    x, residual = torch.randn(8, 64, device=DEVICE), torch.randn(8, 64, device=DEVICE)
    module.eval()
    with mmkern.backend("triton"):
        out, pre = module(x, residual)
    assert torch.equal(pre, x + residual)
    assert max_abs_err(out, nn.functional.layer_norm(x + residual, (64,))) < 1e-5
    module.train()
    seed = seed_drawn_after(5)
    torch.manual_seed(5)
    with mmkern.backend("triton"):
        out, pre = module(x, residual)
    keep = triton_norm.dropout_keep_mask(seed, (8, 64), 0.4, DEVICE)
    assert max_abs_err(pre, torch.where(keep, x / 0.6, 0.0) + residual) < 1e-5
    assert 0.45 < keep.float().mean().item() < 0.75


def test_half_precision_module_with_fp32_residual_stream():
    module = _randomised(mmkern.nn.RMSNormResidual(256, prenorm=True, residual_in_fp32=True)).to(DEVICE,
                                                                                                   torch.bfloat16)
    x = torch.randn(4, 256, device=DEVICE, dtype=torch.bfloat16)
    with mmkern.backend("triton"):
        out, pre = module(x)
    assert out.dtype == torch.bfloat16 and pre.dtype == torch.float32
    want = nn.functional.rms_norm(x.double(), (256,), module.weight.double(), eps=torch.finfo(torch.bfloat16).eps)
    assert max_abs_err(out, want) <= 2 * max_abs_err(want.to(torch.bfloat16), want) + 1e-2


def test_modulation_through_the_module():
    module = mmkern.nn.LayerNormResidual(32, elementwise_affine=False).to(DEVICE)
    x, shift, scale = torch.randn(2, 7, 32, device=DEVICE), torch.randn(2, 32, device=DEVICE), \
        torch.randn(2, 32, device=DEVICE)
    with mmkern.backend("triton"):
        out = module(x, modulation=(shift, scale))
    want = nn.functional.layer_norm(x, (32,)) * (1 + scale[:, None]) + shift[:, None]
    assert max_abs_err(out, want) < 1e-5


def test_constructor_errors_and_repr():
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\), got 1.5"):
        mmkern.nn.LayerNormResidual(8, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"normalized_shape must be a positive size"):
        mmkern.nn.RMSNormResidual(0)
    assert "dropout_p=0.1" in repr(mmkern.nn.LayerNormResidual(8, dropout_p=0.1))
