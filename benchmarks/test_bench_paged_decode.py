"""Paged KV cache decode: one decode step of mmkern.flash_attn_with_kvcache on a paged cache, on the same cache held
dense, and torch over the pages gathered, side by side in one run (one group per case, same inputs in its rows):

    mmkern_paged   mmkern.flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=..., block_table=...) under
                   auto dispatch (what a user gets): pages (num_blocks, page, H_kv, D) in a shuffled order, so
                   consecutive pages of a sequence lie anywhere in the pool, block_table (B, L / page) int32
    mmkern_dense   the same logical cache as dense (B, L, H_kv, D) tensors, cache_seqlens, auto dispatch; it does
                   not depend on the page size and is repeated in each page size's group (each group reads alone)
    torch_gathered what a serving engine without paged kernels does each step: gather the pages into dense
                   tensors with torch indexing (k_pages[block_table].flatten(1, 2): (B, L, H_kv, D)), then
                   F.scaled_dot_product_attention on the (B, H, L, D) views with enable_gqa (heads repeated where
                   torch lacks it) and a (B, 1, 1, L) key-length mask; the gather and SDPA are timed together (the
                   mask, like the block table, is built once per step for all layers: outside the timed call)

The step: one new query token per sequence, cache_seqlens = L - 1 for every sequence (so the key-length limit is
real: the last cache row is not attended to), no append (k = v = None), so only attention is timed.
Heads: GQA, 32 query heads on 8 KV heads, D = 128, causal=True (one query: it sees every valid key).
extra_info: bytes = K and V read once, 2 * B * L * H_kv * D * itemsize (the same count in all three rows, so GB/s
compares them; the gathered row moves about three times that), GB/s at the median, ran_on (the mmkern op and the
backend auto dispatch ran it on, from mmkern.dispatch_log on one untimed call; for torch_gathered, torch's SDPA).
Each row's output (of its last timed call) is checked against a float64 reference after the timing.

Sizes:
    GPU: bf16, batch 1/16/64, cache 1k/8k/32k, page 16 and 256; under MMKERN_BENCH_SIZES=quick (the rows
        scripts/gpu_check.sh runs, inside its bench step's time limit) the corners: batch 1/64, cache 1k/32k
    CPU: fp32, batch 1 and 8, cache 1k and 4k, page 16 and 256 (about a minute on two cores)
    CPU under --benchmark-disable (CI's smoke) or MMKERN_BENCH_SIZES=quick: fp32, batch 2, cache 512, page 16 and
        256 (every code path in a few seconds)
Goal (the issue): mmkern_paged within 10% of mmkern_dense, and ahead of torch_gathered.
"""
from __future__ import annotations

import pytest
import torch

import mmkern
from conftest import DEVICE, ON_GPU, QUICK
from mmkern.bench.attention import HAS_ENABLE_GQA, sdpa_gqa
from mmkern.bench.counts import attention_flops

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
IMPLS = ["mmkern_paged", "mmkern_dense", "torch_gathered"]
_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}

if ON_GPU and QUICK:        # scripts/gpu_check.sh: its bench step runs every file at quick sizes within 95 s
    DTYPES, BATCHES, CACHE_LENS, PAGES = [torch.bfloat16], [1, 64], [1024, 32768], [16, 256]
elif ON_GPU:
    DTYPES, BATCHES, CACHE_LENS, PAGES = [torch.bfloat16], [1, 16, 64], [1024, 8192, 32768], [16, 256]
else:
    DTYPES, BATCHES, CACHE_LENS, PAGES = [torch.float32], [1, 8], [1024, 4096], [16, 256]
SMOKE = dict(dtypes=[torch.float32], batches=[2], cache_lens=[512], pages=[16, 256])


def _smoke(config) -> bool:
    """CPU runs that only check every row runs (--benchmark-disable) or the quick selection: tiny sizes."""
    return not ON_GPU and (bool(config.getoption("benchmark_disable", False)) or QUICK)


def pytest_generate_tests(metafunc):
    """One flat list of cases, the impl innermost, so a group's three rows run one after another on one cached
    set of inputs (_case)."""
    if metafunc.function.__name__ != "test_paged_decode":
        return
    if _smoke(metafunc.config):
        dtypes, batches, cache_lens, pages = (SMOKE[k] for k in ("dtypes", "batches", "cache_lens", "pages"))
    else:
        dtypes, batches, cache_lens, pages = DTYPES, BATCHES, CACHE_LENS, PAGES
    cases = [(dt, b, l, p, impl) for dt in dtypes for b in batches for l in cache_lens for p in pages
             for impl in IMPLS]
    metafunc.parametrize("dtype,batch,cache_len,page,impl", cases,
                         ids=[f"{_DT[dt]}-B{b}-cache{l}-page{p}-{impl}" for dt, b, l, p, impl in cases])


# --------------------------------------------------------------------------- inputs, one case at a time

def gathered_sdpa(q, k_pages, v_pages, block_table, key_mask):
    """The torch_gathered row: pages -> dense (B, L, H_kv, D) by indexing, then SDPA; out (B, 1, H, D) like q."""
    k = k_pages[block_table].flatten(1, 2)
    v = v_pages[block_table].flatten(1, 2)
    out = sdpa_gqa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
    return out.transpose(1, 2)


