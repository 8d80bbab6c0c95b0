"""Triton split-KV decode path (mmkern/triton/attention_decode.py) against the float64 oracle, with
flash-attn's criterion (mmkern.verify.measure), outputs poisoned with NaN before every run; its
dispatch rule; the backward's delta kernel; O(L) memory up to 128k keys.

Through the interpreter the split count is min(4, key tiles) (attention_split_kv.decode_splits), so these
shapes run 2..4 splits, some empty (short cache_seqlens, causal, window)."""
import math

import pytest
import torch

import mmkern
from typing import NamedTuple

from mmkern.triton import attention as A
from mmkern.triton import attention_split_kv as S
from mmkern.verify import Case
from conftest import assert_backend_matches_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Shape(NamedTuple):
    """The facts of an AttentionProblem that decode_splits and _delta read, without tensors (128k-key shapes)."""
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seqlen_q: int
    seqlen_k: int
    max_seqlen_q: int
    max_seqlen_k: int
    varlen: bool
    num_splits: int = 0         # the caller's (0 = choose)


def r(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


class Spy:
    """Stands in for a Triton kernel: records each launch's grid and tensor arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            self.launches.append((grid, [t.numel() for t in tensors]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every output and partial buffer the launchers allocate starts as NaN; count split-KV launches."""
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(A, "new_output", nan_output)
    spy = Spy(A.attention_decode_split_kernel)
    monkeypatch.setattr(A, "attention_decode_split_kernel", spy)
    return spy


def _check(case, spy, split=True):
    assert_backend_matches_oracle("triton", case)
    assert bool(spy.launches) == split, f"split-KV path {'not ' if split else ''}taken"
    if split:
        assert all(grid[0] >= 2 for grid, _ in spy.launches)


# (Lq, L_cache, new tokens, H, H_kv, D, cache_seqlens, features): Lq 1/3/16, head dims 40/80/256,
# MQA/GQA (up to 40 packed rows: three row chunks), empty and full caches, every decode feature.
KVCACHE = {
    "lq1 d40 mqa causal": (1, 301, 1, 4, 1, 40, [0, 300, 117], dict(causal=True)),
    "lq3 d80 gqa window softcap": (3, 260, 2, 4, 2, 80, [258, 0, 129], dict(window_size=(70, 1), softcap=2.5)),
    "lq16 d256 gqa alibi causal": (16, 130, 0, 2, 1, 256, [130, 17, 0], dict(causal=True, alibi="bh")),
    "lq5 d40 gqa8 all": (5, 261, 3, 8, 1, 40, [258, 3, 200],
                          dict(causal=True, window_size=(100, 0), softcap=3.0, alibi="h")),
}


@pytest.mark.parametrize("name", list(KVCACHE))
def test_kvcache_split_kv(name, poisoned):
    Lq, L_cache, L_new, H, H_kv, D, seqlens, features = KVCACHE[name]
    B = len(seqlens)
    kw = dict(features)
    if kw.pop("alibi", None) is not None:
        kw["alibi_slopes"] = torch.rand((B, H) if features["alibi"] == "bh" else (H,), device=DEVICE)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)

    def make():
        inputs = dict(q=r(B, Lq, H, D), kc=r(B, L_cache, H_kv, D), vc=r(B, L_cache, H_kv, D))
        if L_new:
            inputs.update(k=r(B, L_new, H_kv, D), v=r(B, L_new, H_kv, D))
        return inputs

    def run(q, kc, vc, k=None, v=None):
        return mmkern.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache_seqlens,
                                              return_lse=True, **kw)

    _check(Case("flash_attn_with_kvcache", name, make, run, cast=("q", "kc", "vc", "k", "v")), poisoned)


@pytest.mark.parametrize("Lq,Lk,causal", [(3, 257, True), (16, 129, False), (1, 1, False)])
def test_flash_attn_func_short_queries(Lq, Lk, causal, poisoned):
    """Plain calls with short queries: split path when there are at least two key tiles (Lk 1: not)."""
    B, H, H_kv, D = 2, 2, 2, 40
    case = Case("flash_attn_func", f"Lq{Lq} Lk{Lk} causal={causal}",
                lambda: dict(q=r(B, Lq, H, D), k=r(B, Lk, H_kv, D), v=r(B, Lk, H_kv, D)),
                lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=causal, return_lse=True),
                cast=("q", "k", "v"))
    _check(case, poisoned, split=Lk > 128)


