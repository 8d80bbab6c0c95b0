"""The reference attention backend against independent implementations, in float64.

- torch's SDPA (math backend) for what it can express: top-left causal, bool/float masks, GQA;
- softmax(QK^T)V written out by hand, sequence by sequence (conftest.naive_attention_one), for
  the rest: bottom-right causal, sliding window, softcap, ALiBi, dropout masks, varlen, KV cache.
Gradients are compared with autograd through the same independent implementations.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern.reference.dropout import dropout_keep_mask
from conftest import DTYPES, max_abs_err, naive_attention_one, randn, seed_drawn_after

TOL = 1e-10
ref = mmkern.backend("reference")


def naive_dense(q, k, v, **kw):
    """naive_attention_one over a (B, L, H, D) batch."""
    keep = kw.pop("keep", None)
    slopes = kw.pop("slopes", None)
    outs, lses = [], []
    for b in range(q.shape[0]):
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        o, l = naive_attention_one(q[b], k[b], v[b], keep=None if keep is None else keep[b], slopes=sl, **kw)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def assert_close_all(got, want, tol=TOL):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert max_abs_err(g, w) < tol, max_abs_err(g, w)


# --------------------------------------------------------------------------- vs torch SDPA

@pytest.mark.parametrize("B,H,H_kv,Lq,Lk,D", [(2, 4, 4, 7, 7, 16), (1, 6, 2, 5, 11, 40), (3, 2, 1, 9, 4, 8),
                                              (1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_drop_in_matches_torch(B, H, H_kv, Lq, Lk, D, is_causal):
    q = randn(B, H, Lq, D, requires_grad=True)
    k = randn(B, H_kv, Lk, D, requires_grad=True)
    v = randn(B, H_kv, Lk, D, requires_grad=True)
    gqa = H != H_kv
    with ref:
        out = mmkern.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    assert out.shape == want.shape
    assert max_abs_err(out, want) < TOL
    dout = randn(*out.shape)
    assert_close_all(grads(out, (q, k, v), dout), grads(want, (q, k, v), dout))


@pytest.mark.parametrize("mask_shape", [(7, 9), (2, 1, 7, 9), (1, 3, 1, 9)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_and_mask_gradient(mask_shape, kind):
    q, k, v = (randn(2, 3, n, 16, requires_grad=True) for n in (7, 9, 9))
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True   # torch's math backend gives NaN for rows with no key; keep one
    else:
        mask = randn(*mask_shape, requires_grad=True)
    with ref:
        out = mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert max_abs_err(out, want) < TOL
    inputs = (q, k, v) + ((mask,) if kind == "float" else ())
    dout = randn(*out.shape)
    assert_close_all(grads(out, inputs, dout), grads(want, inputs, dout))


def test_sdpa_fully_masked_row_gives_zeros_not_nan():
    q, k, v = (randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    with ref:
        out = mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------- vs the hand-written oracle

FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(3, 2)),
    "causal_window": dict(causal=True, window=(2, -1)),
    "softcap": dict(softcap=0.7),
    "alibi": dict(alibi=True),
    "everything": dict(causal=True, window=(4, -1), softcap=1.5, alibi=True),
}


def _flash_kwargs(feature, H, B):
    f = dict(FEATURES[feature])
    kw = dict(causal=f.get("causal", False), window_size=f.get("window", (-1, -1)), softcap=f.get("softcap", 0.0))
    slopes = torch.rand(B, H, dtype=torch.float32) if f.get("alibi") else None
    naive = dict(causal=kw["causal"], window=kw["window_size"], softcap=kw["softcap"],
                 slopes=None if slopes is None else slopes.double())
    return kw, slopes, naive


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("Lq,Lk", [(6, 6), (3, 10), (10, 3), (1, 7)])
def test_flash_attn_func_features(feature, Lq, Lk):
    B, H, H_kv, D = 2, 4, 2, 24
    q, k, v = randn(B, Lq, H, D, requires_grad=True), randn(B, Lk, H_kv, D, requires_grad=True), \
        randn(B, Lk, H_kv, D, requires_grad=True)
    kw, slopes, naive_kw = _flash_kwargs(feature, H, B)
    with ref:
        out, lse = mmkern.flash_attn_func(q, k, v, alibi_slopes=slopes, return_lse=True, **kw)
    want, want_lse = naive_dense(q, k, v, **naive_kw)
    assert out.shape == (B, Lq, H, D) and lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    assert max_abs_err(out, want) < TOL
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_abs_err(lse[finite], want_lse[finite]) < 1e-5       # lse is float32
    dout = randn(*out.shape)
    assert_close_all(grads(out, (q, k, v), dout), grads(want, (q, k, v), dout))


def test_lse_gradient_flows():
    q, k, v = (randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    with ref:
        out, lse = mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True)
    want, want_lse = naive_dense(q, k, v, causal=True)
    loss = (out * 0.3).sum() + (lse * torch.linspace(0, 1, 5)).sum()
    want_loss = (want * 0.3).sum() + (want_lse * torch.linspace(0, 1, 5)).sum()
    assert_close_all(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(want_loss, (q, k, v)))


def test_window_hides_every_key_gives_zero_and_minus_inf_lse():
    # Lq > Lk with bottom-right causal: the first Lq - Lk queries see no key
    q, k, v = randn(1, 6, 2, 8), randn(1, 2, 2, 8), randn(1, 2, 2, 8)
    with ref:
        out, lse = mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert (out[:, :4] == 0).all() and torch.isneginf(lse[:, :, :4]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 4:]).all()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_oracle_with_the_same_mask(p):
    B, L, H, D = 2, 5, 3, 8
    q, k, v = (randn(B, L, H, D, requires_grad=True) for _ in range(3))
    seed = seed_drawn_after(123)
    torch.manual_seed(123)
    with ref:
        out = mmkern.flash_attn_func(q, k, v, dropout_p=p, causal=True)
    keep = dropout_keep_mask(seed, (B, H, L, L), p, "cpu")
    want, _ = naive_dense(q, k, v, causal=True, keep=keep, dropout_p=p)
    assert max_abs_err(out, want) < TOL
    dout = randn(*out.shape)
    assert_close_all(grads(out, (q, k, v), dout), grads(want, (q, k, v), dout))


def test_dropout_reproducible_under_manual_seed():
    q, k, v = (randn(2, 16, 2, 8) for _ in range(3))
    runs = []
    for s in (7, 7, 8):
        torch.manual_seed(s)
        with ref:
            runs.append(mmkern.flash_attn_func(q, k, v, dropout_p=0.3))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    keep = dropout_keep_mask(5, (64, 64), 0.3, "cpu")
    assert abs(keep.float().mean().item() - 0.7) < 0.03


@pytest.mark.parametrize("feature", ["plain", "causal", "window", "everything"])
def test_varlen_matches_per_sequence_oracle(feature):
    lens_q, lens_k = [3, 0, 1, 6], [5, 2, 0, 6]
    H, H_kv, D = 4, 1, 12
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = randn(sum(lens_q), H, D, requires_grad=True)
    k, v = (randn(sum(lens_k), H_kv, D, requires_grad=True) for _ in range(2))
    kw, slopes, naive_kw = _flash_kwargs(feature, H, len(lens_q))
    with ref:
        out, lse = mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                 alibi_slopes=slopes, return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (H, sum(lens_q))
    outs, lses = [], []
    for b in range(len(lens_q)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        nk = dict(naive_kw, slopes=None if slopes is None else naive_kw["slopes"][b])
        o, l = naive_attention_one(q[sq], k[sk], v[sk], **nk)
        outs.append(o)
        lses.append(l)
    want, want_lse = torch.cat(outs), torch.cat(lses, 1)
    assert max_abs_err(out, want) < TOL
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))
    dout = randn(*out.shape)
    assert_close_all(grads(out, (q, k, v), dout), grads(want, (q, k, v), dout))


@pytest.mark.parametrize("feature", ["plain", "causal", "window", "everything"])
def test_kvcache_appends_in_place_and_attends(feature):
    B, H, H_kv, D, L_cache, L_new, Lq = 3, 4, 2, 16, 12, 2, 2
    k_cache, v_cache = randn(B, L_cache, H_kv, D), randn(B, L_cache, H_kv, D)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    cache_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
    q, k_new, v_new = randn(B, Lq, H, D), randn(B, L_new, H_kv, D), randn(B, L_new, H_kv, D)
    kw, slopes, naive_kw = _flash_kwargs(feature, H, B)
    with ref:
        out, lse = mmkern.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                                  alibi_slopes=slopes, return_lse=True, **kw)
    for b, n in enumerate(cache_seqlens.tolist()):
        assert torch.equal(k_cache[b, n:n + L_new], k_new[b]) and torch.equal(v_cache[b, n:n + L_new], v_new[b])
        assert torch.equal(k_cache[b, :n], k_before[b, :n]) and torch.equal(k_cache[b, n + L_new:], k_before[b, n + L_new:])
        nk = dict(naive_kw, slopes=None if slopes is None else naive_kw["slopes"][b])
        want, want_lse = naive_attention_one(q[b], k_cache[b, :n + L_new], v_cache[b, :n + L_new], **nk)
        assert max_abs_err(out[b], want) < TOL
        assert torch.equal(torch.isfinite(lse[b]), torch.isfinite(want_lse))


def test_kvcache_without_new_keys_and_int_seqlens():
    q, k_cache, v_cache = randn(2, 1, 2, 8), randn(2, 9, 2, 8), randn(2, 9, 2, 8)
    with ref:
        out = mmkern.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=5)
        full = mmkern.flash_attn_with_kvcache(q, k_cache, v_cache)
    want = torch.stack([naive_attention_one(q[b], k_cache[b, :5], v_cache[b, :5])[0] for b in range(2)])
    assert max_abs_err(out, want) < TOL
    assert max_abs_err(full, naive_dense(q, k_cache, v_cache)[0]) < TOL


# --------------------------------------------------------------------------- dtypes, layouts, edge shapes

@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_inputs_give_rounded_float64_results(dtype):
    q, k, v = (randn(2, 9, 3, 40).to(dtype) for _ in range(3))
    with ref:
        out = mmkern.flash_attn_func(q, k, v, causal=True)
    want, _ = naive_dense(q.double(), k.double(), v.double(), causal=True)
    assert out.dtype == dtype
    assert max_abs_err(out, want) <= max_abs_err(want.to(dtype), want) + 1e-12


def test_empty_batch_and_strided_inputs():
    with ref:
        out = mmkern.flash_attn_func(*(randn(0, 5, 2, 8) for _ in range(3)))
        assert out.shape == (0, 5, 2, 8)
        base = randn(2, 6, 3, 16)
        q = base[:, :, :, ::2]                 # last dimension not contiguous: copied, not misread
        out = mmkern.flash_attn_func(q, q, q)
    assert max_abs_err(out, naive_dense(q, q, q)[0]) < TOL


def test_softmax_scale_is_used():
    q, k, v = (randn(1, 4, 1, 8) for _ in range(3))
    with ref:
        out = mmkern.flash_attn_func(q, k, v, softmax_scale=0.05)
    assert max_abs_err(out, naive_dense(q, k, v, scale=0.05)[0]) < TOL
    assert max_abs_err(out, naive_dense(q, k, v)[0]) > 1e-3


def test_length_one_and_odd_head_dim():
    q, k, v = randn(1, 1, 1, 80), randn(1, 1, 1, 80), randn(1, 1, 1, 80)
    with ref:
        out = mmkern.flash_attn_func(q, k, v)
    assert max_abs_err(out, v) < TOL and not math.isnan(out.sum().item())
