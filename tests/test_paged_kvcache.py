"""flash_attn_with_kvcache's serving arguments: paged caches (block_table), cache_batch_idx, cache_leftpad,
num_splits. Checked against an independent float64 recomputation from a dense view of the pages (complex-number
rotary + naive attention), every backend against the oracle with flash-attn's criterion per output, the caches
afterwards (the new rows where the table says, every other slot bit for bit), a 64-step paged decode loop against
the same loop on dense caches, torch.compile, and the bad inputs."""
import pytest
import torch

import mmkern
from conftest import assert_backend_matches_oracle, forced
from mmkern import verify
from test_kvcache_rotary import naive_attention
from test_rotary import complex_rotary, rope_tables

BACKENDS = ["torch", "triton", "cpu"]


# --------------------------------------------------------------------------- the independent recomputation

def paged(dense: torch.Tensor, page: int, spare: int = 3, generator=None):
    """(pages, block_table): the (B, L, H_kv, D) cache cut into pages of `page` rows, placed in a random order
    among `spare` extra pages of noise (so reading a wrong page shows), block_table (B, L // page) int32."""
    B, L = dense.shape[:2]
    per_seq = L // page
    n = B * per_seq + spare
    pages = torch.randn((n, page) + tuple(dense.shape[2:]), dtype=torch.float64).to(dense.dtype)
    order = torch.randperm(n, generator=generator)[:B * per_seq].view(B, per_seq)
    for b in range(B):
        for i in range(per_seq):
            pages[order[b, i]] = dense[b, i * page:(i + 1) * page]
    return pages, order.to(torch.int32)


def dense_view(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """(B, max_blocks * page, H_kv, D): each sequence's pages in table order (the test's own reading)."""
    return torch.stack([torch.cat([pages[int(i)] for i in row]) for row in block_table])


# (B, Lq, L_new, H, H_kv, D, rotary_dim, page, pages per sequence, cache_seqlens, interleaved, causal, window)
CASES = {
    "page 16 decode gqa d64 neox": (3, 1, 1, 4, 2, 64, 32, 16, 3, [0, 16, 31], False, True, (-1, -1)),
    "page 32 chunk of 4 mqa d80 interleaved": (2, 4, 4, 4, 1, 80, 48, 32, 2, [32, 5], True, True, (-1, -1)),
    "page 256 d128 mha non-causal": (2, 2, 2, 2, 2, 128, 64, 256, 1, [250, 0], False, False, (-1, -1)),
    "page 16 window gqa d80": (2, 3, 3, 6, 2, 80, 16, 16, 4, [47, 20], True, True, (7, 0)),
}


def _case_inputs(case, dtype=torch.float64, seed=0):
    B, Lq, L_new, H, H_kv, D, rd, page, per_seq, *_ = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).to(dtype)   # noqa: E731
    kd, vd = r(B, page * per_seq, H_kv, D), r(B, page * per_seq, H_kv, D)
    kc, table = paged(kd, page, generator=torch.Generator().manual_seed(seed + 1))
    vc, _ = paged(vd, page)
    for b in range(B):                       # v's pages in k's order (one table for both)
        for i in range(per_seq):
            vc[table[b, i]] = vd[b, i * page:(i + 1) * page]
    return dict(q=r(B, Lq, H, D), kc=kc, vc=vc, k=r(B, L_new, H_kv, D), v=r(B, L_new, H_kv, D), table=table)


def _run_case(case, q, kc, vc, k, v, table, cos, sin, **extra):
    *_, seqlens, interleaved, causal, window = case
    out = mmkern.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin,
                                         cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), block_table=table,
                                         causal=causal, window_size=window, rotary_interleaved=interleaved, **extra)
    return out, kc.clone(), vc.clone()


