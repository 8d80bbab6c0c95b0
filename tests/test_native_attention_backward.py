"""The CUDA flash attention backward of mmkern._C (csrc/attention/attention_backward*.cu*), everything a machine
without a GPU can check:
- the ptxas report of the build: its three kernels (delta, dK/dV, dQ) for {fp16, bf16} x head dims {64, 96, 128}
  on sm_80 and sm_90, 0 bytes of spill stores or loads, registers reported;
- their SASS: HMMA (mma.sync on the tensor cores), LDSM (ldmatrix, .trans included) and LDGSTS (cp.async) in the
  two matrix kernels, on both architectures; the dynamic shared memory of each tiling fits the architecture;
- a lane-level model of the two matrix kernels reproduces the float64 attention gradients: the shared-memory
  addresses and the tile sizes come from the C++ header itself (a_offset / b_offset / Tiles<D> are __host__
  __device__, compiled here by nvcc into a host program); ldmatrix (.trans) and mma.sync m16n8k16 are modelled
  from the fragment layouts of the PTX ISA (stated in mma_primitives.cuh); the model walks the tiles, masks,
  reuses accumulators as A fragments and writes the outputs the way attention_bwd_dkdv_kernel and
  attention_bwd_dq_kernel do. A change to the kernels' tiling or indexing must be mirrored here.
The numerics on a GPU: tests/test_cuda_attention_backward.py.
"""
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from mmkern import build, native
from native_build_helpers import CUOBJDUMP_HINT, cuobjdump, kernel_sass
from test_native_build import extension, stamp  # noqa: F401  (module-scoped build fixtures)

CUDA_OPTED_OUT = os.environ.get("MMKERN_BUILD_CUDA") == "0"
needs_cuda_build = pytest.mark.skipif(CUDA_OPTED_OUT, reason="MMKERN_BUILD_CUDA=0: a CPU-only build was asked for")

KERNELS = ("attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")
MATRIX_KERNELS = KERNELS[1:]
MAX_DYNAMIC_SMEM = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}      # per block, with the opt-in


def _backward_records(stamp):  # noqa: F811
    return [r for r in stamp["ptxas"] if "attention_bwd_" in r["kernel"]]


@needs_cuda_build
def test_backward_kernels_compile_for_sm80_and_sm90_without_spills(stamp):  # noqa: F811
    records = _backward_records(stamp)
    for arch in ("sm_80", "sm_90"):
        for kernel in KERNELS:
            names = [r["kernel"] for r in records if r["arch"] == arch and kernel in r["kernel"]]
            assert len(names) == 6, (arch, kernel, names)      # {fp16, bf16} x head dim {64, 96, 128}
    report = "\n".join(f"{r['arch']} {r['kernel']}: {r['registers']} registers, spill stores {r['spill_stores']}, "
                       f"loads {r['spill_loads']}" for r in records)
    assert not [r for r in records if r["spill_stores"] or r["spill_loads"]], report
    assert all(r["registers"] is not None and r["registers"] <= 255 for r in records), report


@needs_cuda_build
@pytest.mark.skipif(cuobjdump() is None, reason=CUOBJDUMP_HINT)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_backward_matrix_kernels_run_on_tensor_cores(stamp, arch):  # noqa: F811
    """HMMA (mma.sync), LDSM and LDSM .trans (ldmatrix), LDGSTS (cp.async) in the SASS of every dK/dV and dQ
    kernel."""
    sass = kernel_sass(str(native.find_build()[1]), arch)
    names = {r["kernel"] for r in _backward_records(stamp) if r["arch"] == arch
             and any(k in r["kernel"] for k in MATRIX_KERNELS)}
    assert len(names) == 12, names
    for name in names:
        assert name in sass, f"{name} has no {arch} SASS in the build"
        for instruction in ("HMMA", "LDSM", "LDSM.16.MT88", "LDGSTS"):
            assert instruction in sass[name], f"{name} ({arch}) has no {instruction}"


# --------------------------------------------------------------------------- the C++ index helpers, on the host