def test_varlen_short_queries_with_empty_and_single_sequences(poisoned):
    lens_q, lens_k = [1, 3, 0, 2, 1], [1, 200, 5, 0, 131]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    slopes = torch.rand(4, device=DEVICE)
    case = Case("flash_attn_varlen_func", f"lens_q {lens_q} lens_k {lens_k}",
                lambda: dict(q=r(sum(lens_q), 4, 80), k=r(sum(lens_k), 2, 80), v=r(sum(lens_k), 2, 80)),
                lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                               causal=True, softcap=2.0, alibi_slopes=slopes,
                                                               return_lse=True),
                cast=("q", "k", "v"))
    _check(case, poisoned)


def test_gradients_and_dropout_take_the_normal_path(poisoned):
    """With inputs that require grad the forward is the normal kernel (its out and lse feed the
    backward); the gradients go through the Triton delta kernel and match the oracle."""
    case = Case("flash_attn_func", "Lq2 Lk200 grad",
                lambda: dict(q=r(1, 2, 2, 16), k=r(1, 200, 1, 16), v=r(1, 200, 1, 16)),
                lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True),
                cast=("q", "k", "v"), grad=("q", "k", "v"))
    _check(case, poisoned, split=False)
    q, k, v = (torch.randn(1, 2, 2, 16, device=DEVICE), torch.randn(1, 200, 2, 16, device=DEVICE),
               torch.randn(1, 200, 2, 16, device=DEVICE))
    with mmkern.backend("triton"):
        out = mmkern.flash_attn_func(q, k, v, dropout_p=0.2)
    assert not poisoned.launches and torch.isfinite(out).all()



@pytest.mark.parametrize("where", ["q nan", "k nan", "k inf", "q -inf", "v nan"])
def test_nan_and_inf_propagate_through_the_split_merge(where, poisoned):
    """One NaN/inf element in batch 0 (a NaN score, or +inf - +inf): the split holding it gives a NaN
    partial lse (+inf for a +inf score), the merge gives NaN and +inf exactly where the float64 oracle
    does (never 0 and -inf, as an empty row); batch 1, the other kv head and the empty cache (out 0,
    lse -inf) stay as the oracle's."""
    B, Lq, H, H_kv, D, L = 3, 2, 4, 2, 16, 200
    q, kc, vc = (torch.randn(B, n, h, D, device=DEVICE) for n, h in ((Lq, H), (L, H_kv), (L, H_kv)))
    name, value = where.split()
    if name == "q":
        q[0, 1, 3, 5] = float(value)                      # query row 1 of head 3
    else:
        {"k": kc, "v": vc}[name][0, 150, 1, 5] = float(value)   # a key in the 3rd split, kv head 1
    seqlens = torch.tensor([190, 170, 0], dtype=torch.int32, device=DEVICE)

    def run(q, kc, vc):
        return mmkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True, return_lse=True)

    with mmkern.backend("triton"):
        out, lse = run(q, kc, vc)
    assert poisoned.launches and all(grid[0] >= 2 for grid, _ in poisoned.launches)
    with mmkern.backend("reference"):
        want_out, want_lse = run(q.double(), kc.double(), vc.double())
    assert torch.isnan(want_out[0]).any()
    for got, want in ((out, want_out), (lse, want_lse)):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), \
            f"NaN at {torch.isnan(got).nonzero().tolist()[:6]}, oracle at {torch.isnan(want).nonzero().tolist()[:6]}"
        assert not torch.isnan(want[1:]).any()
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite & ~torch.isnan(want)],
                                                                        want[~finite & ~torch.isnan(want)].float())
        assert (got.double() - want)[finite].abs().max() < 1e-5

