"""Every op is a real torch operator: opcheck (schema, fake tensors, autograd registration, AOT
dispatch with dynamic shapes) and torch.compile(fullgraph=True) of every public function."""
import math

import pytest
import torch

import mmkern
from conftest import max_abs_err, randn

ops = torch.ops.mmkern


def _seed():
    return torch.tensor([1234], dtype=torch.int64)


def attention_forward_cases():
    q, k, v = randn(2, 5, 4, 8, requires_grad=True), randn(2, 7, 2, 8, requires_grad=True), \
        randn(2, 7, 2, 8, requires_grad=True)
    dense = (q, k, v, None, None, None, 0, 0, 0.3, True, True, 3, -1, 0.5, torch.rand(4), None, 0.0, None, False)
    dropout = (q, k, v, None, None, None, 0, 0, 0.3, False, True, -1, -1, 0.0, None, None, 0.2, _seed(), False)
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    qv, kv = randn(7, 4, 8, requires_grad=True), randn(7, 2, 8, requires_grad=True)
    varlen = (qv, kv, kv.detach().clone().requires_grad_(), cu, cu, None, 4, 4, 0.3, True, True, -1, -1, 0.0,
              None, None, 0.0, None, False)
    mask = randn(2, 4, 5, 7, requires_grad=True)
    masked = (q, k, v, None, None, None, 0, 0, 0.3, False, False, -1, -1, 0.0, None, mask, 0.0, None, False)
    kvcache = (q.detach(), k.detach(), v.detach(), None, None, torch.tensor([3, 6], dtype=torch.int32), 0, 0, 0.3,
               True, True, -1, -1, 0.0, None, None, 0.0, None, False)
    pages, table = randn(5, 16, 2, 8), torch.tensor([[4, 1], [0, 3]], dtype=torch.int32)
    paged = (q.detach(), pages, pages.clone(), None, None, torch.tensor([17, 30], dtype=torch.int32), 0, 0, 0.3, True,
             True, -1, -1, 0.0, None, None, 0.0, None, False, table, torch.tensor([2, 0], dtype=torch.int32), 3)
    return {"dense": dense, "dropout": dropout, "varlen": varlen, "masked": masked, "kvcache": kvcache,
            "paged leftpad num_splits": paged}


@pytest.mark.parametrize("case", list(attention_forward_cases()))
def test_opcheck_attention_forward(case):
    torch.library.opcheck(ops.attention_forward, attention_forward_cases()[case])


def test_opcheck_attention_backward():
    q, k, v = randn(2, 5, 4, 8), randn(2, 7, 2, 8), randn(2, 7, 2, 8)
    mask = randn(2, 4, 5, 7)
    out, lse = ops.attention_forward(q, k, v, None, None, None, 0, 0, 0.3, False, False, -1, -1, 0.0, None, mask,
                                     0.1, _seed(), False)
    args = (randn(*out.shape), q, k, v, out, lse, randn(*lse.shape), None, None, None, 0, 0, 0.3, False, False, -1,
            -1, 0.0, None, mask, 0.1, _seed(), True, True)
    torch.library.opcheck(ops.attention_backward, args)


def test_opcheck_kvcache_append():
    args = (randn(2, 9, 2, 8), randn(2, 9, 2, 8), randn(2, 3, 2, 8), randn(2, 3, 2, 8),
            torch.tensor([0, 6], dtype=torch.int32))
    torch.library.opcheck(ops.kvcache_append, args)


