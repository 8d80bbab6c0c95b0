"""flash_attn_with_kvcache with rotary_cos / rotary_sin (flash-attn's semantics): the new keys rotated at positions
cache_seqlens, cache_seqlens + 1, ... before they land in the cache; the queries rotated at the same positions when
causal or local, else every query at position cache_seqlens. Checked against an independent float64 recomputation
(complex-number rotation + naive attention), every backend against the oracle, and every other cache slot bit for
bit."""
import math

import pytest
import torch

import mmkern
from conftest import assert_backend_matches_oracle, forced
from mmkern import verify
from test_rotary import complex_rotary, rope_tables

BACKENDS = ["torch", "triton", "cpu"]


def naive_attention(q, k, v, causal, window):
    """q (Lq, H, D), k/v (Lk, H_kv, D) float64, bottom-right aligned causal / window: (Lq, H, D).
    (tests/test_paged_kvcache.py uses it too.)"""
    Lq, H, D = q.shape
    Lk, H_kv = k.shape[0], k.shape[1]
    k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    i = torch.arange(Lq)[:, None] + Lk - Lq
    j = torch.arange(Lk)[None, :]
    left, right = window
    if causal:
        right = 0
    visible = torch.ones(Lq, Lk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v)


# (B, Lq, L_new, H, H_kv, D, rotary_dim, L_cache, cache_seqlens, interleaved, causal, window)
CASES = {
    "decode gqa neox partial": (3, 1, 1, 4, 2, 80, 32, 20, [0, 7, 16], False, True, (-1, -1)),
    "chunk of 4 interleaved full causal": (2, 4, 4, 2, 1, 64, 64, 24, [16, 3], True, True, (-1, -1)),
    "non-causal: every query at cache_seqlens": (2, 3, 3, 3, 3, 40, 24, 16, [5, 0], False, False, (-1, -1)),
    "window mqa interleaved": (2, 2, 2, 4, 1, 48, 16, 32, [30, 11], True, False, (6, 0)),
}


def _run(case, q, kc, vc, k, v, cos, sin):
    B, Lq, L_new, H, H_kv, D, rd, L_cache, seqlens, interleaved, causal, window = case
    out = mmkern.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin,
                                         cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), causal=causal,
                                         window_size=window, rotary_interleaved=interleaved)
    return out, kc.clone(), vc.clone()


def _inputs(case, dtype=torch.float64):
    B, Lq, L_new, H, H_kv, D, rd, L_cache, *_ = case
    r = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)   # noqa: E731
    return dict(q=r(B, Lq, H, D), kc=r(B, L_cache, H_kv, D), vc=r(B, L_cache, H_kv, D), k=r(B, L_new, H_kv, D),
                v=r(B, L_new, H_kv, D))


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_an_independent_recomputation(name):
    case = CASES[name]
    B, Lq, L_new, H, H_kv, D, rd, L_cache, seqlens, interleaved, causal, window = case
    x = _inputs(case)
    cos, sin = rope_tables(L_cache, rd, dtype=torch.float64)
    with mmkern.backend("reference"):
        out, kc, vc = _run(case, x["q"], x["kc"].clone(), x["vc"].clone(), x["k"], x["v"], cos, sin)
    for b, n in enumerate(seqlens):
        k_rot = complex_rotary(x["k"][b], cos, sin, n + torch.arange(L_new), interleaved)
        torch.testing.assert_close(kc[b, n:n + L_new], k_rot, rtol=0, atol=1e-12)
        assert torch.equal(vc[b, n:n + L_new], x["v"][b])
        for cache, before in ((kc, x["kc"]), (vc, x["vc"])):       # every other slot untouched, bit for bit
            assert torch.equal(cache[b, :n], before[b, :n]) and torch.equal(cache[b, n + L_new:], before[b, n + L_new:])
        local = causal or window != (-1, -1)
        q_positions = n + torch.arange(Lq) if local else torch.full((Lq,), n)
        q_rot = complex_rotary(x["q"][b], cos, sin, q_positions, interleaved)
        want = naive_attention(q_rot, kc[b, :n + L_new], vc[b, :n + L_new], causal, window)
        torch.testing.assert_close(out[b], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_oracle(backend, name):
    case = CASES[name]
    tables = rope_tables(case[7], case[6])
    c = verify.Case(f"flash_attn_with_kvcache rotary {name}", name, lambda: _inputs(case),
                    lambda q, kc, vc, k, v: _run(case, q, kc, vc, k, v, *tables),
                    cast=("q", "kc", "vc", "k", "v"), outputs=("out", "k_cache", "v_cache"))
    with forced(backend):
        assert_backend_matches_oracle(backend, c, dtypes=[torch.float32, torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_cache_slots_are_unchanged_bit_for_bit(backend):
    case = CASES["decode gqa neox partial"]
    x = _inputs(case, torch.bfloat16)
    kc, vc = x["kc"].clone(), x["vc"].clone()
    with forced(backend):
        _run(case, x["q"], kc, vc, x["k"], x["v"], *rope_tables(20, 32))
    for b, n in enumerate(case[8]):
        for cache, before in ((kc, x["kc"]), (vc, x["vc"])):
            assert torch.equal(cache[b, :n], before[b, :n]) and torch.equal(cache[b, n + 1:], before[b, n + 1:])
        assert torch.equal(vc[b, n], x["v"][b, 0]) and torch.equal(kc[b, n, :, 32:], x["k"][b, 0, :, 32:])


def test_compile_fullgraph_decode_step_with_rotary():
    case = CASES["decode gqa neox partial"]
    x = _inputs(case, torch.float32)
    cos, sin = rope_tables(20, 32)
    seqlens = torch.tensor(case[8], dtype=torch.int32)

    def step(q, kc, vc, k, v, seqlens):
        return mmkern.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                             causal=True, rotary_interleaved=False)

    torch._dynamo.reset()
    kc1, vc1, kc2, vc2 = x["kc"].clone(), x["vc"].clone(), x["kc"].clone(), x["vc"].clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x["q"], kc1, vc1, x["k"], x["v"], seqlens)
    want = step(x["q"], kc2, vc2, x["k"], x["v"], seqlens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


def _bad_calls():
    B, H, D = 2, 2, 16
    q, kc, vc = torch.randn(B, 1, H, D), torch.randn(B, 8, H, D), torch.randn(B, 8, H, D)
    k, v = torch.randn(B, 1, H, D), torch.randn(B, 1, H, D)
    cos, sin = rope_tables(8, 8)
    seqlens = torch.tensor([3, 7], dtype=torch.int32)
    call = lambda **kw: mmkern.flash_attn_with_kvcache(**{**dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v,  # noqa: E731
                                                               cache_seqlens=seqlens, rotary_cos=cos,
                                                               rotary_sin=sin), **kw})
    return {
        "rotary_cos without rotary_sin": (lambda: call(rotary_sin=None), "rotary_sin"),
        "rotary without new keys": (lambda: call(k=None, v=None), "rotary_cos"),
        "rotary_dim over head_dim": (lambda: call(rotary_cos=torch.ones(8, 9), rotary_sin=torch.ones(8, 9)),
                                     "rotary_dim"),
        "rotary_sin of another shape": (lambda: call(rotary_sin=sin[:, :2]), "rotary_sin"),
        "tables shorter than the positions": (lambda: call(rotary_cos=cos[:7], rotary_sin=sin[:7]), "rotary_cos"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_rotary_arguments_name_the_argument(name):
    call, match = _bad_calls()[name]
    with pytest.raises((ValueError, TypeError), match=match):
        call()
