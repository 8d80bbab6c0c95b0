"""The `torch` backend's attention (mmkern/torch_backend/attention.py: torch's CPU flash attention plus the
masks, alignment, GQA, varlen and numerics it lacks) against the float64 oracle, with flash-attn's criterion
per output and per gradient, in every dtype, at awkward shapes; its refusals; and the never-slower rule's
mechanics: without the extension and without the interpreter, CPU attention auto-dispatches to it."""
import math
import subprocess
import sys

import pytest
import torch

import mmkern
from conftest import DTYPES, assert_backend_matches_oracle, forced
from mmkern import dispatch, verify


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _dense_case(name, B, Lq, Lk, H, H_kv, D, with_lse=True, **kwargs):
    slopes = kwargs.pop("alibi", None)

    def make():
        inputs = dict(q=_randn(B, Lq, H, D), k=_randn(B, Lk, H_kv, D), v=_randn(B, Lk, H_kv, D))
        if slopes == "heads":
            inputs["slopes"] = torch.rand(H, dtype=torch.float32)
        elif slopes == "batch_heads":
            inputs["slopes"] = torch.rand(B, H, dtype=torch.float32)
        return inputs

    def run(q, k, v, slopes=None):
        out = mmkern.flash_attn_func(q, k, v, alibi_slopes=slopes, return_lse=with_lse, **kwargs)
        return out if with_lse else (out,)

    return verify.Case(f"torch {name}", f"B{B} Lq{Lq} Lk{Lk} H{H}/{H_kv} D{D}", make, run, cast=("q", "k", "v"),
                       grad=("q", "k", "v"), outputs=("out", "lse") if with_lse else ("out",))


DENSE = {
    "plain D8": dict(B=2, Lq=9, Lk=9, H=2, H_kv=2, D=8),
    "causal Lq<Lk D40": dict(B=2, Lq=7, Lk=19, H=4, H_kv=2, D=40, causal=True),
    "causal Lq>Lk (empty rows) D72": dict(B=1, Lq=13, Lk=6, H=2, H_kv=1, D=72, causal=True),
    "causal square D64": dict(B=2, Lq=17, Lk=17, H=3, H_kv=3, D=64, causal=True),
    "window D24": dict(B=2, Lq=15, Lk=21, H=2, H_kv=2, D=24, window_size=(3, 2)),
    "empty window rows": dict(B=1, Lq=12, Lk=4, H=2, H_kv=2, D=16, window_size=(0, 0)),
    "alibi heads causal": dict(B=2, Lq=11, Lk=14, H=4, H_kv=1, D=16, causal=True, alibi="heads"),
    "alibi batch heads": dict(B=2, Lq=10, Lk=10, H=2, H_kv=2, D=96, alibi="batch_heads"),
    "scale": dict(B=1, Lq=5, Lk=8, H=6, H_kv=1, D=160, softmax_scale=0.31),
    "length 1": dict(B=3, Lq=1, Lk=1, H=2, H_kv=2, D=256),
    "no keys": dict(B=2, Lq=4, Lk=0, H=2, H_kv=2, D=8),
    "no queries": dict(B=2, Lq=0, Lk=5, H=2, H_kv=2, D=8),
    "empty batch": dict(B=0, Lq=5, Lk=5, H=2, H_kv=2, D=8),
}


@pytest.mark.parametrize("with_lse", [False, True], ids=["kernel-backward", "exact-backward"])
@pytest.mark.parametrize("name", DENSE)
def test_flash_attn_func_on_torch_matches_oracle(name, with_lse):
    """Without lse the backward is torch's kernel; a gradient arriving on lse takes the written-out one."""
    assert_backend_matches_oracle("torch", _dense_case(name, with_lse=with_lse, **DENSE[name]), DTYPES)


def test_varlen_on_torch_matches_oracle():
    lens_q, lens_k, H, H_kv, D = [3, 0, 9, 1], [5, 4, 0, 7], 4, 2, 40
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)

    def run(q, k, v, slopes):
        return mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q) + 1, max(lens_k), causal=True,
                                             window_size=(4, -1), alibi_slopes=slopes, return_lse=True)

    case = verify.Case("torch varlen causal window alibi", f"lens_q {lens_q} lens_k {lens_k}",
                       lambda: dict(q=_randn(sum(lens_q), H, D), k=_randn(sum(lens_k), H_kv, D),
                                    v=_randn(sum(lens_k), H_kv, D), slopes=torch.rand(4, H)),
                       run, cast=("q", "k", "v"), grad=("q", "k", "v"), outputs=("out", "lse"))
    assert_backend_matches_oracle("torch", case, DTYPES)


