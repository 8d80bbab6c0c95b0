"""Property-based parity of the attention functions: hypothesis draws the arguments, every usable
backend is compared with the float64 oracle (flash-attn's criterion). See tests/fuzz_profiles.py
for the profiles (MMKERN_FUZZ_PROFILE=ci|gpu), the seed and the printed counts.

Drawn: batch 0..3, lengths 0..~20 (Lq != Lk), head dims incl. 1 and non-powers of two, GQA/MQA
ratios, causal / sliding window / softcap / ALiBi ((H,) and (B, H)) / dropout in any combination,
softmax_scale, strided and non-contiguous views, varlen length lists with empty sequences and
max_seqlen larger than needed, KV-cache fills from empty to full with appends, SDPA bool/float
masks (with -inf and fully masked rows) broadcast from lower ranks, and the dtype.
Dropout is compared element for element: the oracle draws the backend's own keep mask (its
test-path function, fuzz_profiles.ATTENTION_MASKS).
"""
import pytest
import torch
from hypothesis import assume, given, strategies as st

import mmkern
import fuzz_profiles as fz
from fuzz_profiles import fuzz
from mmkern import verify

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
HEAD_DIMS = [1, 3, 8, 16, 24, 40, 64, 72, 80, 96, 128, 160, 256] if fz.GPU else [1, 3, 8, 16, 24, 40, 64, 72]
MAX_LEN = 300 if fz.GPU else 17
ATTN_OPS = ("attention_forward", "attention_backward")


@pytest.fixture(autouse=True, scope="module")
def _summary(pytestconfig):
    fz.register_summary(pytestconfig)


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=fz.DEVICE)


# A plain input of the attention forward (fp32, head dim 8, dense, no features), for every_backend_checks
TYPICAL = dict(q=torch.zeros(2, 9, 2, 8, device=fz.DEVICE), k=torch.zeros(2, 9, 2, 8, device=fz.DEVICE),
               v=torch.zeros(2, 9, 2, 8, device=fz.DEVICE), alibi_slopes=None, attn_mask=None, dropout_p=0.0)


@st.composite
def features(draw, allow_dropout=True):
    """causal, window, softcap, alibi kind, dropout_p, softmax_scale."""
    causal = draw(st.booleans())
    window = (draw(st.integers(-1, 12)), draw(st.integers(-1, 12))) if draw(st.booleans()) else (-1, -1)
    softcap = draw(st.sampled_from([0.0, 0.0, 0.5, 5.0, 30.0]))
    alibi = draw(st.sampled_from([None, None, "heads", "batch_heads"]))
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.17, 0.5])) if allow_dropout else 0.0
    scale = draw(st.sampled_from([None, None, 0.05, 1.3]))
    return dict(causal=causal, window_size=window, softcap=softcap, alibi=alibi, dropout_p=dropout_p,
                softmax_scale=scale)


def _slopes(kind, B, H):
    if kind is None:
        return None
    return torch.rand(H, device=fz.DEVICE) if kind == "heads" else torch.rand(B, H, device=fz.DEVICE)


def _feature_inputs(feats) -> dict:
    """The attention op's schema arguments for drawn features (what the backends' reasons read)."""
    left, right = feats["window_size"]
    return dict(causal=feats["causal"], window_left=left, window_right=right, softcap=feats["softcap"],
                dropout_p=feats["dropout_p"], softmax_scale=feats["softmax_scale"] or 1.0)


def _run_backends(test, case, ops, inputs_for_reasons, dtype, dropout_p, device=fz.DEVICE):
    """Checks `case` on every backend that takes it; dropout only where the backend's mask is known."""
    checked = 0
    for backend in fz.backends():
        if not all(fz.takes(backend, op, device, inputs_for_reasons) for op in ops[:1]):
            fz.COUNTS[(test, f"not taken[{backend}]")] += 1
            continue
        if dropout_p > 0 and not fz.has_mask_function(backend, "attention"):
            fz.COUNTS[(test, f"dropout, no mask function[{backend}]")] += 1
            continue
        fz.check(test, case, backend, dtype, family="attention" if dropout_p > 0 else None)
        checked += 1
    assert checked, "no backend checked this example"