def _expected(case, x, cos, sin):
    """What the call must give, from the test's own dense view: (out (B, Lq, H, D), k_dense, v_dense after)."""
    B, Lq, L_new, H, H_kv, D, rd, page, per_seq, seqlens, interleaved, causal, window = case
    kd, vd = dense_view(x["kc"], x["table"]).double(), dense_view(x["vc"], x["table"]).double()
    outs = []
    local = causal or window != (-1, -1)
    for b, n in enumerate(seqlens):
        kd[b, n:n + L_new] = complex_rotary(x["k"][b].double(), cos.double(), sin.double(), n + torch.arange(L_new),
                                            interleaved)
        vd[b, n:n + L_new] = x["v"][b].double()
        q_positions = n + torch.arange(Lq) if local else torch.full((Lq,), n)
        q_rot = complex_rotary(x["q"][b].double(), cos.double(), sin.double(), q_positions, interleaved)
        outs.append(naive_attention(q_rot, kd[b, :n + L_new], vd[b, :n + L_new], causal, window))
    return torch.stack(outs), kd, vd


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_an_independent_recomputation(name):
    case = CASES[name]
    x = _case_inputs(case)
    cos, sin = rope_tables(case[7] * case[8], case[6], dtype=torch.float64)
    with mmkern.backend("reference"):
        out, kc, vc = _run_case(case, x["q"], x["kc"].clone(), x["vc"].clone(), x["k"], x["v"], x["table"], cos, sin)
    want, kd, vd = _expected(case, x, cos, sin)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(dense_view(kc, x["table"]), kd, rtol=0, atol=1e-12)
    assert torch.equal(dense_view(vc, x["table"]), vd)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_oracle(backend, name):
    case = CASES[name]
    tables = rope_tables(case[7] * case[8], case[6])
    table = _case_inputs(case)["table"]
    c = verify.Case(f"paged flash_attn_with_kvcache {name}", name,
                    lambda: {k: t for k, t in _case_inputs(case).items() if k != "table"},
                    lambda q, kc, vc, k, v: _run_case(case, q, kc, vc, k, v, table, *tables),
                    cast=("q", "kc", "vc", "k", "v"), outputs=("out", "k_cache", "v_cache"))
    with forced(backend):
        assert_backend_matches_oracle(backend, c, dtypes=[torch.float32, torch.float16, torch.bfloat16])


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_pages_outside_the_new_rows_are_unchanged_bit_for_bit(backend):
    """The new (rotated) rows land in the pages the table names, at row cache_seqlens % page; every other
    slot of every page, the spare pages included, keeps its bits."""
    case = CASES["page 16 decode gqa d64 neox"]
    x = _case_inputs(case, torch.bfloat16)
    kc, vc = x["kc"].clone(), x["vc"].clone()
    with forced(backend):
        _run_case(case, x["q"], kc, vc, x["k"], x["v"], x["table"], *rope_tables(48, 32))
    written = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for b, n in enumerate(case[9]):
        page, slot = int(x["table"][b, n // 16]), n % 16
        written[page, slot] = True
        assert torch.equal(vc[page, slot], x["v"][b, 0])
        assert torch.equal(kc[page, slot, :, 32:], x["k"][b, 0, :, 32:])      # past rotary_dim: copied as is
        if n:                                                                 # position 0: the identity
            assert not torch.equal(kc[page, slot, :, :32], x["k"][b, 0, :, :32])  # rotated
    for cache, before in ((kc, x["kc"]), (vc, x["vc"])):
        assert torch.equal(cache[~written], before[~written])


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_paged_equals_dense_with_every_feature(backend):
    """The same cache paged (page 16, shuffled) and dense, with softcap, ALiBi and a window, 1..4 new tokens,
    an empty sequence and one ending at a page boundary: the same output (to rounding: the pages are read in
    another order of tiles only where a backend splits)."""
    B, H, H_kv, D, L = 3, 4, 2, 48, 64
    for L_new in (1, 4):
        q, k, v = torch.randn(B, L_new, H, D), torch.randn(B, L_new, H_kv, D), torch.randn(B, L_new, H_kv, D)
        kd, vd = torch.randn(B, L, H_kv, D), torch.randn(B, L, H_kv, D)
        kp, table = paged(kd, 16)
        vp = torch.randn_like(kp)
        for b in range(B):
            for i in range(L // 16):
                vp[table[b, i]] = vd[b, i * 16:(i + 1) * 16]
        seqlens = torch.tensor([0, 32 - L_new, 57], dtype=torch.int32)
        softcap = 0.0 if backend == "torch" else 3.0                 # torch's SDPA has none
        kw = dict(cache_seqlens=seqlens, causal=True, window_size=(20, 0), softcap=softcap, return_lse=True,
                  alibi_slopes=torch.rand(H) * 0.3)
        with forced(backend):
            out_p, lse_p = mmkern.flash_attn_with_kvcache(q, kp, vp, k, v, block_table=table, **kw)
        with mmkern.backend("reference"):
            out_d, lse_d = mmkern.flash_attn_with_kvcache(q, kd, vd, k, v, **kw)
        torch.testing.assert_close(out_p, out_d, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse_p, lse_d, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(dense_view(kp, table), kd, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_a_64_step_paged_decode_loop_agrees_with_the_dense_loop(backend):
    """Greedy-style decoding: 64 steps of one token each, from different prompt lengths, GQA with rotary; the
    paged caches (page 16, shuffled pages) and dense caches give the same outputs at every step and the same
    caches at the end."""
    B, H, H_kv, D, L, steps = 2, 4, 2, 32, 96, 64
    cos, sin = rope_tables(L, 16)
    kd, vd = torch.zeros(B, L, H_kv, D), torch.zeros(B, L, H_kv, D)
    kp, table = paged(kd, 16, spare=2)
    vp = kp.clone()
    seqlens = torch.tensor([0, 17], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    with forced(backend):
        for step in range(steps):
            q, k, v = (torch.randn(B, 1, h, D, generator=g) for h in (H, H_kv, H_kv))
            kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=True, rotary_interleaved=False)
            out_p = mmkern.flash_attn_with_kvcache(q, kp, vp, k, v, block_table=table, **kw)
            out_d = mmkern.flash_attn_with_kvcache(q, kd, vd, k, v, **kw)
            torch.testing.assert_close(out_p, out_d, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
            seqlens = seqlens + 1
    torch.testing.assert_close(dense_view(kp, table), kd, rtol=0, atol=0)
    torch.testing.assert_close(dense_view(vp, table), vd, rtol=0, atol=0)


# --------------------------------------------------------------------------- cache_batch_idx, cache_leftpad

@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_cache_batch_idx_reads_and_appends_the_named_rows(backend):
    """Batch entry b uses cache row cache_batch_idx[b] of a cache with more rows than the batch; the other rows
    stay as they were, bit for bit."""
    B, H, D, L, rows = 3, 2, 16, 24, 5
    q, k, v = torch.randn(B, 2, H, D), torch.randn(B, 2, H, D), torch.randn(B, 2, H, D)
    kc, vc = torch.randn(rows, L, H, D), torch.randn(rows, L, H, D)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    seqlens = torch.tensor([5, 0, 21], dtype=torch.int32)
    k_after, v_after = kc.clone(), vc.clone()
    with forced(backend):
        out = mmkern.flash_attn_with_kvcache(q, k_after, v_after, k, v, cache_seqlens=seqlens, cache_batch_idx=idx,
                                             causal=True)
    for b, (row, n) in enumerate(zip(idx.tolist(), seqlens.tolist())):
        want_k = torch.cat([kc[row, :n], k[b]]).double()
        want_v = torch.cat([vc[row, :n], v[b]]).double()
        torch.testing.assert_close(out[b].double(), naive_attention(q[b].double(), want_k, want_v, True, (-1, -1)),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(k_after[row, n:n + 2], k[b]) and torch.equal(v_after[row, n:n + 2], v[b])
    for row in (1, 3):
        assert torch.equal(k_after[row], kc[row]) and torch.equal(v_after[row], vc[row])


@pytest.mark.parametrize("paged_cache", [False, True])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_cache_leftpad_starts_each_sequence_and_its_positions_there(backend, paged_cache):
    """Left-padded caches: sequence b's keys are rows cache_leftpad[b] .. cache_seqlens[b] + L_new - 1; causal
    alignment, ALiBi and rotary positions count from cache_leftpad[b] (a sequence padded by p equals the same
    sequence unpadded, p rows earlier)."""
    B, Lq, H, H_kv, D, L = 3, 2, 4, 2, 32, 48
    pads, seqlens = [3, 0, 17], [10, 30, 17]        # the last: padding only, then the new tokens
    cos, sin = rope_tables(L, 16)
    slopes = torch.rand(H) * 0.5
    q, k, v = torch.randn(B, Lq, H, D), torch.randn(B, Lq, H_kv, D), torch.randn(B, Lq, H_kv, D)
    kc, vc = torch.randn(B, L, H_kv, D), torch.randn(B, L, H_kv, D)
    kw = dict(rotary_cos=cos, rotary_sin=sin, causal=True, alibi_slopes=slopes, rotary_interleaved=True)
    k_run, v_run, table = kc.clone(), vc.clone(), None
    if paged_cache:
        k_run, table = paged(kc, 16)
        v_run = torch.randn_like(k_run)
        for b in range(B):
            for i in range(L // 16):
                v_run[table[b, i]] = vc[b, i * 16:(i + 1) * 16]
    with forced(backend):
        out = mmkern.flash_attn_with_kvcache(q, k_run, v_run, k, v, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                             cache_leftpad=torch.tensor(pads, dtype=torch.int32), block_table=table, **kw)
    for b in range(B):
        n = seqlens[b] - pads[b]                    # the sequence's own length before the append
        unpadded_k = torch.zeros(1, L, H_kv, D)
        unpadded_v = torch.zeros(1, L, H_kv, D)
        unpadded_k[0, :n], unpadded_v[0, :n] = kc[b, pads[b]:seqlens[b]], vc[b, pads[b]:seqlens[b]]
        with mmkern.backend("reference"):
            want = mmkern.flash_attn_with_kvcache(q[b:b + 1], unpadded_k, unpadded_v, k[b:b + 1], v[b:b + 1],
                                                 cache_seqlens=n, **kw)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-5, msg=lambda m: f"sequence {b}: {m}")
        k_seq = dense_view(k_run, table)[b] if paged_cache else k_run[b]
        torch.testing.assert_close(k_seq[seqlens[b]:seqlens[b] + Lq], unpadded_k[0, n:n + Lq], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- num_splits

@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_num_splits_changes_rounding_only(backend):
    B, H, D = 2, 4, 64
    q = torch.randn(B, 1, H, D)
    kp, table = paged(torch.randn(B, 512, 1, D), 32)
    vp = torch.randn_like(kp)
    seqlens = torch.tensor([511, 300], dtype=torch.int32)
    outs = {}
    for n in (0, 1, 3, 7):
        with forced(backend):
            outs[n] = mmkern.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table,
                                                     num_splits=n, return_lse=True)
    with mmkern.backend("reference"):
        want = mmkern.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table, return_lse=True)
    for n, (out, lse) in outs.items():
        torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"num_splits {n}: {m}")
        torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_tiles_inside_one_large_page_and_across_pages(backend, num_splits):
    """Page 256 with left pads: a key tile (or split) may lie inside one page, read in place (the C++ kernel), or
    run across a page boundary, gathered; both against the reference on the same pages."""
    B, H, H_kv, D = 2, 4, 2, 32
    kp, table = paged(torch.randn(B, 3 * 256, H_kv, D), 256, generator=torch.Generator().manual_seed(5))
    vp = torch.randn_like(kp)
    q = torch.randn(B, 1, H, D)
    kw = dict(cache_seqlens=torch.tensor([700, 300], dtype=torch.int32), block_table=table,
              cache_leftpad=torch.tensor([5, 0], dtype=torch.int32), return_lse=True)
    with forced(backend):
        out, lse = mmkern.flash_attn_with_kvcache(q, kp, vp, num_splits=num_splits, **kw)
    with mmkern.backend("reference"):
        want, want_lse = mmkern.flash_attn_with_kvcache(q, kp, vp, **kw)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- compile, CUDA graphs

def test_compile_fullgraph_paged_decode_step():
    case = CASES["page 16 decode gqa d64 neox"]
    x = _case_inputs(case, torch.float32)
    cos, sin = rope_tables(48, 32)
    seqlens = torch.tensor(case[9], dtype=torch.int32)

    def step(q, kc, vc, k, v, seqlens, table):
        return mmkern.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                             block_table=table, causal=True, rotary_interleaved=False)

    torch._dynamo.reset()
    kc1, vc1, kc2, vc2 = x["kc"].clone(), x["vc"].clone(), x["kc"].clone(), x["vc"].clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x["q"], kc1, vc1, x["k"], x["v"], seqlens,
                                                                   x["table"])
    want = step(x["q"], kc2, vc2, x["k"], x["v"], seqlens, x["table"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run by scripts/gpu_check.sh)")
def test_paged_decode_step_is_captured_in_a_cuda_graph():
    """No host sync in the launch path: a paged decode step with rotary is captured once and replayed with new
    inputs and cache_seqlens; each replay equals an eager step."""
    dev = "cuda"
    B, H, H_kv, D, page, per_seq = 4, 8, 2, 128, 16, 8
    cos, sin = (t.to(dev) for t in rope_tables(page * per_seq, 64))
    kp, table = paged(torch.zeros(B, page * per_seq, H_kv, D, dtype=torch.bfloat16), page)
    kp, table = kp.to(dev), table.to(dev)
    vp = kp.clone()
    q, k, v = (torch.randn(B, 1, h, D, device=dev, dtype=torch.bfloat16) for h in (H, H_kv, H_kv))
    seqlens = torch.tensor([0, 5, 16, 100], dtype=torch.int32, device=dev)

    def step():
        return mmkern.flash_attn_with_kvcache(q, kp, vp, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                             block_table=table, causal=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                   # warm-up: compiles, autotunes, fills the dispatch memo
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        seqlens += 1
        k_eager, v_eager = kp.clone(), vp.clone()
        want = mmkern.flash_attn_with_kvcache(q, k_eager, v_eager, k, v, rotary_cos=cos, rotary_sin=sin,
                                              cache_seqlens=seqlens, block_table=table, causal=True)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
        assert torch.equal(kp, k_eager) and torch.equal(vp, v_eager)


# --------------------------------------------------------------------------- bad input

def _bad_calls():
    B, H, D, page = 2, 2, 16, 16
    q = torch.randn(B, 1, H, D)
    kp, vp = torch.randn(6, page, H, D), torch.randn(6, page, H, D)
    k, v = torch.randn(B, 1, H, D), torch.randn(B, 1, H, D)
    table = torch.tensor([[0, 3], [5, 1]], dtype=torch.int32)
    seqlens = torch.tensor([3, 20], dtype=torch.int32)
    dense = torch.randn(4, 8, H, D)
    call = lambda **kw: mmkern.flash_attn_with_kvcache(**{**dict(q=q, k_cache=kp, v_cache=vp, k=k, v=v,  # noqa: E731
                                                               cache_seqlens=seqlens, block_table=table), **kw})
    odd = torch.randn(6, 24, H, D)
    cos, sin = rope_tables(32, 8)
    return {
        "block_table entry past num_blocks": (lambda: call(block_table=torch.tensor([[0, 6], [5, 1]], dtype=torch.int32)),
                                              "block_table"),
        "negative block_table entry": (lambda: call(block_table=torch.tensor([[0, -1], [5, 1]], dtype=torch.int32)),
                                       "block_table"),
        "page size not a multiple of 16": (lambda: call(k_cache=odd, v_cache=odd.clone()), "page_block_size"),
        "block_table of another batch": (lambda: call(block_table=table[:1]), "block_table"),
        "block_table int64": (lambda: call(block_table=table.long()), "block_table"),
        "v_cache pages of another shape": (lambda: call(v_cache=torch.randn(5, page, H, D)), "v_cache"),
        "cache_seqlens past the table's pages": (lambda: call(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32)),
                                                 "cache"),
        "rotary_dim over head_dim": (lambda: call(rotary_cos=torch.ones(32, 9), rotary_sin=torch.ones(32, 9)),
                                     "rotary_dim"),
        "rotary tables shorter than the positions": (lambda: call(rotary_cos=cos[:20], rotary_sin=sin[:20]),
                                                     "rotary_cos"),
        "cache_batch_idx with a duplicate": (lambda: call(k_cache=dense, v_cache=dense.clone(), block_table=None,
                                                          cache_seqlens=3,
                                                          cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)),
                                             "cache_batch_idx"),
        "cache_batch_idx out of range": (lambda: call(k_cache=dense, v_cache=dense.clone(), block_table=None,
                                                      cache_seqlens=3,
                                                      cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32)),
                                         "cache_batch_idx"),
        "cache_batch_idx with block_table": (lambda: call(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)),
                                             "cache_batch_idx"),
        "cache_leftpad over cache_seqlens": (lambda: call(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)),
                                             "cache_leftpad"),
        "cache_leftpad of another batch": (lambda: call(cache_leftpad=torch.tensor([0], dtype=torch.int32)),
                                           "cache_leftpad"),
        "num_splits negative": (lambda: call(num_splits=-1), "num_splits"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_serving_arguments_name_the_argument(name):
    call, match = _bad_calls()[name]
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_paged_attention_op_refuses_gradients():
    """The paged / left-padded layouts are for inference: the op says so rather than returning a wrong gradient."""
    q = torch.randn(1, 1, 2, 16, requires_grad=True)
    kp = torch.randn(2, 16, 2, 16)
    with pytest.raises(ValueError, match="inference"):
        mmkern.ops.attention.attention(q, kp, kp, seqused_k=torch.tensor([5], dtype=torch.int32), softmax_scale=0.25,
                                       block_table=torch.tensor([[1]], dtype=torch.int32))