@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_on_torch_matches_oracle(causal):
    B, L_cache, H, H_kv, D = 3, 20, 4, 2, 64
    seqlens = torch.tensor([0, 7, 18], dtype=torch.int32)

    def run(q, k_cache, v_cache, k, v):
        out = mmkern.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal,
                                             return_lse=True)
        return (*out, k_cache, v_cache)

    case = verify.Case(f"torch kvcache causal={causal}", f"B{B} cache {L_cache} +2 H{H}/{H_kv} D{D}",
                       lambda: dict(q=_randn(B, 2, H, D), k_cache=_randn(B, L_cache, H_kv, D),
                                    v_cache=_randn(B, L_cache, H_kv, D), k=_randn(B, 2, H_kv, D),
                                    v=_randn(B, 2, H_kv, D)),
                       run, cast=("q", "k_cache", "v_cache", "k", "v"), outputs=("out", "lse", "k_cache", "v_cache"))
    assert_backend_matches_oracle("torch", case, DTYPES)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal top-left"])
def test_sdpa_on_torch_matches_oracle(mask_kind):
    B, H, Lq, Lk, D = 2, 4, 9, 13, 24
    torch.manual_seed(3)
    keep = torch.rand(B, 1, Lq, Lk) > 0.4
    keep[0, 0, 2] = False                       # a row that sees no key

    def make():
        inputs = dict(q=_randn(B, H, Lq, D), k=_randn(B, 1, Lk, D), v=_randn(B, 1, Lk, D))
        if mask_kind == "float":
            inputs["mask"] = _randn(B, 1, Lq, Lk).masked_fill(~keep, float("-inf"))
        return inputs

    def run(q, k, v, mask=None):
        if mask_kind == "bool":
            mask = keep
        return (mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask_kind.startswith("causal"),
                                                    enable_gqa=True),)

    cast = ("q", "k", "v", "mask") if mask_kind == "float" else ("q", "k", "v")
    case = verify.Case(f"torch sdpa {mask_kind}", f"B{B} H{H}/1 Lq{Lq} Lk{Lk} D{D}", make, run, cast=cast,
                       grad=("q", "k", "v"))
    assert_backend_matches_oracle("torch", case, DTYPES)


# --------------------------------------------------------------------------- the numerics contract

@pytest.mark.parametrize("dtype", DTYPES)
def test_numerics_contract_on_torch(dtype):
    """Row 0 sees no key (out 0, lse -inf), row 1 has a NaN score (NaN, NaN), row 2 a +inf score (NaN, +inf),
    row 3 only -inf mask entries but one (a normal row)."""
    B, H, L, D = 1, 2, 6, 16
    q, k, v = (torch.randn(B, H, L, D).to(dtype) for _ in range(3))
    mask = torch.zeros(B, H, L, L, dtype=dtype)
    mask[..., 0, :] = float("-inf")
    mask[..., 2, 3] = float("inf")
    mask[..., 3, :5] = float("-inf")
    q[0, :, 1, 0] = float("nan")
    with forced("torch"):
        out = mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out_f, lse = mmkern.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            return_lse=True)
    assert (out[:, :, 0] == 0).all()
    assert torch.isnan(out[:, :, 1]).all() and torch.isnan(out[:, :, 2]).all()
    torch.testing.assert_close(out[:, :, 3].float(), v[:, :, 5].float(), rtol=0, atol=0)
    assert torch.isnan(lse[:, :, 1]).all() and torch.isfinite(lse[:, :, 0]).all()
    assert torch.isnan(out_f[:, 1]).all()
    # through the problem record, the lse of the masked call
    problem = dispatch.problem("attention_forward", q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2),
                               attn_mask=mask, causal_bottom_right=False)
    _, lse_masked = mmkern.torch_backend.attention.forward(problem)
    assert (lse_masked[:, :, 0] == float("-inf")).all()
    assert torch.isnan(lse_masked[:, :, 1]).all()
    assert (lse_masked[:, :, 2] == float("inf")).all()


