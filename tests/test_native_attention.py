"""The CUDA flash attention of mmkern._C (csrc/attention/), everything a machine without a GPU can check:
- the ops torch.ops.mmkern_C.attention_forward / attention_backward are registered with their schemas, with
  CUDA kernels in a CUDA build and no CPU kernel;
- the adapter (mmkern/native/attention.py) names every input it cannot take (one reason per unsupported
  feature), refuses CPU tensors, and `auto` dispatch then takes another backend;
- the ptxas report of the build: every attention kernel compiled for sm_80 and sm_90 with 0 bytes of spill
  stores, registers reported; and its SASS holds tensor-core instructions (HMMA) on both architectures.
The numerics run on a GPU: tests/test_cuda_attention.py (forward), tests/test_cuda_attention_backward.py.
"""
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mmkern
from mmkern import build, dispatch, native
from mmkern.native import attention as adapter
from mmkern.ops.attention import _FORWARD_ARGS
from mmkern.ops.attention_problem import build as build_problem
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


def test_mmkern_info_lists_the_attention_ops_on_the_cuda_and_cpu_backends():
    out = subprocess.run([sys.executable, "-m", "mmkern", "info"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("cuda "))
    ops_line = next(line for line in lines[start + 1:] if line.strip().startswith("ops:"))
    assert "attention_forward" in ops_line and "attention_backward" in ops_line
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("cpu "))
    ops_line = next(line for line in lines[start + 1:] if line.strip().startswith("ops:"))
    assert "attention_forward" in ops_line and "attention_backward" in ops_line and "kvcache_append" in ops_line


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
                  deterministic=False, block_table=None, leftpad_k=None, num_splits=0)
    inputs.update(changes)
    return inputs


def _forward_problem(**changes):
    """The AttentionProblem the op would build (unvalidated: fake CUDA tensors, varlen offsets unread)."""
    inputs = _forward_inputs(**changes)
    return build_problem("test", *(inputs[name] for name in _FORWARD_ARGS), validate=False)


def _backward_problem(**changes):
    p = _forward_problem(**changes)
    return p.with_gradients(dout=p.q, out=p.q, lse=None, dlse=None, attn_mask_needs_grad=False)


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
        reasons = adapter.forward_reasons(_forward_problem(**changes()))
    else:
        reasons = adapter.backward_reasons(_backward_problem(**changes()))
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
    assert adapter.forward_reasons(_forward_problem(**SUPPORTED[case])) == []
    assert adapter.backward_reasons(_backward_problem(**SUPPORTED[case])) == []


def test_top_left_causal_is_refused_when_it_differs_from_bottom_right(monkeypatch):
    monkeypatch.setattr(adapter, "missing_op_reasons", lambda *names, device=None: [])
    with_cache = _forward_problem(k=_fake_cuda(2, 17, 2, 64), causal=True, causal_bottom_right=False,
                                  seqused_k=_fake_cuda(2, dtype=torch.int32))
    assert any("top-left" in r for r in adapter.forward_reasons(with_cache))


def test_a_build_without_the_ops_is_a_reason(monkeypatch):
    """An extension that loads but registered no attention op (an older build): torch.ops.mmkern_C stands in as an
    empty namespace; the adapter asks native.missing_op_reasons for its own op, whose reason is the whole answer."""
    monkeypatch.setattr(native, "extension_reasons", lambda: [])
    monkeypatch.setattr(torch.ops, native.NAMESPACE, types.SimpleNamespace(), raising=False)
    for direction, reasons in (("forward", adapter.forward_reasons(_forward_problem())),
                               ("backward", adapter.backward_reasons(_backward_problem()))):
        assert reasons == [f"mmkern._C was built without mmkern_C::attention_{direction}; run `mmkern build`"], reasons