def test_opcheck_kvcache_append_paged():
    args = (randn(5, 16, 2, 8), randn(5, 16, 2, 8), randn(2, 3, 2, 8), randn(2, 3, 2, 8),
            torch.tensor([14, 0], dtype=torch.int32), torch.tensor([[4, 1], [0, 3]], dtype=torch.int32))
    torch.library.opcheck(ops.kvcache_append, args)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck_norm(rms, dropout):
    x, r = randn(6, 10, requires_grad=True), randn(6, 10, requires_grad=True)
    w, b = randn(10, requires_grad=True), (None if rms else randn(10, requires_grad=True))
    seed = _seed() if dropout else None
    torch.library.opcheck(ops.norm_residual_forward, (x, r, w, b, 1e-5, dropout, seed, False, rms))
    with torch.no_grad():
        out, pre, mean, rstd = ops.norm_residual_forward(x, r, w, b, 1e-5, dropout, seed, False, rms)
    w, b = w.detach(), None if b is None else b.detach()
    torch.library.opcheck(ops.norm_residual_backward, (randn(6, 10), randn(6, 10), pre, w, b, mean, rstd, 1e-5,
                                                       dropout, seed, rms, True, torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["reference", "triton"])
@pytest.mark.parametrize("rms", [False, True])
def test_opcheck_norm_modulation(dtype, rms):
    """adaLN shift/scale (batch=2 over 6 rows); float32 runs the Triton kernels (interpreter on CPU)."""
    x, r = randn(6, 10, dtype=dtype, requires_grad=True), randn(6, 10, dtype=dtype, requires_grad=True)
    w, b = randn(10, dtype=dtype, requires_grad=True), (None if rms else randn(10, dtype=dtype, requires_grad=True))
    shift, scale = randn(2, 10, dtype=dtype, requires_grad=True), randn(2, 10, dtype=dtype, requires_grad=True)
    args = (x, r, w, b, 1e-5, 0.2, _seed(), False, rms, shift, scale)
    torch.library.opcheck(ops.norm_residual_forward, args)
    with torch.no_grad():
        out, pre, mean, rstd = ops.norm_residual_forward(*args)
    torch.library.opcheck(ops.norm_residual_backward, (randn(6, 10, dtype=dtype), None, pre, w.detach(),
                                                       None if b is None else b.detach(), mean, rstd, 1e-5, 0.2,
                                                       _seed(), rms, True, dtype, shift.detach(), scale.detach()))


@pytest.mark.parametrize("name", ["add_noise", "get_velocity"])
def test_opcheck_diffusion(name):
    ac = torch.linspace(0.99, 0.01, 20)
    args = (randn(3, 2, 5, requires_grad=True), randn(3, 2, 5, requires_grad=True), torch.tensor([0, 7, 19]), ac)
    torch.library.opcheck(getattr(ops, name), args)


def _diffusion_step_cases():
    ac, t, prev = torch.linspace(0.99, 0.01, 20), torch.tensor([0, 7, 19]), torch.tensor([-1, 5, 17])
    mo, s, n = randn(3, 2, 5), randn(3, 2, 5), randn(3, 2, 5)
    sigmas = torch.cat([torch.linspace(5.0, 0.1, 6), torch.zeros(1)])
    return {
        "loss": (ops.diffusion_loss, (randn(3, 2, 5, requires_grad=True), randn(3, 2, 5, requires_grad=True),
                                      randn(3, 2, 5, requires_grad=True), t, ac, "v_prediction", 5.0)),
        "loss_backward": (ops.diffusion_loss_backward, (torch.tensor(0.7, dtype=torch.float64), mo, s, n, t, ac, "epsilon", 0.0)),
        "ddpm": (ops.ddpm_step, (mo, s, t, prev, ac, n, "epsilon", "fixed_small", 1.0, 0.0, 1.0)),
        "ddpm_learned_threshold": (ops.ddpm_step, (randn(3, 4, 5), s, t, prev, ac, n, "v_prediction",
                                                   "learned_range", 0.0, 0.9, 2.0)),
        "ddim": (ops.ddim_step, (mo, s, t, prev, ac, 1.0, 0.5, n, "sample", 1.0, 0.0, 1.0, True)),
        "euler": (ops.euler_step, (mo, s, torch.tensor([0, 2, 5]), sigmas, n, "epsilon", 0.2, 0.0, math.inf, 1.0)),
        "euler_scale": (ops.euler_scale_model_input, (s, torch.tensor(3), sigmas)),
        "euler_add_noise": (ops.euler_add_noise, (randn(3, 2, 5, requires_grad=True),
                                                  randn(3, 2, 5, requires_grad=True), torch.tensor([0, 2, 6]), sigmas)),
    }


@pytest.mark.parametrize("case", list(_diffusion_step_cases()))
def test_opcheck_diffusion_loss_and_steps(case):
    op, args = _diffusion_step_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck_rotary_embedding(varlen):
    cos, sin = randn(12, 3), randn(12, 3)
    if varlen:
        args = (randn(9, 2, 10, requires_grad=True), cos, sin, torch.tensor([2, 0, 1]),
                torch.tensor([0, 4, 4, 9], dtype=torch.int32), 0, 5, True, False)
    else:
        args = (randn(2, 5, 3, 8, requires_grad=True), cos, sin, None, None, 4, 0, False, True)
    torch.library.opcheck(ops.rotary_embedding, args)


# --------------------------------------------------------------------------- torch.compile

def _public_calls():
    q, k, v = randn(2, 6, 4, 8), randn(2, 6, 2, 8), randn(2, 6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    ac = torch.linspace(0.99, 0.01, 10)
    x, r, w, b = randn(3, 16), randn(3, 16), randn(16), randn(16)
    return {
        "flash_attn_func": (lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=True, window_size=(2, -1),
                                                                    softcap=1.0, return_lse=True), (q, k, v)),
        "flash_attn_varlen_func": (lambda q, k, v, cu: mmkern.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4),
                                   (q[0], k[0], v[0], cu)),
        "flash_attn_with_kvcache": (lambda q, kc, vc, kn, vn: mmkern.flash_attn_with_kvcache(
            q, kc, vc, kn, vn, cache_seqlens=torch.tensor([1, 3], dtype=torch.int32), causal=True),
            (q[:, :2], randn(2, 8, 2, 8), randn(2, 8, 2, 8), randn(2, 2, 2, 8), randn(2, 2, 2, 8))),
        "scaled_dot_product_attention": (lambda q, k, v, m: mmkern.scaled_dot_product_attention(
            q, k, v, attn_mask=m, enable_gqa=True), (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     randn(6, 6))),
        "layer_norm_residual": (lambda x, r, w, b: mmkern.layer_norm_residual(x, r, w, b, prenorm=True),
                                (x, r, w, b)),
        "rms_norm_residual": (lambda x, r, w: mmkern.rms_norm_residual(x, r, w), (x, r, w)),
        "layer_norm_residual modulation": (lambda x, r, s: mmkern.layer_norm_residual(x, r, modulation=(s, -s)),
                                           (x, r, randn(3, 16))),
        "LayerNormResidual module": (mmkern.nn.LayerNormResidual(16, prenorm=True).double(), (x, r)),
        "add_noise": (lambda x, n, t, ac: mmkern.diffusion.add_noise(x, n, t, ac), (x, r, torch.tensor([0, 4, 9]), ac)),
        "get_velocity": (lambda x, n, t, ac: mmkern.diffusion.get_velocity(x, n, t, ac),
                         (x, r, torch.tensor([0, 4, 9]), ac)),
        "training_target": (lambda x, n, t, ac: mmkern.diffusion.training_target(x, n, t, ac, "v_prediction"),
                            (x, r, torch.tensor([0, 4, 9]), ac)),
        "diffusion_loss": (lambda m, x, n, t, ac: mmkern.diffusion.diffusion_loss(m, x, n, t, ac, "v_prediction", 5.0),
                           (b.expand(3, 16).clone(), x, r, torch.tensor([0, 4, 9]), ac)),
        "ddpm_step": (lambda m, s, n, t, ac: mmkern.diffusion.ddpm_step(m, t, s, ac, noise=n, clip_sample=True),
                      (b.expand(3, 16).clone(), x, r, torch.tensor([0, 4, 9]), ac)),
        "ddim_step": (lambda m, s, n, t, ac: mmkern.diffusion.ddim_step(m, t, s, ac, t - 2, eta=1.0, noise=n,
                                                                        thresholding=True),
                      (b.expand(3, 16).clone(), x, r, torch.tensor([2, 4, 9]), ac)),
        "euler_step": (lambda m, s, n, i, sig: mmkern.diffusion.euler_step(m, i, s, sig, noise=n, s_churn=1.0),
                       (b.expand(3, 16).clone(), x, r, torch.tensor([0, 4, 8]), torch.linspace(9.0, 0.0, 10))),
        "euler_scale_model_input": (lambda s, i, sig: mmkern.diffusion.euler_scale_model_input(s, i, sig),
                                    (x, torch.tensor([0, 4, 9]), torch.linspace(9.0, 0.0, 10))),
        "euler_add_noise": (lambda x, n, i, sig: mmkern.diffusion.euler_add_noise(x, n, i, sig),
                            (x, r, torch.tensor([0, 4, 9]), torch.linspace(9.0, 0.0, 10))),
        "apply_rotary_emb": (lambda q, c, s, o: mmkern.apply_rotary_emb(q, c, s, seqlen_offsets=o),
                             (q, randn(9, 3), randn(9, 3), torch.tensor([0, 3], dtype=torch.int32))),
        "apply_rotary_emb varlen": (lambda q, c, s, cu: mmkern.apply_rotary_emb(q, c, s, True, cu_seqlens=cu,
                                                                                max_seqlen=4), (q[0], randn(9, 4),
                                                                                                randn(9, 4), cu)),
    }


@pytest.mark.parametrize("name", list(_public_calls()))
def test_compile_fullgraph(name):
    fn, args = _public_calls()[name]
    torch._dynamo.reset()
    eager_args = [a.clone() for a in args]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    eager = fn(*eager_args)
    for c, e in zip(*(t if isinstance(t, tuple) else (t,) for t in (compiled, eager))):
        assert max_abs_err(c, e) < 1e-12


def test_compile_training_step_with_inductor():
    """One forward + backward through attention and norm with the default (inductor) backend."""
    x = randn(2, 5, 16, dtype=torch.float32, requires_grad=True)
    w = randn(16, dtype=torch.float32, requires_grad=True)

    def step(x, w):
        h = mmkern.layer_norm_residual(x, weight=w)
        q = h.view(2, 5, 2, 8)
        return mmkern.flash_attn_func(q, q, q, causal=True).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(x, w)
    loss.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    step(x, w).backward()
    assert max_abs_err(gx, x.grad) < 1e-4 and max_abs_err(gw, w.grad) < 1e-4
