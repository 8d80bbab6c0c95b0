"""The per-call cost of mmkern's op layer on the eager fast path: a tiny call through the public function
against the chosen backend's kernel called directly on a prepared problem record, side by side:

    public   mmkern.diffusion.add_noise (4x4x8x8) / mmkern.flash_attn_func (B1 L16 H2 D16) /
             mmkern.layer_norm_residual (4x64, prenorm, a decode-time norm), auto dispatch:
             argument normalisation, the problem record, the kernel; the metadata checks and the ranking of
             the backends run on the first call of a signature only (dispatch.call_memoized), the value
             checks (timesteps within the table) on every call
    public_unmemoized  the same with the per-signature memo emptied before every call: what each call cost
             before the memo (the checks and the ranking every time)
    kernel   the backend auto picks, its run(problem) on a record built beforehand: the kernel's own time
    torch    what a user would write instead (the eager formula / F.scaled_dot_product_attention / add + F.layer_norm)

The issue's goal on the 2-core CI machine: public - kernel <= 10 us. Host clock (device="cpu").
"""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern import dispatch

CALLS = ["add_noise", "attention", "layer_norm_residual"]
IMPLS = ["public", "public_unmemoized", "kernel", "torch"]


def _add_noise():
    x, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.randint(0, 1000, (4,))
    ac = torch.linspace(0.9999, 0.01, 1000)
    public = lambda: mmkern.diffusion.add_noise(x, noise, t, ac)  # noqa: E731
    problem = dispatch.problem("add_noise", samples=x, noise=noise, timesteps=t, alphas_cumprod=ac)

    def torch_formula():
        a = ac[t].view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * noise
    return public, "add_noise", problem, torch_formula


def _attention():
    q = torch.randn(1, 16, 2, 16)
    public = lambda: mmkern.flash_attn_func(q, q, q, causal=True)  # noqa: E731
    problem = dispatch.problem("attention_forward", q=q, k=q, v=q, softmax_scale=0.25, causal=True)
    qt = q.transpose(1, 2)
    return public, "attention_forward", problem, lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True)


def _layer_norm_residual():
    x, residual = torch.randn(4, 64), torch.randn(4, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    public = lambda: mmkern.layer_norm_residual(x, residual, weight, bias, prenorm=True)  # noqa: E731
    problem = dispatch.problem("norm_residual_forward", x=x, residual=residual, weight=weight, bias=bias, eps=1e-5,
                               dropout_p=0.0, dropout_seed=None, residual_in_fp32=False, is_rms_norm=False)

    def torch_formula():
        pre = x + residual
        return F.layer_norm(pre, (64,), weight, bias), pre
    return public, "norm_residual_forward", problem, torch_formula


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("impl", IMPLS)
def test_call_overhead(bench, benchmark, impl, call):
    benchmark.group = f"per-call overhead {call}"
    public, op, problem, torch_call = {"add_noise": _add_noise, "attention": _attention,
                                       "layer_norm_residual": _layer_norm_residual}[call]()
    if impl == "public":
        fn = public
    elif impl == "public_unmemoized":
        def fn():
            dispatch.forget_selections()       # every call a first call: the full checks and the ranking again
            return public()
    elif impl == "kernel":
        backend = dispatch.select(op, problem)
        benchmark.extra_info["backend"] = backend
        run = dispatch.backends()[backend].kernels[op].run
        fn = lambda: run(problem)  # noqa: E731
    else:
        fn = torch_call
    with torch.no_grad():
        bench(fn, device="cpu", op=call, impl=impl, series=f"overhead {call}", x=1, x_label="call",
              shape=call, dtype="float32")