def test_cpu_tensors_are_refused_by_the_cuda_adapter_and_taken_by_the_cpu_kernels():
    q = torch.randn(1, 5, 2, 64, dtype=torch.float16)
    problem = _forward_problem(q=q, k=q, max_seqlen_q=5, max_seqlen_k=5)
    assert adapter.forward_reasons(problem) == [adapter.CUDA_ONLY]
    # each backend has its own adapter: the CUDA kernels' and the C++ CPU kernels' (mmkern/native/attention_cpu.py)
    for op in ("attention_forward", "attention_backward"):
        cuda_kernel, cpu_kernel = dispatch.backends()["cuda"].kernels[op], dispatch.backends()["cpu"].kernels[op]
        assert cuda_kernel.run is not cpu_kernel.run
    assert dispatch.not_supported_reasons("attention_forward", "cpu", problem) == []
    with mmkern.backend("cpu"):
        out = mmkern.flash_attn_func(q, q, q)       # the C++ CPU kernel
    assert out.shape == q.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------- the compiled kernels

# the architectures of this build: "80;90" by default (CI); scripts/gpu_check.sh builds for its GPU only
ARCHS = [f"sm_{a}" for a in build.cuda_archs()]


def _attention_records(stamp):  # noqa: F811
    return [r for r in stamp["ptxas"] if "/csrc/attention/" in r.get("source", "").replace(os.sep, "/")]


@needs_cuda_build
def test_every_attention_kernel_compiles_for_sm80_and_sm90_without_spills(stamp):  # noqa: F811
    assert stamp["cuda_archs"] == build.cuda_archs()
    records = _attention_records(stamp)
    for arch in ARCHS:
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
@pytest.mark.parametrize("arch", ARCHS)
def test_every_attention_kernel_runs_on_tensor_cores(stamp, arch):  # noqa: F811
    """The SASS of each attention kernel holds HMMA (mma.sync on the tensor cores), for both architectures."""
    sass = kernel_sass(str(native.find_build()[1]), arch)
    kernels = {r["kernel"] for r in _attention_records(stamp) if r["arch"] == arch
               and not any(word in r["kernel"] for word in NO_MATRIX_PRODUCT)}
    assert any("attention_forward_kernel" in name for name in kernels), kernels
    for name in kernels:
        assert name in sass, f"{name} has no {arch} SASS in the build"
        assert "HMMA" in sass[name], f"{name} ({arch}) has no tensor-core (HMMA) instruction"


# --------------------------------------------------------------------------- the index math, lane by lane
#
# No GPU runs here, so the kernel's index math is checked on a lane-level model of it: the shared-memory
# addresses come from the C++ helpers themselves (mma_primitives.cuh's swizzle / ldmatrix_*_offset, which are
# __host__ __device__, compiled here with nvcc as a host program); ldmatrix and mma.sync are modelled from the
# fragment layouts of the PTX ISA (stated in mma_primitives.cuh); the model follows attention_forward_kernel
# step by step (tile loads, S = Q K^T, masking, base-2 online softmax, P V, epilogue) and must reproduce
# attention. A change to the kernel's tiling or indexing must be mirrored here.

OFFSETS_PROGRAM = r"""
#include <cstdio>
#include "attention/mma_primitives.cuh"
using namespace mmkern::cuda::mma;
template <int RE> void dump() {
  for (int r0 = 0; r0 < 64; r0 += 16)
    for (int c0 = 0; c0 < RE; c0 += 16)
      for (int lane = 0; lane < 32; ++lane)
        std::printf("%d %d %d %d %d %d %d\n", RE, r0, c0, lane, ldmatrix_a_offset<RE>(r0, c0, lane),
                    ldmatrix_b_offset<RE>(r0, c0, lane), ldmatrix_bt_offset<RE>(r0, c0, lane));
  for (int row = 0; row < 64; ++row)
    for (int col = 0; col < RE; col += 8) std::printf("s %d %d %d %d\n", RE, row, col, swizzle<RE>(row, col));
}
int main() { dump<64>(); dump<128>(); }
"""