OFFSETS_PROGRAM = r"""
#include <cstdio>
#include "attention/attention_backward_kernel.cuh"
using namespace mmkern::attention::bwd;
template <int D> void dump() {
  using T = Tiles<D>;
  std::printf("tiles %d %d %d %d %d %d %d %d\n", D, T::kStride, T::kDkdvN, T::kDkdvM, T::kDqM, T::kDqN,
              T::kDkdvSmem, T::kDqSmem);
  for (int r0 = 0; r0 < 64; r0 += 8)
    for (int c0 = 0; c0 < D; c0 += 8)
      for (int lane = 0; lane < 32; ++lane)
        std::printf("%d %d %d %d %d %d\n", D, r0, c0, lane, a_offset<T::kStride>(r0, c0, lane),
                    b_offset<T::kStride>(r0, c0, lane));
}
int main() { std::printf("warps %d\n", kWarps); dump<64>(); dump<96>(); dump<128>(); }
"""


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    """{"warps": n, "tiles": {D: dict}, "a"/"b": {(D, r0, c0): [32 lane offsets]}} from the C++ header."""
    reason = build.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"nvcc is needed to compile the index helpers: {reason}")
    work = tmp_path_factory.mktemp("bwd_offsets")
    (work / "offsets.cu").write_text(OFFSETS_PROGRAM)
    nvcc = str(build.cuda_home() / "bin" / "nvcc")
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-I", str(build.CSRC_DIR), str(work / "offsets.cu"), "-o",
                    str(work / "offsets")], check=True, capture_output=True)
    text = subprocess.run([str(work / "offsets")], check=True, capture_output=True, text=True).stdout
    table = {"tiles": {}, "a": {}, "b": {}}
    for line in text.splitlines():
        f = line.split()
        if f[0] == "warps":
            table["warps"] = int(f[1])
        elif f[0] == "tiles":
            D, *values = map(int, f[1:])
            table["tiles"][D] = dict(zip(("stride", "dkdv_n", "dkdv_m", "dq_m", "dq_n", "dkdv_smem", "dq_smem"),
                                         values))
        else:
            D, r0, c0, lane, a, b = map(int, f)
            table["a"].setdefault((D, r0, c0), [0] * 32)[lane] = a
            table["b"].setdefault((D, r0, c0), [0] * 32)[lane] = b
    return table


@pytest.mark.parametrize("D", [64, 96, 128])
def test_the_tilings_fit_shared_memory_and_the_warps(cpp, D):
    t = cpp["tiles"][D]
    for arch, limit in MAX_DYNAMIC_SMEM.items():
        assert t["dkdv_smem"] <= limit and t["dq_smem"] <= limit, (arch, t)
    # K, V once + two buffers of (Q, dO, lse, delta); Q, dO once + two buffers of (K, V)
    assert t["dkdv_smem"] == 2 * 2 * t["dkdv_n"] * t["stride"] + 2 * (2 * 2 * t["dkdv_m"] * t["stride"] + 8 * t["dkdv_m"])
    assert t["dq_smem"] == 2 * 2 * t["dq_m"] * t["stride"] + 2 * 2 * 2 * t["dq_n"] * t["stride"]
    assert t["dkdv_n"] == 16 * cpp["warps"] and t["dq_m"] == 16 * cpp["warps"]        # 16 rows per warp
    assert t["dkdv_m"] % 16 == 0 and t["dq_n"] % 16 == 0 and t["stride"] % 8 == 0     # k16 steps, 16-byte rows


