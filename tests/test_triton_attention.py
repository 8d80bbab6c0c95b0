"""Triton flash attention (forward and backward) against the float64 oracle, through the interpreter
on a CPU (small shapes: the interpreter is slow) or on a GPU. Criterion: mmkern.verify.measure."""
import pytest
import torch

import mmkern
from mmkern.verify import Case
from conftest import assert_backend_matches_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def r(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


FEATURES = {
    "plain": {}, "causal": dict(causal=True), "window": dict(window_size=(5, 3)), "softcap": dict(softcap=2.0),
    "alibi": "alibi", "all": "all",
}


def _kwargs(feature, B, H):
    f = FEATURES[feature]
    slopes = torch.rand(B, H, device=DEVICE)
    if f == "alibi":
        return dict(alibi_slopes=slopes)
    if f == "all":
        return dict(causal=True, window_size=(6, -1), softcap=3.0, alibi_slopes=slopes[0])
    return f


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("Lq,Lk,D", [(37, 29, 40), (1, 70, 8), (33, 33, 96)])
def test_flash_attn_func(feature, Lq, Lk, D):
    B, H, H_kv = 2, 4, 2
    kw = _kwargs(feature, B, H)
    case = Case("flash_attn_func", f"{feature} {Lq}x{Lk} D{D}",
                lambda: dict(q=r(B, Lq, H, D), k=r(B, Lk, H_kv, D), v=r(B, Lk, H_kv, D)),
                lambda q, k, v: mmkern.flash_attn_func(q, k, v, return_lse=True, **kw),
                cast=("q", "k", "v"), grad=("q", "k", "v"))
    assert_backend_matches_oracle("triton", case)


@pytest.mark.parametrize("feature", ["plain", "all"])
def test_varlen_with_empty_and_single_sequences(feature):
    lens_q, lens_k = [5, 0, 1, 24], [7, 9, 0, 31]
    cu_q = torch.tensor([0, 5, 5, 6, 30], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 16, 16, 47], dtype=torch.int32, device=DEVICE)
    kw = _kwargs(feature, 4, 4)
    if "alibi_slopes" in kw:
        # per-sequence slopes (B, H): the varlen kernels must read sequence b's row (the dense "all" case
        # already covers the shared (H,) form)
        kw["alibi_slopes"] = torch.rand(len(lens_q), 4, device=DEVICE)
    case = Case("flash_attn_varlen_func", feature,
                lambda: dict(q=r(30, 4, 24), k=r(47, 1, 24), v=r(47, 1, 24)),
                lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                               return_lse=True, **kw),
                cast=("q", "k", "v"), grad=("q", "k", "v"))
    assert_backend_matches_oracle("triton", case)


@pytest.mark.parametrize("mask", ["bool", "float", "causal"])
def test_sdpa_drop_in_masks_and_mask_gradient(mask):
    mask_values = r(2, 1, 9, 13)
    bool_mask = torch.rand(9, 13, device=DEVICE) > 0.4

    def run(q, k, v, m):
        if mask == "causal":
            return (mmkern.scaled_dot_product_attention(q, k, v, is_causal=True),)
        return (mmkern.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask if mask == "bool" else m),)

    case = Case("scaled_dot_product_attention", mask,
                lambda: dict(q=r(2, 4, 9, 16), k=r(2, 4, 13, 16), v=r(2, 4, 13, 16), m=mask_values.clone()),
                run, cast=("q", "k", "v", "m"), grad=("q", "k", "v") + (("m",) if mask == "float" else ()))
    assert_backend_matches_oracle("triton", case)


def test_kvcache_decode():
    seqlens = torch.tensor([0, 17, 40], dtype=torch.int32, device=DEVICE)
    case = Case("flash_attn_with_kvcache", "decode",
                lambda: dict(q=r(3, 2, 4, 64), kc=r(3, 48, 2, 64), vc=r(3, 48, 2, 64), k=r(3, 2, 2, 64),
                             v=r(3, 2, 2, 64)),
                lambda q, kc, vc, k, v: mmkern.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                                       causal=True, return_lse=True),
                cast=("q", "kc", "vc", "k", "v"))
    assert_backend_matches_oracle("triton", case)


# Dropout (the mask against an independent Philox model, forward and gradients against the oracle run with
# that model's mask): tests/test_triton_attention_dropout.py.


def test_backward_is_bitwise_deterministic_and_outputs_fully_written():
    q, k, v = (torch.randn(1, 40, 2, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    runs = []
    for _ in range(2):
        with mmkern.backend("triton"):
            out = mmkern.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_float64_falls_back_to_reference():
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64, device=DEVICE)
    with mmkern.backend("triton"), pytest.raises(mmkern.NoBackendError, match="float64"):
        mmkern.flash_attn_func(q, q, q)


def test_kvcache_backward_gives_zero_gradient_past_cache_seqlens(monkeypatch):
    """Cache rows past cache_seqlens are seen by no query: their dk/dv are exactly 0, not unwritten memory
    (the outputs start as NaN here to show any element the launcher forgets)."""
    import mmkern.triton.attention as A
    monkeypatch.setattr(A, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))
    used = torch.tensor([3, 0, 9], dtype=torch.int32, device=DEVICE)
    q, k, v, dout = r(3, 2, 4, 16).float(), r(3, 9, 2, 16).float(), r(3, 9, 2, 16).float(), r(3, 2, 4, 16).float()
    args = (None, None, used, 2, 9, 0.25, True, True, -1, -1, 0.0, None, None, 0.0, None, False)
    with mmkern.backend("reference"):
        want_out, want_lse = torch.ops.mmkern.attention_forward(q.double(), k.double(), v.double(), *args)
        want = torch.ops.mmkern.attention_backward(dout.double(), q.double(), k.double(), v.double(), want_out,
                                                   want_lse, None, *args, False)
    with mmkern.backend("triton"):
        out, lse = torch.ops.mmkern.attention_forward(q, k, v, *args)
        dq, dk, dv, _ = torch.ops.mmkern.attention_backward(dout, q, k, v, out, lse, None, *args, False)
    for b, n in enumerate(used.tolist()):
        assert (dk[b, n:] == 0).all() and (dv[b, n:] == 0).all()
    for got, oracle in zip((dq, dk, dv), want[:3]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), oracle, rtol=1e-4, atol=1e-5)