@pytest.mark.parametrize("varlen", [False, True])
def test_delta_kernel_matches_rowsum_minus_dlse(varlen):
    """delta = rowsum(dO * O) - dlse, with a strided dO and head_dim 80 (two BLOCK_D chunks)."""
    H, D = 3, 80
    if varlen:
        p = Shape(2, H, H, D, 0, 0, 5, 5, True)
        out = torch.randn(9, H, D, device=DEVICE, dtype=torch.float16)
        dout = torch.randn(H, 9, D, device=DEVICE, dtype=torch.float16).transpose(0, 1)
        dlse = torch.randn(H, 9, device=DEVICE)
        want = (dout.float() * out.float()).sum(-1).t() - dlse
    else:
        p = Shape(2, H, H, D, 7, 7, 7, 7, False)
        out = torch.randn(2, 7, H, D, device=DEVICE, dtype=torch.float16)
        dout = torch.randn(2, H, 7, D, device=DEVICE, dtype=torch.float16).transpose(1, 2)
        dlse = torch.randn(2, 7, H, device=DEVICE).transpose(1, 2)          # non-contiguous
        want = (dout.float() * out.float()).sum(-1).transpose(1, 2) - dlse
    lse = torch.empty(want.shape, device=DEVICE)
    got = A._delta(p, dout, out, lse, dlse)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got = A._delta(p, dout, out, lse, None)
    torch.testing.assert_close(got, want + dlse, atol=1e-4, rtol=1e-4)


def _naive_decode(q, k, v, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double()), lse


def test_128k_keys_split_kv_linear_memory(poisoned):
    """One query against 128k keys (head dim 16, one head): the split path's launches receive only
    O(L) buffers (q, k, v, and num_splits x rows x heads partials), never an Lq x Lk or L x L one."""
    L = 128 * 1024 + 3
    q = torch.randn(1, 1, 1, 16, device=DEVICE)
    k = torch.randn(1, L, 1, 16, device=DEVICE)
    v = torch.randn(1, L, 1, 16, device=DEVICE)
    merge = Spy(A.merge_attention_splits_kernel)
    A.merge_attention_splits_kernel, saved = merge, A.merge_attention_splits_kernel
    try:
        with mmkern.backend("triton"):
            out, lse = mmkern.flash_attn_func(q, k, v, return_lse=True)
    finally:
        A.merge_attention_splits_kernel = saved
    want, want_lse = _naive_decode(q, k, v, 1 / math.sqrt(16))
    assert (out.double() - want).abs().max() < 1e-5 and (lse.double() - want_lse).abs().max() < 1e-5
    (grid, sizes), = poisoned.launches
    assert grid[0] >= 2
    for _, numels in poisoned.launches + merge.launches:
        assert max(numels) <= L * 16            # k or v: linear in L; partials are splits x 16
        assert sorted(numels)[-3] <= 4 * 16     # besides k and v: q, out, lse and the partials, all O(1) in L


def test_prefill_launches_receive_only_linear_buffers(monkeypatch):
    """The normal forward and backward at L = 160 get O(L) buffers: nothing of size L x L."""
    L, H, D = 160, 1, 16
    spies = {name: Spy(getattr(A, name)) for name in ("attention_forward_kernel", "attention_dkdv_kernel",
                                                      "attention_dq_kernel", "backward_delta_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(A, name, spy)
    q, k, v = (torch.randn(1, L, H, D, device=DEVICE, requires_grad=True) for _ in range(3))
    with mmkern.backend("triton"):
        out = mmkern.flash_attn_func(q, k, v, causal=True)
        out.sum().backward()
    for name, spy in spies.items():
        assert spy.launches, name
        for _, numels in spy.launches:
            assert max(numels) <= L * H * D < L * L, name


def test_gpu_split_rule_fills_two_waves(monkeypatch):
    """decode_splits on a GPU (the SM count faked at 132, an H100/H200): splits ~ 2 * SMs / programs,
    at least 4 key tiles per split, at most 128; 1 (the normal forward) once the batch fills the GPU."""
    monkeypatch.setattr(S, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    tiles = A.Tiles(64, 128, 4, 2)
    one_query = Shape(1, 32, 8, 128, 1, 65536, 1, 65536, False)        # 8 programs without splits
    assert A.decode_splits(one_query, gpu, tiles) == 33
    short_cache = one_query._replace(seqlen_k=1024, max_seqlen_k=1024)     # 8 key tiles: 2 splits of 4
    assert A.decode_splits(short_cache, gpu, tiles) == 2
    long_single = Shape(1, 1, 1, 128, 1, 1 << 20, 1, 1 << 20, False)
    assert A.decode_splits(long_single, gpu, tiles) == 128
    big_batch = one_query._replace(batch=64)                                 # 512 programs already
    assert A.decode_splits(big_batch, gpu, tiles) == 1