@pytest.fixture(scope="module")
def cpp_offsets(tmp_path_factory):
    """{"a"/"b"/"bt": {(RE, r0, c0): [32 lane offsets]}, "swizzle": {(RE, row, col): offset}} from the C++ helpers."""
    reason = build.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"nvcc is needed to compile the index helpers: {reason}")
    work = tmp_path_factory.mktemp("offsets")
    (work / "offsets.cu").write_text(OFFSETS_PROGRAM)
    nvcc = str(build.cuda_home() / "bin" / "nvcc")
    subprocess.run([nvcc, "-std=c++17", "-I", str(build.CSRC_DIR), str(work / "offsets.cu"), "-o",
                    str(work / "offsets")], check=True, capture_output=True)
    text = subprocess.run([str(work / "offsets")], check=True, capture_output=True, text=True).stdout
    table = {"a": {}, "b": {}, "bt": {}, "swizzle": {}}
    for line in text.splitlines():
        f = line.split()
        if f[0] == "s":
            table["swizzle"][tuple(map(int, f[1:4]))] = int(f[4])
            continue
        RE, r0, c0, lane, a, b, bt = map(int, f)
        for kind, value in (("a", a), ("b", b), ("bt", bt)):
            table[kind].setdefault((RE, r0, c0), [0] * 32)[lane] = value
    return table


