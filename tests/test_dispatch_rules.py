"""Dispatch that looks at the inputs (mmkern/dispatch.py: RULES, auto_order), mmkern.explain, and what
dispatch_log records."""
from types import SimpleNamespace

import pytest
import torch

import mmkern
from mmkern import dispatch


def _problem(Lq=1, requires_grad=False, **kwargs):
    q = torch.randn(2, Lq, 4, 64, requires_grad=requires_grad)
    k = torch.randn(2, 40, 2, 64)
    return dispatch.problem("attention_forward", q=q, k=k, v=k, **kwargs)


def _on_cuda(problem):
    """The same facts, as if on a GPU (the rule reads device and decode_shaped only)."""
    return SimpleNamespace(device=torch.device("cuda", 0), decode_shaped=problem.decode_shaped)


def test_decode_shapes_on_a_gpu_try_triton_before_the_cuda_kernel():
    decode = _on_cuda(_problem(Lq=1))
    assert dispatch.auto_order("attention_forward", decode)[:2] == ("triton", "cuda")
    assert dispatch.auto_order("attention_forward", _on_cuda(_problem(Lq=16)))[0] == "triton"


@pytest.mark.parametrize("why,changes", [
    ("prefill", dict(Lq=17)),
    ("training", dict(requires_grad=True)),
    ("dropout", dict(dropout_p=0.1)),
])
def test_other_shapes_keep_the_default_order(why, changes):
    assert dispatch.auto_order("attention_forward", _on_cuda(_problem(**changes))) == dispatch.PRIORITY


def test_decode_on_a_cpu_keeps_the_default_order():
    assert dispatch.auto_order("attention_forward", _problem(Lq=1)) == dispatch.PRIORITY
    assert dispatch.PRIORITY.index("torch") < dispatch.PRIORITY.index("reference")


def test_the_backward_keeps_the_default_order():
    assert dispatch.auto_order("attention_backward", _on_cuda(_problem(Lq=1))) == dispatch.PRIORITY


def test_explain_lists_every_backend_with_its_reasons_and_auto_s_choice():
    q = torch.randn(1, 5, 2, 8)
    explanation = mmkern.explain(mmkern.flash_attn_func, q, q, q, softcap=3.0)
    (decision,) = explanation.decisions
    assert decision.op == "attention_forward"
    assert list(decision.verdicts) == [n for n in dispatch.auto_order("attention_forward", decision.problem)
                                       if n in dispatch.backends()]
    assert any("softcap" in r for r in decision.verdicts["torch"])
    assert decision.verdicts["reference"] == []
    assert decision.auto == next(n for n, r in decision.verdicts.items() if not r)
    assert decision.ran == decision.auto
    assert explanation.result.shape == q.shape
    text = str(explanation)
    assert f"auto takes {decision.auto}" in text and "softcap" in text


def test_explain_inside_a_forced_backend_says_what_ran_and_what_auto_would_take():
    x = torch.randn(3, 8)
    with mmkern.backend("reference"):
        explanation = mmkern.explain(mmkern.layer_norm_residual, x, None, None, None)
    (decision,) = explanation.decisions
    assert decision.ran == "reference"
    assert decision.auto == next(n for n, r in decision.verdicts.items() if not r)


def test_explain_of_a_backward_records_both_directions():
    q = torch.randn(1, 5, 2, 8, requires_grad=True)
    explanation = mmkern.explain(lambda: mmkern.flash_attn_func(q, q, q, causal=True).sum().backward())
    assert [d.op for d in explanation.decisions] == ["attention_forward", "attention_backward"]
    assert explanation.decisions[1].problem.dout is not None


def test_dispatch_log_keeps_the_problem_of_each_call():
    q = torch.randn(2, 3, 4, 16)
    k = torch.randn(2, 9, 2, 16)
    with mmkern.dispatch_log() as log:
        mmkern.flash_attn_func(q, k, k, causal=True)
    (problem,) = log.problems
    assert log.calls[0][0] == "attention_forward"
    assert (problem.batch, problem.heads, problem.kv_heads, problem.head_dim, problem.group) == (2, 4, 2, 16, 2)
    assert (problem.seqlen_q, problem.seqlen_k, problem.right, problem.lse_shape) == (3, 9, 0, (2, 4, 3))
    assert problem.decode_shaped and not problem.varlen


def _cpu_backward(dtype, Lk):
    q = torch.randn(1, 8, 2, 32, dtype=dtype)
    k = torch.randn(1, Lk, 2, 32, dtype=dtype)
    problem = dispatch.problem("attention_forward", q=q, k=k, v=k)
    return problem.with_gradients(q, q, torch.zeros(1, 2, 8), None, False)


@pytest.mark.parametrize("hardware", [True, False], ids=["bf16-hardware", "no-bf16-hardware"])
def test_a_long_bf16_cpu_backward_tries_torch_first_where_the_cpu_multiplies_bf16(hardware, monkeypatch):
    """torch's CPU flash backward has oneDNN's bf16 GEMMs (2.5x the float32 rate with AVX-512 BF16 / AMX); the
    C++ kernels multiply in float32. Short keys, other dtypes, the forward and CPUs without bf16 hardware keep
    the default order (the C++ kernels first)."""
    monkeypatch.setattr(dispatch, "cpu_has_bf16_matmul", lambda: hardware)
    long_bf16 = dispatch.auto_order("attention_backward", _cpu_backward(torch.bfloat16, 512))
    assert long_bf16 == (("torch", *[b for b in dispatch.PRIORITY if b != "torch"]) if hardware else dispatch.PRIORITY)
    for problem in (_cpu_backward(torch.bfloat16, 511), _cpu_backward(torch.float32, 4096),
                    _cpu_backward(torch.float16, 4096)):
        assert dispatch.auto_order("attention_backward", problem) == dispatch.PRIORITY
    q = torch.randn(1, 8, 2, 32, dtype=torch.bfloat16)
    k = torch.randn(1, 4096, 2, 32, dtype=torch.bfloat16)
    assert dispatch.auto_order("attention_forward", dispatch.problem("attention_forward", q=q, k=k, v=k)) \
        == dispatch.PRIORITY