# --------------------------------------------------------------------------- refusals

def _reasons(**kwargs):
    q = torch.randn(1, 4, 2, 8, dtype=kwargs.pop("dtype", torch.float32))
    problem = dispatch.problem("attention_forward", q=q, k=q, v=q, **kwargs)
    return dispatch.not_supported_reasons("attention_forward", "torch", problem)


def test_torch_attention_names_what_it_does_not_take():
    assert _reasons() == []
    assert any("dropout" in r and "seed" in r for r in _reasons(dropout_p=0.1))
    assert any("softcap" in r for r in _reasons(softcap=3.0))
    assert any("float64" in r for r in _reasons(dtype=torch.float64))
    q = torch.randn(1, 4, 2, 8)
    backward = dispatch.problem("attention_backward", q=q, k=q, v=q, dout=q, out=q, lse=torch.zeros(1, 2, 4),
                                dlse=torch.zeros(1, 2, 4))
    assert dispatch.not_supported_reasons("attention_backward", "torch", backward) == []


def test_dropout_and_softcap_fall_back_to_the_reference_under_auto():
    q = torch.randn(1, 4, 2, 8)
    problem = dispatch.problem("attention_forward", q=q, k=q, v=q, softcap=2.0)
    order = [n for n in dispatch.auto_order("attention_forward", problem)
             if not dispatch.not_supported_reasons("attention_forward", n, problem)]
    assert "torch" not in order and order[-1] == "reference"


# --------------------------------------------------------------------------- the never-slower rule

_NO_EXTENSION_NO_INTERPRETER = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, mmkern
from mmkern import native
native._state.clear(); native._state["reason"] = "no extension (test)"
mmkern.dispatch.forget_environment()
q, k, v = torch.randn(2, 33, 4, 40), torch.randn(2, 20, 2, 40), torch.randn(2, 20, 2, 40)
slopes = torch.rand(4)
calls = {
    "dense": lambda: mmkern.flash_attn_func(q, k, v),
    "causal bottom-right": lambda: mmkern.flash_attn_func(q, k, v, causal=True),
    "window": lambda: mmkern.flash_attn_func(q, k, v, window_size=(5, 1)),
    "alibi": lambda: mmkern.flash_attn_func(q, k, v, alibi_slopes=slopes),
    "bf16": lambda: mmkern.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True),
    "fp16": lambda: mmkern.flash_attn_func(q.half(), k.half(), v.half()),
    "sdpa causal": lambda: mmkern.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2),
                                                              q.transpose(1, 2), is_causal=True),
    "sdpa bool mask": lambda: mmkern.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=torch.rand(33, 20) > 0.5, enable_gqa=True),
    "kvcache": lambda: mmkern.flash_attn_with_kvcache(q[:, :1], k.clone(), v.clone(),
                                                      cache_seqlens=torch.tensor([3, 20], dtype=torch.int32)),
    "varlen": lambda: mmkern.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 10, 33], dtype=torch.int32),
                                                    torch.tensor([0, 0, 20], dtype=torch.int32), 23, 20),
}
print("available", *mmkern.available_backends())
for name, call in calls.items():
    ran = {d.op: d.ran for d in mmkern.explain(call).decisions}
    print(f"{name}: {ran.get('attention_forward')}")
qg = q.clone().requires_grad_()
with mmkern.dispatch_log() as log:
    mmkern.flash_attn_func(qg, k, v, causal=True).sum().backward()
print("backward", sorted(log.backends("attention_backward")))
"""


def test_cpu_attention_without_extension_or_interpreter_auto_dispatches_to_torch():
    """With neither the built extension nor TRITON_INTERPRET, every attention call SDPA can express (no dropout,
    no softcap) runs on `torch`, never on the float64 reference (28-48x slower here)."""
    done = subprocess.run([sys.executable, "-c", _NO_EXTENSION_NO_INTERPRETER], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    available, *calls, backward = done.stdout.strip().splitlines()
    assert available == "available torch reference", available
    assert len(calls) == 10 and all(line.endswith(": torch") for line in calls), calls
    assert backward == "backward ['torch']", backward