def _reference(q, k, v, seqlens):
    """float64 attention of q (B, 1, H, D) on the first seqlens[b] rows of dense k, v (B, L, H_kv, D), one sequence
    at a time (a whole 64 x 32k cache in float64 with the heads repeated would not fit a GPU)."""
    B, _, H, D = q.shape
    Hk = k.shape[2]
    out = torch.empty(B, 1, H, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = int(seqlens[b])
        qb = q[b, 0].double().view(Hk, H // Hk, D)                          # query heads grouped by KV head
        kb, vb = k[b, :n].double(), v[b, :n].double()                       # (n, Hk, D)
        p = torch.softmax(torch.einsum("hgd,nhd->hgn", qb, kb) / D ** 0.5, dim=-1)
        out[b, 0] = torch.einsum("hgn,nhd->hgd", p, vb).reshape(H, D)
    return out


_CASE: dict = {}        # the one case whose inputs are held (a 32k x 64 bf16 cache is 8 GiB per layout)


def _case(dtype, batch, cache_len, page):
    """The inputs of one group, built once and shared by its rows: q, the dense cache, the same cache in shuffled
    pages with its block table, cache_seqlens, the key mask and the float64 reference output."""
    key = (dtype, batch, cache_len, page)
    if key not in _CASE:
        _CASE.clear()
        # the logical cache depends on (dtype, batch, cache_len) only: the dense rows of both page sizes agree
        gen = torch.Generator(device=DEVICE).manual_seed(1000 * batch + cache_len)
        q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, generator=gen)
        k, v = (torch.randn(batch, cache_len, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, generator=gen)
                for _ in range(2))
        per_seq, num_blocks = cache_len // page, batch * cache_len // page
        order = torch.randperm(num_blocks, device=DEVICE, generator=gen)
        block_table = order.view(batch, per_seq).to(torch.int32)
        k_pages, v_pages = (torch.empty(num_blocks, page, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
                            for _ in range(2))
        k_pages[block_table.long()] = k.view(batch, per_seq, page, KV_HEADS, HEAD_DIM)
        v_pages[block_table.long()] = v.view(batch, per_seq, page, KV_HEADS, HEAD_DIM)
        seqlens = torch.full((batch,), cache_len - 1, dtype=torch.int32, device=DEVICE)
        key_mask = (torch.arange(cache_len, device=DEVICE)[None, :] < seqlens[:, None])[:, None, None, :]
        expected = _reference(q, k, v, seqlens).to(dtype)
        _CASE[key] = dict(q=q, k=k, v=v, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
                          seqlens=seqlens, key_mask=key_mask, expected=expected)
    return _CASE[key]


def _ran_on(fn, *args) -> str:
    """The mmkern ops of one call of fn and the backends they ran on ("attention_forward@cpu")."""
    with mmkern.dispatch_log() as log:
        fn(*args)
    return ", ".join(sorted({f"{op}@{name}" for op, name in log.calls})) or "no mmkern op"


# --------------------------------------------------------------------------- the rows

@torch.no_grad()
def test_paged_decode(bench, benchmark, dtype, batch, cache_len, page, impl):
    """One decode step (Lq = 1, no append) against a cache of cache_len rows, cache_len - 1 of them valid."""
    c = _case(dtype, batch, cache_len, page)
    series = f"paged decode {_DT[dtype]} Hq{HEADS}/Hkv{KV_HEADS} d{HEAD_DIM} B{batch} page{page}"
    benchmark.group = f"{series} cache{cache_len}"
    seqlens = c["seqlens"]
    if impl == "mmkern_paged":
        block_table = c["block_table"]

        def fn(q, k_cache, v_cache):
            return mmkern.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
                                                  causal=True)
        args = (c["q"], c["k_pages"], c["v_pages"])
    elif impl == "mmkern_dense":
        def fn(q, k_cache, v_cache):
            return mmkern.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)
        args = (c["q"], c["k"], c["v"])
    else:
        block_table, key_mask = c["block_table"], c["key_mask"]

        def fn(q, k_pages, v_pages):
            return gathered_sdpa(q, k_pages, v_pages, block_table, key_mask)
        args = (c["q"], c["k_pages"], c["v_pages"])
    ran_on = _ran_on(fn, *args) if impl.startswith("mmkern_") else \
        "torch index gather + sdpa" + (" enable_gqa" if HAS_ENABLE_GQA else " repeat_interleave")
    itemsize = c["q"].element_size()
    out = bench(fn, *args, op="paged_decode", impl=impl, metric="GB/s", series=series, x=cache_len,
                x_label="KV cache length", shape=f"B{batch} Hq{HEADS} Hkv{KV_HEADS} Lq1 Lk{cache_len} D{HEAD_DIM}",
                dtype=_DT[dtype], page=page, cache_seqlens=cache_len - 1, append=False, ran_on=ran_on,
                flops=attention_flops(batch, HEADS, 1, cache_len, HEAD_DIM),
                bytes=2 * batch * cache_len * KV_HEADS * HEAD_DIM * itemsize, flush_l2=True)
    # the outputs are averages of ~L random values (|out| ~ 1/sqrt(L)): the absolute tolerance scales with them
    expected, tol = c["expected"], _TOL[dtype]
    torch.testing.assert_close(out, expected, atol=tol * float(expected.abs().max()), rtol=tol,
                               msg=lambda m: f"{impl} differs from the float64 reference: {m}")
