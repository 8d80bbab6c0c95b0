"""The CUDA flash attention of mmkern._C (csrc/attention/), everything a machine without a GPU can check:
- the ops torch.ops.mmkern_C.attention_forward / attention_backward are registered with their schemas, with
  CUDA kernels in a CUDA build and no CPU kernel;
- the adapter (mmkern/native/attention.py) names every input it cannot take (one reason per unsupported
  feature), refuses CPU tensors, and `auto` dispatch then takes another backend;
- the ptxas report of the build: every attention kernel compiled for sm_80 and sm_90 with 0 bytes of spill
  stores, registers reported; and its SASS holds tensor-core instructions (HMMA) on both architectures.
The numerics run on a GPU: tests/test_cuda_attention.py (forward), tests/test_cuda_attention_backward.py.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mmkern
from mmkern import build, dispatch, native
from mmkern.native import attention as adapter
from native_build_helpers import CUOBJDUMP_HINT, cuobjdump, kernel_sass
from test_native_build import extension, stamp  # noqa: F401  (module-scoped build fixtures)

CUDA_OPTED_OUT = os.environ.get("MMKERN_BUILD_CUDA") == "0"
needs_cuda_build = pytest.mark.skipif(CUDA_OPTED_OUT, reason="MMKERN_BUILD_CUDA=0: a CPU-only build was asked for")

FORWARD_SCHEMA = ("mmkern_C::attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, "
                  "Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
                  "bool causal) -> (Tensor out, Tensor lse)")
BACKWARD_SCHEMA = ("mmkern_C::attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                   "Tensor? dlse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, "
                   "int max_seqlen_k, float softmax_scale, bool causal, bool deterministic) "
                   "-> (Tensor dq, Tensor dk, Tensor dv)")


# --------------------------------------------------------------------------- registration

def test_the_ops_are_registered_with_their_schemas(extension):  # noqa: F811
    assert {"attention_forward", "attention_backward"} <= set(native.op_names())
    assert str(torch.ops.mmkern_C.attention_forward.default._schema) == FORWARD_SCHEMA
    assert str(torch.ops.mmkern_C.attention_backward.default._schema) == BACKWARD_SCHEMA


def test_there_is_no_cpu_kernel_and_cpu_tensors_are_refused_by_the_dispatcher(extension):  # noqa: F811
    for op in ("attention_forward", "attention_backward"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkern_C::{op}", "CPU")
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.mmkern_C.attention_forward(q, q, q, None, None, None, 8, 8, 0.125, False)


@needs_cuda_build
def test_cuda_kernels_are_registered(extension):  # noqa: F811
    assert build.cuda_unavailable_reason() is None, build.cuda_unavailable_reason()
    for op in ("attention_forward", "attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkern_C::{op}", "CUDA"), op
        assert native.missing_op_reasons(op, device="cuda") == []


def test_mmkern_info_lists_the_attention_ops_on_the_cuda_backend():
    out = subprocess.run([sys.executable, "-m", "mmkern", "info"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("cuda "))
    ops_line = next(line for line in lines[start + 1:] if line.strip().startswith("ops:"))
    assert "attention_forward" in ops_line and "attention_backward" in ops_line


# --------------------------------------------------------------------------- reasons

def _fake_cuda(*shape, dtype=torch.float16):
    """A tensor on a (fake) CUDA device: the reasons read metadata only, so no GPU is needed."""
    with FakeTensorMode():
        return torch.empty(*shape, dtype=dtype, device="cuda")


def _forward_inputs(**changes):
    q = changes.pop("q", None)
    q = q if q is not None else _fake_cuda(2, 17, 4, 64)
    k = changes.pop("k", None)
    k = k if k is not None else _fake_cuda(2, 23, 2, q.shape[-1], dtype=q.dtype)
    inputs = dict(q=q, k=k, v=k, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=17,
                  max_seqlen_k=23, softmax_scale=0.125, causal=False, causal_bottom_right=True, window_left=-1,
                  window_right=-1, softcap=0.0, alibi_slopes=None, attn_mask=None, dropout_p=0.0, dropout_seed=None,
                  deterministic=False)
    inputs.update(changes)
    return inputs


def _backward_inputs(**changes):
    f = _forward_inputs(**changes)
    inputs = {name: f[name] for name in f}
    inputs.update(dout=f["q"], out=f["q"], lse=None, dlse=None, attn_mask_needs_grad=False)
    return inputs


# feature -> (changed inputs, words its reason must contain)
UNSUPPORTED = {
    "float32": (lambda: dict(q=_fake_cuda(2, 17, 4, 64, dtype=torch.float32)), "float32"),
    "head_dim 80": (lambda: dict(q=_fake_cuda(2, 17, 4, 80)), "head_dim 80"),
    "head_dim 256": (lambda: dict(q=_fake_cuda(2, 17, 4, 256)), "head_dim 256"),
    "dropout": (lambda: dict(dropout_p=0.1), "dropout"),
    "softcap": (lambda: dict(softcap=30.0), "softcap"),
    "window": (lambda: dict(window_left=8, window_right=0), "window"),
    "alibi": (lambda: dict(alibi_slopes=_fake_cuda(4, dtype=torch.float32)), "ALiBi"),
    "attn_mask": (lambda: dict(attn_mask=_fake_cuda(2, 4, 17, 23)), "attn_mask"),
    "causal top-left": (lambda: dict(causal=True, causal_bottom_right=False), "top-left"),
}


@pytest.mark.parametrize("feature", list(UNSUPPORTED))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_each_unsupported_feature_names_itself(feature, direction, monkeypatch):
    monkeypatch.setattr(adapter, "missing_op_reasons", lambda *names, device=None: [])   # judge the features alone
    changes, words = UNSUPPORTED[feature]
    if direction == "forward":
        reasons = adapter.forward_reasons(**_forward_inputs(**changes()))
    else:
        reasons = adapter.backward_reasons(**_backward_inputs(**changes()))
    assert len(reasons) >= 1 and any(words in r for r in reasons), reasons


SUPPORTED = {
    "dense GQA": {},
    "bf16 D96 MQA": dict(q=_fake_cuda(2, 17, 4, 96, dtype=torch.bfloat16),
                         k=_fake_cuda(2, 23, 1, 96, dtype=torch.bfloat16)),
    "D128 causal": dict(q=_fake_cuda(2, 17, 4, 128), k=_fake_cuda(2, 23, 2, 128), causal=True),
    "causal top-left with Lq == Lk (the same mask)": dict(k=_fake_cuda(2, 17, 2, 64), causal=True,
                                                          causal_bottom_right=False),
    "causal with a window that is no window": dict(causal=True, window_right=0),
    "varlen": dict(q=_fake_cuda(30, 4, 64), k=_fake_cuda(47, 2, 64), cu_seqlens_q=_fake_cuda(4, dtype=torch.int32),
                   cu_seqlens_k=_fake_cuda(4, dtype=torch.int32)),
    "seqused_k": dict(seqused_k=_fake_cuda(2, dtype=torch.int32), causal=True),
}


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_supported_inputs_have_no_feature_reasons(case, monkeypatch):
    monkeypatch.setattr(adapter, "missing_op_reasons", lambda *names, device=None: [])
    assert adapter.forward_reasons(**_forward_inputs(**SUPPORTED[case])) == []
    assert adapter.backward_reasons(**_backward_inputs(**SUPPORTED[case])) == []


def test_top_left_causal_is_refused_when_it_differs_from_bottom_right(monkeypatch):
    monkeypatch.setattr(adapter, "missing_op_reasons", lambda *names, device=None: [])
    with_cache = _forward_inputs(k=_fake_cuda(2, 17, 2, 64), causal=True, causal_bottom_right=False,
                                 seqused_k=_fake_cuda(2, dtype=torch.int32))
    assert any("top-left" in r for r in adapter.forward_reasons(**with_cache))


def test_a_build_without_the_ops_is_a_reason(monkeypatch):
    monkeypatch.setattr(native, "extension_reasons", lambda: [])
    monkeypatch.setattr(native, "op_names", lambda: [])
    real = native.missing_op_reasons
    monkeypatch.setattr(adapter, "missing_op_reasons",
                        lambda *names, device=None: real(*(f"{n}_not_built" for n in names), device=device))
    reasons = adapter.forward_reasons(**_forward_inputs())
    assert reasons and "mmkern._C was built without mmkern_C::attention_forward_not_built" in reasons[0]


def test_cpu_tensors_are_refused_and_auto_takes_another_backend():
    q = torch.randn(1, 5, 2, 64, dtype=torch.float16)
    inputs = _forward_inputs(q=q, k=q, max_seqlen_q=5, max_seqlen_k=5)
    assert adapter.forward_reasons(**inputs) == [adapter.CUDA_ONLY]
    assert adapter.CUDA_ONLY in dispatch.not_supported_reasons("attention_forward", "cpu", q.device, inputs)
    assert dispatch.select("attention_forward", q.device, inputs) not in ("cpu", "cuda")
    out = mmkern.flash_attn_func(q, q, q)       # runs on whichever backend took it
    assert out.shape == q.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------- the compiled kernels

def _attention_records(stamp):  # noqa: F811
    return [r for r in stamp["ptxas"] if "/csrc/attention/" in r.get("source", "").replace(os.sep, "/")]


@needs_cuda_build
def test_every_attention_kernel_compiles_for_sm80_and_sm90_without_spills(stamp):  # noqa: F811
    records = _attention_records(stamp)
    for arch in ("sm_80", "sm_90"):
        names = [r["kernel"] for r in records if r["arch"] == arch]
        # the forward: {fp16, bf16} x head dim {64, 96, 128}
        forward = [n for n in names if "attention_forward_kernel" in n]
        assert len(forward) == 6, (arch, names)
    spills = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spills, spills
    assert all(r["registers"] is not None and r["registers"] <= 255 for r in records), records


# kernels without a matrix product: the backward's preprocessing delta = rowsum(dO * O) (- dlse) is elementwise
NO_MATRIX_PRODUCT = ("attention_bwd_delta_kernel",)


@needs_cuda_build
@pytest.mark.skipif(cuobjdump() is None, reason=CUOBJDUMP_HINT)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_attention_kernel_runs_on_tensor_cores(stamp, arch):  # noqa: F811
    """The SASS of each attention kernel holds HMMA (mma.sync on the tensor cores), for both architectures."""
    sass = kernel_sass(str(native.find_build()[1]), arch)
    kernels = {r["kernel"] for r in _attention_records(stamp) if r["arch"] == arch
               and not any(word in r["kernel"] for word in NO_MATRIX_PRODUCT)}
    assert any("attention_forward_kernel" in name for name in kernels), kernels
    for name in kernels:
        assert name in sass, f"{name} has no {arch} SASS in the build"
        assert "HMMA" in sass[name], f"{name} ({arch}) has no tensor-core (HMMA) instruction"