@fz.every_backend_checks(["flash_attn_func"], ATTN_OPS, TYPICAL)
@fuzz(ci=6, gpu=80)
@given(data=st.data(), dtype=DTYPES, feats=features())
def test_flash_attn_func_matches_oracle(data, dtype, feats):
    test = "flash_attn_func"
    with fz.counted(test):
        B = data.draw(st.integers(0, 3), "batch")
        Lq = data.draw(st.integers(0, MAX_LEN), "Lq")
        Lk = data.draw(st.integers(0, MAX_LEN), "Lk")
        H_kv = data.draw(st.integers(1, 3), "H_kv")
        group = data.draw(st.sampled_from([1, 1, 2, 3]), "group")
        D = data.draw(st.sampled_from(HEAD_DIMS), "head_dim")
        layouts = data.draw(st.tuples(*[st.sampled_from(fz.LAYOUTS)] * 3), "layouts")
        deterministic = data.draw(st.booleans(), "deterministic")
        H = H_kv * group
        slopes = _slopes(feats["alibi"], B, H)
        shape = f"B{B} Lq{Lq} Lk{Lk} H{H}/{H_kv} D{D} {feats} {layouts}"

        def run(q, k, v):
            q, k, v = (fz.as_layout(t, lay) for t, lay in zip((q, k, v), layouts))
            return mmkern.flash_attn_func(q, k, v, dropout_p=feats["dropout_p"], softmax_scale=feats["softmax_scale"],
                                          causal=feats["causal"], window_size=feats["window_size"],
                                          softcap=feats["softcap"], alibi_slopes=slopes, deterministic=deterministic,
                                          return_lse=True)

        inputs = dict(q=_randn(B, Lq, H, D), k=_randn(B, Lk, H_kv, D), v=_randn(B, Lk, H_kv, D))
        case = verify.Case(test, shape, lambda: inputs, fz.seeded(run, 1234), cast=("q", "k", "v"),
                           grad=("q", "k", "v"), outputs=("out", "lse"))
        reasons_inputs = dict(q=inputs["q"].to(dtype), k=inputs["k"].to(dtype), v=inputs["v"].to(dtype),
                              alibi_slopes=slopes, attn_mask=None, **_feature_inputs(feats))
        _run_backends(test, case, ATTN_OPS, reasons_inputs, dtype, feats["dropout_p"])


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32,
                        device=fz.DEVICE)


@fz.every_backend_checks(["flash_attn_varlen_func"], ATTN_OPS, TYPICAL)
@fuzz(ci=5, gpu=80)
@given(data=st.data(), dtype=DTYPES, feats=features())
def test_flash_attn_varlen_func_matches_oracle(data, dtype, feats):
    test = "flash_attn_varlen_func"
    with fz.counted(test):
        n = data.draw(st.integers(1, 4), "sequences")
        lens_q = data.draw(st.lists(st.integers(0, MAX_LEN), min_size=n, max_size=n), "lens_q")
        lens_k = data.draw(st.lists(st.integers(0, MAX_LEN), min_size=n, max_size=n), "lens_k")
        extra = data.draw(st.integers(0, 2), "max_seqlen slack")
        H_kv = data.draw(st.integers(1, 2), "H_kv")
        group = data.draw(st.sampled_from([1, 2, 4]), "group")
        D = data.draw(st.sampled_from(HEAD_DIMS), "head_dim")
        layout = data.draw(st.sampled_from(fz.LAYOUTS), "layout")
        H = H_kv * group
        slopes = _slopes(feats["alibi"], n, H)
        cu_q, cu_k = _cu(lens_q), _cu(lens_k)
        max_q, max_k = max(lens_q) + extra, max(lens_k) + extra
        shape = f"lens_q {lens_q} lens_k {lens_k} +{extra} H{H}/{H_kv} D{D} {feats} {layout}"

        def run(q, k, v):
            q, k, v = (fz.as_layout(t, layout) for t in (q, k, v))
            return mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=feats["dropout_p"],
                                                 softmax_scale=feats["softmax_scale"], causal=feats["causal"],
                                                 window_size=feats["window_size"], softcap=feats["softcap"],
                                                 alibi_slopes=slopes, return_lse=True)

        inputs = dict(q=_randn(sum(lens_q), H, D), k=_randn(sum(lens_k), H_kv, D), v=_randn(sum(lens_k), H_kv, D))
        case = verify.Case(test, shape, lambda: inputs, fz.seeded(run, 99), cast=("q", "k", "v"),
                           grad=("q", "k", "v"), outputs=("out", "lse"))
        reasons_inputs = dict(q=inputs["q"].to(dtype), k=inputs["k"].to(dtype), v=inputs["v"].to(dtype),
                              alibi_slopes=slopes, attn_mask=None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=max_q, max_seqlen_k=max_k, **_feature_inputs(feats))
        _run_backends(test, case, ATTN_OPS, reasons_inputs, dtype, feats["dropout_p"])