def _unswizzle(RE, offset):
    row, within = divmod(offset, RE)
    return row, ((within // 8) ^ (row % 8)) * 8 + within % 8


@pytest.mark.parametrize("RE", [64, 128])
def test_ldmatrix_addresses_are_the_fragment_rows_and_free_of_bank_conflicts(cpp_offsets, RE):
    lanes = range(32)
    for (re, r0, c0), offsets in cpp_offsets["a"].items():
        if re != RE:
            continue
        # A (and P V's .trans B): lanes 0-15 rows r0.., column c0; lanes 16-31 the same rows, column c0 + 8
        assert [_unswizzle(RE, o) for o in offsets] == [(r0 + l % 16, c0 + (l // 16) * 8) for l in lanes]
        assert cpp_offsets["bt"][(re, r0, c0)] == offsets
        # Q K^T's B: matrices (keys n0..+7, k0), (n0..+7, k0+8), (n0+8.., k0), (n0+8.., k0+8)
        b = cpp_offsets["b"][(re, r0, c0)]
        assert [_unswizzle(RE, o) for o in b] == [(r0 + l % 8 + (l // 16) * 8, c0 + (l // 8) % 2 * 8) for l in lanes]
        for table in (offsets, b):
            for phase in range(4):          # one 8x8 matrix per phase: 8 rows of 16 bytes in 8 distinct bank groups
                assert len({(o * 2 // 16) % 8 for o in table[8 * phase: 8 * phase + 8]}) == 8
    rows = {}
    for (re, row, col), offset in cpp_offsets["swizzle"].items():
        if re == RE:
            assert row * RE <= offset < (row + 1) * RE and offset % 8 == 0
            rows.setdefault(row, set()).add(offset)
    assert all(len(offsets) == RE // 8 for offsets in rows.values())      # a permutation of the row's chunks


def _round(x, dtype):
    return torch.as_tensor(x, dtype=torch.float64).to(dtype).to(torch.float64)


class _LaneModel:
    """attention_forward_kernel for one (batch, head), lane by lane: 4 warps x 32 lanes, float64 arithmetic
    (the tensor cores' products are exact in fp32 for 16-bit inputs; the model keeps the roundings to the
    input dtype where the kernel has them: inputs, P, out)."""

    def __init__(self, offsets, D, dtype):
        self.off, self.D, self.dtype = offsets, D, dtype
        self.RE = (D + 63) // 64 * 64
        lane = torch.arange(32)
        self.g, self.t = lane // 4, lane % 4

    def load_tile(self, rows_src, row0, rows):
        smem = torch.full((64 * self.RE,), math.nan, dtype=torch.float64)     # unfilled = NaN: a read shows
        for r in range(64):
            for col in range(0, self.D, 8):
                o = self.off["swizzle"][(self.RE, r, col)]
                smem[o:o + 8] = rows_src[row0 + r, col:col + 8] if row0 + r < rows else 0.0
        return smem

    def ldmatrix(self, smem, offsets, trans=False):
        regs = torch.empty(32, 4, 2, dtype=torch.float64)
        g, t = self.g, self.t
        for i in range(4):
            m = torch.stack([smem[offsets[8 * i + r]: offsets[8 * i + r] + 8] for r in range(8)])
            if trans:
                m = m.T
            regs[:, i, 0], regs[:, i, 1] = m[g, 2 * t], m[g, 2 * t + 1]
        return regs

    def mma(self, d, a, b0, b1):
        g, t = self.g, self.t
        A, B, C = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64), \
            torch.zeros(16, 8, dtype=torch.float64)
        for j in range(2):
            A[g, 2 * t + j], A[g + 8, 2 * t + j] = a[:, 0, j], a[:, 1, j]
            A[g, 2 * t + 8 + j], A[g + 8, 2 * t + 8 + j] = a[:, 2, j], a[:, 3, j]
            B[2 * t + j, g], B[2 * t + 8 + j, g] = b0[:, j], b1[:, j]
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
        D = A @ B + C
        return torch.stack([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]], 1)

    def cta(self, q, k, v, m_block, causal, scale, out, lse):
        D, RE, g, t = self.D, self.RE, self.g, self.t
        q_len, k_len = q.shape[0], k.shape[0]
        m0, diagonal = m_block * 64, k_len - q_len
        n_blocks = (k_len + 63) // 64
        if causal:
            last_key = m0 + 63 + diagonal
            n_blocks = min(n_blocks, 0 if last_key < 0 else last_key // 64 + 1)
        o = torch.zeros(4, D // 8, 32, 4, dtype=torch.float64)
        row_max = torch.full((4, 2, 32), -math.inf, dtype=torch.float64)
        row_sum = torch.zeros(4, 2, 32, dtype=torch.float64)
        sQ = self.load_tile(q, m0, q_len)
        for j in range(n_blocks):
            sK, sV = self.load_tile(k, j * 64, k_len), self.load_tile(v, j * 64, k_len)
            n0 = j * 64
            needs_mask = n0 + 64 > k_len or (causal and n0 + 63 > m0 + diagonal)
            for w in range(4):
                s = torch.zeros(8, 32, 4, dtype=torch.float64)
                for ks in range(D // 16):
                    a = self.ldmatrix(sQ, self.off["a"][(RE, w * 16, ks * 16)])
                    for np_ in range(4):
                        b = self.ldmatrix(sK, self.off["b"][(RE, np_ * 16, ks * 16)])
                        s[2 * np_] = self.mma(s[2 * np_], a, b[:, 0], b[:, 1])
                        s[2 * np_ + 1] = self.mma(s[2 * np_ + 1], a, b[:, 2], b[:, 3])
                s = s * (scale * math.log2(math.e))
                if needs_mask:
                    for nb in range(8):
                        for c in range(4):
                            key = n0 + nb * 8 + 2 * t + (c & 1)
                            row = m0 + w * 16 + g + (c >> 1) * 8
                            s[nb, :, c] = torch.where((key >= k_len) | (causal & (key > row + diagonal)),
                                                      -math.inf, s[nb, :, c])
                for rr in range(2):
                    mx = torch.maximum(row_max[w, rr], s[:, :, 2 * rr:2 * rr + 2].amax(dim=(0, 2)))
                    mx = mx.view(8, 4).amax(1).repeat_interleave(4)                      # quad max
                    base = torch.where(mx == -math.inf, 0.0, mx)
                    alpha = torch.exp2(row_max[w, rr] - base)
                    row_max[w, rr] = mx
                    s[:, :, 2 * rr:2 * rr + 2] = torch.exp2(s[:, :, 2 * rr:2 * rr + 2] - base[None, :, None])
                    row_sum[w, rr] = row_sum[w, rr] * alpha + s[:, :, 2 * rr:2 * rr + 2].sum(dim=(0, 2))
                    o[w, :, :, 2 * rr:2 * rr + 2] *= alpha[None, :, None]
                for kk in range(4):
                    p = _round(s, self.dtype)
                    a = torch.stack([p[2 * kk][:, 0:2], p[2 * kk][:, 2:4], p[2 * kk + 1][:, 0:2],
                                     p[2 * kk + 1][:, 2:4]], 1)
                    for dp in range(D // 16):
                        b = self.ldmatrix(sV, self.off["bt"][(RE, kk * 16, dp * 16)], trans=True)
                        o[w, 2 * dp] = self.mma(o[w, 2 * dp], a, b[:, 0], b[:, 1])
                        o[w, 2 * dp + 1] = self.mma(o[w, 2 * dp + 1], a, b[:, 2], b[:, 3])
        for w in range(4):
            for rr in range(2):
                l = row_sum[w, rr].view(8, 4).sum(1).repeat_interleave(4)                  # quad sum
                inv = torch.where(l > 0, 1 / torch.where(l > 0, l, 1.0), 0.0)
                for lane in range(32):
                    row = m0 + w * 16 + int(g[lane]) + rr * 8
                    if row >= q_len:
                        continue
                    for db in range(D // 8):
                        col = db * 8 + 2 * int(t[lane])
                        out[row, col:col + 2] = _round(o[w, db, lane, 2 * rr:2 * rr + 2] * inv[lane], self.dtype)
                    if t[lane] == 0:
                        lse[row] = row_max[w, rr, lane] * math.log(2) + math.log(l[lane]) if l[lane] > 0 \
                            else -math.inf


@pytest.mark.parametrize("Lq,Lk,D,causal,dtype", [
    (17, 17, 64, False, torch.float16), (129, 129, 96, True, torch.bfloat16), (17, 129, 128, True, torch.float16),
    (100, 17, 64, True, torch.bfloat16), (5, 0, 96, False, torch.float16), (1, 200, 64, True, torch.float16)])
def test_the_lane_model_of_the_forward_kernel_computes_attention(cpp_offsets, Lq, Lk, D, causal, dtype):
    q, k, v = (_round(torch.randn(L, D, dtype=torch.float64), dtype) for L in (Lq, Lk, Lk))
    scale = D ** -0.5
    model = _LaneModel(cpp_offsets, D, dtype)
    out = torch.full((Lq, D), math.nan, dtype=torch.float64)
    lse = torch.full((Lq,), math.nan, dtype=torch.float64)
    for m_block in range((Lq + 63) // 64):
        model.cta(q, k, v, m_block, causal, scale, out, lse)
    assert not out.isnan().any() and not lse.isnan().any(), "an output the model (the kernel) never writes"
    with mmkern.backend("reference"):
        ref, ref_lse = mmkern.flash_attn_func(q[None, :, None], k[None, :, None], v[None, :, None], causal=causal,
                                              softmax_scale=scale, return_lse=True)
    ref, ref_lse = ref[0, :, 0], ref_lse[0, 0]
    # P and out are rounded to the dtype (as in the kernel): a few units in its last place of max |v|
    largest = max(v.abs().max().item() if v.numel() else 0.0, 1.0)
    assert (out - ref).abs().max().item() <= 4 * torch.finfo(dtype).eps * largest
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    if finite.any():    # the reference's lse is float32 (the ops' contract)
        err = (lse - ref_lse)[finite].abs().max().item()
        assert err <= 4 * torch.finfo(torch.float32).eps * max(ref_lse[finite].abs().max().item(), 1.0)