@pytest.mark.parametrize("D", [64, 96, 128])
def test_ldmatrix_rows_hit_every_bank_group_once(cpp, D):
    """The 8 row addresses of each 8x8 matrix of one ldmatrix lie in 8 different 16-byte bank groups (no bank
    conflicts) and are 16-byte aligned."""
    for kind in ("a", "b"):
        for (d, r0, c0), offsets in cpp[kind].items():
            if d != D or c0 % 16:
                continue
            for matrix in range(4):
                byte_addresses = [2 * o for o in offsets[8 * matrix: 8 * matrix + 8]]
                assert all(a % 16 == 0 for a in byte_addresses)
                assert len({a // 16 % 8 for a in byte_addresses}) == 8, (kind, D, r0, c0, matrix)


# --------------------------------------------------------------------------- the lane-level model

LANE = np.arange(32)
G, T = LANE // 4, LANE % 4          # groupID, threadID_in_group


def _ldmatrix_x4(smem, offsets, trans=False):
    """4 registers x 32 lanes x 2 elements: matrix i's rows at the addresses of lanes 8i..8i+7."""
    regs = []
    for i in range(4):
        rows = np.asarray(offsets[8 * i: 8 * i + 8])
        if trans:       # lane gets rows 2t, 2t+1 of column g
            regs.append(np.stack([smem[rows[2 * T] + G], smem[rows[2 * T + 1] + G]], 1))
        else:           # lane gets row g, columns 2t, 2t+1
            regs.append(np.stack([smem[rows[G] + 2 * T], smem[rows[G] + 2 * T + 1]], 1))
    return regs


def _mma(c, a, b0, b1):
    """c (32 lanes, 4) += A (16x16 from a0..a3) B (16x8 from b0, b1), fragment layouts of mma.m16n8k16."""
    A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for j in range(2):
        A[G, 2 * T + j], A[G + 8, 2 * T + j] = a[0][:, j], a[1][:, j]
        A[G, 2 * T + 8 + j], A[G + 8, 2 * T + 8 + j] = a[2][:, j], a[3][:, j]
        B[2 * T + j, G], B[2 * T + 8 + j, G] = b0[:, j], b1[:, j]
        C[G, 2 * T + j], C[G + 8, 2 * T + j] = c[:, j], c[:, 2 + j]
    D = A @ B + C
    out = np.empty((32, 4))
    for j in range(2):
        out[:, j], out[:, 2 + j] = D[G, 2 * T + j], D[G + 8, 2 * T + j]
    return out


def _half(x):
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def _as_a(acc, kc):
    """The C fragments of n8 tiles 2kc, 2kc+1, rounded to 16 bits: the A fragment of k-step kc."""
    lo, hi = acc[2 * kc], acc[2 * kc + 1]
    return [_half(lo[:, 0:2]), _half(lo[:, 2:4]), _half(hi[:, 0:2]), _half(hi[:, 2:4])]


class Problem:
    """One backward call: per sequence b, q/dO rows (Lq_b, H, D), k/v rows (Lk_b, H_kv, D), lse and delta (H, Lq_b)
    in float64 (fp16-representable operands), and the autograd gradients to compare with."""

    def __init__(self, q_lens, k_lens, H, H_kv, D, causal, seqused=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.H, self.H_kv, self.D, self.causal, self.scale = H, H_kv, D, causal, 1 / math.sqrt(D)
        self.has_seqused = seqused is not None
        self.seqs, self.want = [], []
        for b, (lq, lk) in enumerate(zip(q_lens, k_lens)):
            q, dout = (torch.randn(lq, H, D, generator=g).half().double() for _ in range(2))
            k, v = (torch.randn(lk, H_kv, D, generator=g).half().double() for _ in range(2))
            used = lk if seqused is None else seqused[b]
            leaves = [t.clone().requires_grad_() for t in (q, k[:used], v[:used])]
            kk, vv = (t.repeat_interleave(H // H_kv, 1) for t in leaves[1:])
            s = torch.einsum("ihd,jhd->hij", leaves[0], kk) * self.scale
            if causal:
                s = s.masked_fill(torch.arange(used)[None, :] > torch.arange(lq)[:, None] + used - lq, -math.inf)
            lse = torch.logsumexp(s, -1)
            seen = torch.isfinite(lse)
            p = torch.where(seen[..., None], torch.exp(s - torch.where(seen, lse, 0)[..., None]), 0)
            out = torch.einsum("hij,jhd->ihd", p, vv)
            out.backward(dout)
            delta = (out * dout).sum(-1).T.detach()
            grads = [t.grad for t in leaves]
            dk, dv = (torch.cat([gr, torch.zeros(lk - used, H_kv, D, dtype=torch.float64)]) for gr in grads[1:])
            self.seqs.append(dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), do=dout.numpy(), lse=lse.detach().numpy(),
                                  delta=delta.numpy(), q_len=lq, k_len=used))
            self.want.append((grads[0].numpy(), dk.numpy(), dv.numpy()))


def _tile(rows, length, row0, n_rows, stride, D):
    """A padded shared tile [n_rows][stride] of rows row0.. of a (len, D) operand; zero past `length`."""
    smem = np.zeros(n_rows * stride)
    for r in range(n_rows):
        if row0 + r < length:
            smem[r * stride: r * stride + D] = rows[row0 + r]
    return smem


def _probabilities(s_acc, dp_acc, rows, cols, seq, lse, delta, causal, scale):
    """P and dS = P (dP - delta) in place, elementwise on fragments; rows/cols/lse/delta per fragment element."""
    align = seq["k_len"] - seq["q_len"]
    seen = (rows < seq["q_len"]) & (cols < seq["k_len"]) & ((not causal) | (cols <= rows + align)) & (lse != -np.inf)
    with np.errstate(all="ignore"):
        p = np.where(seen, np.exp2(s_acc * scale * math.log2(math.e) - lse * math.log2(math.e)), 0.0)
    return p, p * (dp_acc - delta)


def _dkdv_block(cpp, prob, b, kv_head, n_tile, dk_out, dv_out):
    D, seq = prob.D, prob.seqs[b]
    t = cpp["tiles"][D]
    S, BN, BM, group = t["stride"], t["dkdv_n"], t["dkdv_m"], prob.H // prob.H_kv
    a_off, b_off = (lambda r0, c0: cpp["a"][(D, r0, c0)]), (lambda r0, c0: cpp["b"][(D, r0, c0)])
    n0 = n_tile * BN
    if n0 >= seq["k_len"]:
        return
    align = seq["k_len"] - seq["q_len"]
    m_lo = max(0, n0 - align) // BM * BM if prob.causal else 0
    m_tiles = -(-(seq["q_len"] - m_lo) // BM) if seq["q_len"] > m_lo else 0
    sK = _tile(seq["k"][:, kv_head], seq["k_len"], n0, BN, S, D)
    sV = _tile(seq["v"][:, kv_head], seq["k_len"], n0, BN, S, D)
    for warp in range(cpp["warps"]):
        dk, dv = np.zeros((D // 8, 32, 4)), np.zeros((D // 8, 32, 4))
        keys = np.stack([n0 + warp * 16 + G] * 2 + [n0 + warp * 16 + G + 8] * 2, 1)       # (32, 4) per element
        for step in range(m_tiles * group):
            head, m0 = kv_head * group + step // m_tiles, m_lo + (step % m_tiles) * BM
            sQ = _tile(seq["q"][:, head], seq["q_len"], m0, BM, S, D)
            sdO = _tile(seq["do"][:, head], seq["q_len"], m0, BM, S, D)
            lse = np.array([seq["lse"][head, m0 + r] if m0 + r < seq["q_len"] else 0.0 for r in range(BM)])
            delta = np.array([seq["delta"][head, m0 + r] if m0 + r < seq["q_len"] else 0.0 for r in range(BM)])
            st, dpt = np.zeros((BM // 8, 32, 4)), np.zeros((BM // 8, 32, 4))
            for kk in range(D // 16):                       # S^T = K Q^T, dP^T = V dO^T
                ak, av = _ldmatrix_x4(sK, a_off(warp * 16, kk * 16)), _ldmatrix_x4(sV, a_off(warp * 16, kk * 16))
                for nt in range(0, BM // 8, 2):
                    bq, bdo = _ldmatrix_x4(sQ, b_off(nt * 8, kk * 16)), _ldmatrix_x4(sdO, b_off(nt * 8, kk * 16))
                    st[nt], st[nt + 1] = _mma(st[nt], ak, bq[0], bq[1]), _mma(st[nt + 1], ak, bq[2], bq[3])
                    dpt[nt], dpt[nt + 1] = _mma(dpt[nt], av, bdo[0], bdo[1]), _mma(dpt[nt + 1], av, bdo[2], bdo[3])
            for nt in range(BM // 8):
                r = nt * 8 + 2 * T[:, None] + np.array([0, 1, 0, 1])[None, :]       # query row in the tile
                st[nt], dpt[nt] = _probabilities(st[nt], dpt[nt], m0 + r, keys, seq, lse[r], delta[r], prob.causal,
                                                 prob.scale)
            for kc in range(BM // 16):                      # dV += P^T dO, dK += dS^T Q
                ap, ads = _as_a(st, kc), _as_a(dpt, kc)
                for dt in range(0, D // 8, 2):
                    bdo = _ldmatrix_x4(sdO, a_off(kc * 16, dt * 8), trans=True)
                    bq = _ldmatrix_x4(sQ, a_off(kc * 16, dt * 8), trans=True)
                    dv[dt], dv[dt + 1] = _mma(dv[dt], ap, bdo[0], bdo[1]), _mma(dv[dt + 1], ap, bdo[2], bdo[3])
                    dk[dt], dk[dt + 1] = _mma(dk[dt], ads, bq[0], bq[1]), _mma(dk[dt + 1], ads, bq[2], bq[3])
        for dt in range(D // 8):
            for lane in range(32):
                col = dt * 8 + 2 * T[lane]
                for key, j in ((keys[lane, 0], 0), (keys[lane, 2], 2)):
                    if key < seq["k_len"]:
                        dk_out[key, kv_head, col:col + 2] = dk[dt][lane, j:j + 2] * prob.scale
                        dv_out[key, kv_head, col:col + 2] = dv[dt][lane, j:j + 2]


def _dq_block(cpp, prob, b, head, m_tile, dq_out):
    D, seq = prob.D, prob.seqs[b]
    t = cpp["tiles"][D]
    S, BM, BN, kv_head = t["stride"], t["dq_m"], t["dq_n"], head // (prob.H // prob.H_kv)
    a_off, b_off = (lambda r0, c0: cpp["a"][(D, r0, c0)]), (lambda r0, c0: cpp["b"][(D, r0, c0)])
    m0 = m_tile * BM
    if m0 >= seq["q_len"]:
        return
    n_hi = seq["k_len"]
    if prob.causal:
        n_hi = max(0, min(n_hi, min(m0 + BM, seq["q_len"]) + seq["k_len"] - seq["q_len"]))
    sQ = _tile(seq["q"][:, head], seq["q_len"], m0, BM, S, D)
    sdO = _tile(seq["do"][:, head], seq["q_len"], m0, BM, S, D)
    for warp in range(cpp["warps"]):
        rows = np.stack([m0 + warp * 16 + G] * 2 + [m0 + warp * 16 + G + 8] * 2, 1)       # (32, 4) per element
        valid = rows < seq["q_len"]
        lse = np.where(valid, seq["lse"][head, np.minimum(rows, max(seq["q_len"] - 1, 0))], -np.inf)
        delta = np.where(valid, seq["delta"][head, np.minimum(rows, max(seq["q_len"] - 1, 0))], 0.0)
        dq = np.zeros((D // 8, 32, 4))
        for step in range(-(-n_hi // BN)):
            n0 = step * BN
            sK = _tile(seq["k"][:, kv_head], seq["k_len"], n0, BN, S, D)
            sV = _tile(seq["v"][:, kv_head], seq["k_len"], n0, BN, S, D)
            sc, dp = np.zeros((BN // 8, 32, 4)), np.zeros((BN // 8, 32, 4))
            for kk in range(D // 16):                       # S = Q K^T, dP = dO V^T
                aq, ado = _ldmatrix_x4(sQ, a_off(warp * 16, kk * 16)), _ldmatrix_x4(sdO, a_off(warp * 16, kk * 16))
                for nt in range(0, BN // 8, 2):
                    bk, bv = _ldmatrix_x4(sK, b_off(nt * 8, kk * 16)), _ldmatrix_x4(sV, b_off(nt * 8, kk * 16))
                    sc[nt], sc[nt + 1] = _mma(sc[nt], aq, bk[0], bk[1]), _mma(sc[nt + 1], aq, bk[2], bk[3])
                    dp[nt], dp[nt + 1] = _mma(dp[nt], ado, bv[0], bv[1]), _mma(dp[nt + 1], ado, bv[2], bv[3])
            for nt in range(BN // 8):
                cols = n0 + nt * 8 + 2 * T[:, None] + np.array([0, 1, 0, 1])[None, :]
                _, dp[nt] = _probabilities(sc[nt], dp[nt], rows, cols, seq, lse, delta, prob.causal, prob.scale)
            for kc in range(BN // 16):                      # dQ += dS K
                ads = _as_a(dp, kc)
                for dt in range(0, D // 8, 2):
                    bk = _ldmatrix_x4(sK, a_off(kc * 16, dt * 8), trans=True)
                    dq[dt], dq[dt + 1] = _mma(dq[dt], ads, bk[0], bk[1]), _mma(dq[dt + 1], ads, bk[2], bk[3])
        for dt in range(D // 8):
            for lane in range(32):
                col = dt * 8 + 2 * T[lane]
                for row, j in ((rows[lane, 0], 0), (rows[lane, 2], 2)):
                    if row < seq["q_len"]:
                        dq_out[row, head, col:col + 2] = dq[dt][lane, j:j + 2] * prob.scale


MODEL_CASES = {
    # name: (q_lens, k_lens, H, H_kv, D, causal, seqused)
    "GQA 2/1 causal 70x33 (rows without keys) D96": ([70], [33], 2, 1, 96, True, None),
    "varlen 5/0/40/3 x 7/9/0/70 GQA 4/2 causal D64": ([5, 0, 40, 3], [7, 9, 0, 70], 4, 2, 64, True, None),
    "seqused_k 50/3 of 80, 9 queries, causal D128": ([9, 9], [80, 80], 2, 1, 128, True, [50, 3]),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_the_lane_model_of_the_kernels_gives_the_attention_gradients(cpp, name):
    q_lens, k_lens, H, H_kv, D, causal, seqused = MODEL_CASES[name]
    prob = Problem(q_lens, k_lens, H, H_kv, D, causal, seqused)
    t = cpp["tiles"][D]
    for b, seq in enumerate(prob.seqs):
        got = [np.full_like(w, np.nan) for w in prob.want[b]]      # poisoned: what no kernel writes stays NaN
        for kv_head in range(H_kv):
            for n_tile in range(-(-max(k_lens) // t["dkdv_n"])):
                _dkdv_block(cpp, prob, b, kv_head, n_tile, got[1], got[2])
        for head in range(H):
            for m_tile in range(-(-max(q_lens) // t["dq_m"])):
                _dq_block(cpp, prob, b, head, m_tile, got[0])
        # keys past seqused_k: no kernel may write them (k_len is capped by seqused_k); their gradient, 0, comes from
        # the host, which allocates dk/dv with at::zeros when seqused_k is given (test_the_host_zeroes_dk_dv_...)
        for label, g in zip(("dk", "dv"), got[1:]):
            assert np.isnan(g[seq["k_len"]:]).all(), f"{label} of sequence {b}: a kernel wrote keys past seqused_k"
            if prob.has_seqused:
                g[seq["k_len"]:] = 0.0
        for label, g, w in zip(("dq", "dk", "dv"), got, prob.want[b]):
            assert not np.isnan(g).any(), f"{label} of sequence {b}: elements never written"
            scale = max(np.abs(w).max() if w.size else 0.0, 1e-3)
            # P and dS enter the second products rounded to fp16 (as in the kernels): ~1e-3 relative
            assert np.abs(g - w).max(initial=0.0) <= 2e-3 * scale, f"{label} of sequence {b}"


def test_the_host_zeroes_dk_dv_only_when_seqused_k_is_given():
    """The kernels write dk/dv of keys < k_len only (k_len capped by seqused_k): the keys past seqused_k get their
    zero gradient from the host's allocation, which the lane-model test applies after the kernels ran. Read from
    attention_backward.cu, so that the model cannot keep zeros the host stopped giving (the values themselves:
    tests/test_cuda_attention_backward.py, on a GPU)."""
    source = (build.CSRC_DIR / "attention" / "attention_backward.cu").read_text()
    for name in ("dq", "dk", "dv"):
        allocations = [line.strip() for line in source.splitlines() if line.strip().startswith(f"at::Tensor {name} =")]
        assert len(allocations) == 1, (name, allocations)
        if name == "dq":
            assert allocations[0] == "at::Tensor dq = at::empty(q.sizes(), q.options());", allocations
        else:
            src = "k" if name == "dk" else "v"
            assert allocations[0] == (f"at::Tensor {name} = used.defined() ? at::zeros({src}.sizes(), {src}.options()) "
                                      f": at::empty({src}.sizes(), {src}.options());"), allocations