@fz.every_backend_checks(["flash_attn_with_kvcache"], ("attention_forward",), TYPICAL)
@fuzz(ci=4, gpu=80)
@given(data=st.data(), dtype=DTYPES, feats=features(allow_dropout=False))
def test_flash_attn_with_kvcache_matches_oracle(data, dtype, feats):
    test = "flash_attn_with_kvcache"
    with fz.counted(test):
        B = data.draw(st.integers(1, 3), "batch")
        L_cache = data.draw(st.integers(1, MAX_LEN + 4), "cache length")
        L_new = data.draw(st.integers(0, min(3, L_cache)), "appended")
        Lq = data.draw(st.integers(1, 4), "Lq")
        used = data.draw(st.lists(st.integers(0, L_cache - L_new), min_size=B, max_size=B), "cache_seqlens")
        H_kv = data.draw(st.integers(1, 2), "H_kv")
        group = data.draw(st.sampled_from([1, 2, 4]), "group")
        D = data.draw(st.sampled_from(HEAD_DIMS), "head_dim")
        H = H_kv * group
        slopes = _slopes(feats["alibi"], B, H)
        seqlens = torch.tensor(used, dtype=torch.int32, device=fz.DEVICE)
        shape = f"B{B} Lq{Lq} cache {L_cache} used {used} +{L_new} H{H}/{H_kv} D{D} {feats}"

        def run(q, k_cache, v_cache, k, v):
            out = mmkern.flash_attn_with_kvcache(
                q, k_cache, v_cache, k if L_new else None, v if L_new else None, cache_seqlens=seqlens,
                softmax_scale=feats["softmax_scale"], causal=feats["causal"], window_size=feats["window_size"],
                softcap=feats["softcap"], alibi_slopes=slopes, return_lse=True)
            return (*out, k_cache, v_cache)          # the caches after the in-place append are outputs too

        inputs = dict(q=_randn(B, Lq, H, D), k_cache=_randn(B, L_cache, H_kv, D), v_cache=_randn(B, L_cache, H_kv, D),
                      k=_randn(B, L_new, H_kv, D), v=_randn(B, L_new, H_kv, D))
        case = verify.Case(test, shape, lambda: inputs, run, cast=tuple(inputs),
                           outputs=("out", "lse", "k_cache", "v_cache"))
        reasons_inputs = dict(q=inputs["q"].to(dtype), k=inputs["k_cache"].to(dtype), v=inputs["v_cache"].to(dtype),
                              alibi_slopes=slopes, attn_mask=None, **_feature_inputs(dict(feats, dropout_p=0.0)))
        _run_backends(test, case, ("attention_forward",), reasons_inputs, dtype, 0.0)


@fz.every_backend_checks(["scaled_dot_product_attention"], ATTN_OPS, TYPICAL)
@fuzz(ci=5, gpu=80)
@given(data=st.data(), dtype=DTYPES)
def test_scaled_dot_product_attention_matches_oracle(data, dtype):
    test = "scaled_dot_product_attention"
    with fz.counted(test):
        B = data.draw(st.integers(0, 2), "batch")
        Lq = data.draw(st.integers(0, MAX_LEN), "Lq")
        Lk = data.draw(st.integers(0, MAX_LEN), "Lk")
        H_kv = data.draw(st.integers(1, 2), "H_kv")
        group = data.draw(st.sampled_from([1, 2]), "group")
        D = data.draw(st.sampled_from(HEAD_DIMS), "head_dim")
        mask_kind = data.draw(st.sampled_from([None, "causal", "bool", "float"]), "mask")
        mask_rank = data.draw(st.integers(2, 4), "mask rank")
        dropout_p = data.draw(st.sampled_from([0.0, 0.0, 0.3]), "dropout_p")
        scale = data.draw(st.sampled_from([None, 0.2]), "scale")
        layout = data.draw(st.sampled_from(fz.LAYOUTS), "layout")
        H = H_kv * group
        mask_shape = (B, H, Lq, Lk)[4 - mask_rank:]
        if mask_rank == 4 and data.draw(st.booleans(), "broadcast heads"):
            mask_shape = (B, 1, Lq, Lk)
        inputs = dict(q=_randn(B, H, Lq, D), k=_randn(B, H_kv, Lk, D), v=_randn(B, H_kv, Lk, D))
        cast, grad = ["q", "k", "v"], ["q", "k", "v"]
        if mask_kind == "bool":
            share = data.draw(st.sampled_from([0.1, 0.5, 0.9]), "masked share")
            inputs["mask"] = torch.rand(mask_shape, device=fz.DEVICE) > share
        elif mask_kind == "float":
            m = _randn(*mask_shape)
            # -inf: masked out
            inputs["mask"] = m.masked_fill(torch.rand(mask_shape, device=fz.DEVICE) < 0.3, float("-inf"))
            cast.append("mask"), grad.append("mask")
        shape = f"B{B} H{H}/{H_kv} Lq{Lq} Lk{Lk} D{D} mask {mask_kind} {mask_shape} p{dropout_p} {layout}"

        def run(q, k, v, mask=None):
            q, k, v = (fz.as_layout(t, layout) for t in (q, k, v))
            return (mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                        is_causal=mask_kind == "causal", scale=scale,
                                                        enable_gqa=group > 1),)

        case = verify.Case(test, shape, lambda: inputs, fz.seeded(run, 7), cast=tuple(cast), grad=tuple(grad))
        q, k, v = (inputs[n].to(dtype).transpose(1, 2) for n in ("q", "k", "v"))
        mask = inputs.get("mask")
        reasons_inputs = dict(q=q, k=k, v=v, alibi_slopes=None, dropout_p=dropout_p, causal=mask_kind == "causal",
                              causal_bottom_right=False,
                              attn_mask=None if mask is None else mask.to(dtype if mask.is_floating_point() else
                                                                          torch.bool).expand(B, H, Lq, Lk))
        _run_backends(test, case, ATTN_OPS, reasons_inputs, dtype, dropout_p)
