"""The CUDA C++ flash attention forward (csrc/attention/attention_forward.cu) on a GPU: parity with the
float64 reference (flash-attn's criterion, mmkern.verify.measure) and with the Triton backend, for every
feature the kernel takes (dense, causal bottom-right, cross attention Lq != Lk, GQA, MQA, varlen with empty
sequences, seqused_k / KV cache) x fp16, bf16 x head dims 64, 96, 128, at awkward lengths (1, 17, 129, rows
that see no key); lse too; non-contiguous and misaligned views; unwritten outputs show (the allocator's
memory is poisoned first); a race check (the same inputs twice give bitwise-identical results).
The backward's parity tests are tests/test_cuda_attention_backward.py.

Without a GPU the whole module is skipped: nothing CUDA runs here (tests/test_native_attention.py checks
what a CPU machine can: registration, reasons, the ptxas report and the SASS).
"""
import math

import pytest
import torch

import mmkern
from mmkern.verify import Case
from conftest import assert_backend_matches_oracle
from cuda_attention_cases import DENSE, DEVICE, HALF, HEAD_DIMS, cu, cuda_backend, r, requires_gpu  # noqa: F401

pytestmark = [requires_gpu, pytest.mark.usefixtures("cuda_backend")]


def dense_case(name, D):
    B, Lq, Lk, H, H_kv, causal = DENSE[name]
    return Case("flash_attn_func", f"{name} D{D}",
                lambda: dict(q=r(B, Lq, H, D), k=r(B, Lk, H_kv, D), v=r(B, Lk, H_kv, D)),
                lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=causal, return_lse=True),
                cast=("q", "k", "v"))


LENS_Q, LENS_K = [5, 0, 1, 130, 64, 17], [7, 9, 0, 131, 64, 3]


def varlen_case(causal, D, H=4, H_kv=2):
    cu_q, cu_k = cu(LENS_Q), cu(LENS_K)
    return Case("flash_attn_varlen_func", f"{'causal ' if causal else ''}lens {LENS_Q}/{LENS_K} D{D}",
                lambda: dict(q=r(sum(LENS_Q), H, D), k=r(sum(LENS_K), H_kv, D), v=r(sum(LENS_K), H_kv, D)),
                lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K),
                                                               causal=causal, return_lse=True),
                cast=("q", "k", "v"))


def kvcache_case(Lq, causal, D, H=8):
    seqlens = torch.tensor([0, 17, 129, 200], dtype=torch.int32, device=DEVICE)
    return Case("flash_attn_with_kvcache", f"Lq{Lq} H{H}/2 cache 200 used {seqlens.tolist()} D{D}",
                lambda: dict(q=r(4, Lq, H, D), kc=r(4, 200, 2, D), vc=r(4, 200, 2, D)),
                lambda q, kc, vc: mmkern.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=causal,
                                                                 return_lse=True),
                cast=("q", "kc", "vc"))


def all_cases(D):
    return ([dense_case(name, D) for name in DENSE] + [varlen_case(c, D) for c in (False, True)]
            + [kvcache_case(Lq, c, D) for Lq, c in ((1, True), (17, True), (17, False))])


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_forward_matches_the_float64_reference(D):
    for case in all_cases(D):
        assert_backend_matches_oracle("cuda", case, dtypes=HALF)


def _run(case, backend, dtype, inputs):
    with mmkern.backend(backend):
        return [t.clone() for t in case.run(**{n: (t.to(dtype) if n in case.cast else t) for n, t in inputs.items()})]


def _err(a, b):
    a, b = a.double(), b.double()
    same = a == b          # equal infinities (lse = -inf) are exact
    return torch.where(same, torch.zeros_like(a), (a - b).abs()).max().item() if a.numel() else 0.0


def triton_cases(D):
    """One case per sequence layout (dense, varlen, KV cache), all grouped 4/2 and causal: each Triton
    specialisation is a JIT compile on the GPU machine (seconds), so the comparison keeps to a few."""
    return [dense_case("GQA 4/2 causal 65x200", D), varlen_case(True, D), kvcache_case(17, True, D, H=4)]


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_forward_matches_the_triton_backend(D, dtype):
    """cuda vs triton on the same inputs: within twice the triton kernel's own error against float64 plus a few
    units in the last place (both accumulate in fp32 but in different orders and tile sizes)."""
    for case in triton_cases(D):
        inputs = case.make()
        with mmkern.backend("reference"):
            oracle = case.run(**inputs)
        ours, theirs = _run(case, "cuda", dtype, inputs), _run(case, "triton", dtype, inputs)
        for name, a, b, o in zip(("out", "lse"), ours, theirs, oracle):
            assert a.shape == b.shape and a.dtype == b.dtype, (case.shape, name)
            scale = max(o[torch.isfinite(o)].abs().max().item() if o.numel() else 0.0, 1e-3)
            tolerance = 2 * _err(b, o) + 4 * torch.finfo(dtype).eps * scale
            assert _err(a, b) <= tolerance, f"{case.op} {case.shape} {name}: |cuda - triton| {_err(a, b):.3e} > " \
                                            f"{tolerance:.3e}"


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_rows_without_keys_give_zero_and_minus_infinity(dtype):
    q, k = r(2, 40, 2, 64).to(dtype), r(2, 9, 2, 64).to(dtype)
    with mmkern.backend("cuda"):
        out, lse = mmkern.flash_attn_func(q, k, k, causal=True, return_lse=True)
    # bottom-right: query i sees key j iff j <= i + 9 - 40, so rows 0..30 see nothing
    assert (out[:, :31] == 0).all() and torch.isneginf(lse[:, :, :31]).all()
    assert torch.isfinite(out[:, 31:]).all() and torch.isfinite(lse[:, :, 31:]).all()


def test_strided_and_misaligned_views():
    """q/k/v as (B, H, L, D) tensors transposed to (B, L, H, D) views, and views starting 1 element into their
    storage (not 16-byte aligned): the host code copies what the kernel cannot read in place."""
    B, L, H, D = 2, 77, 4, 96
    base = torch.randn(B, H, L, D, device=DEVICE, dtype=torch.float16)
    q = base.transpose(1, 2)
    flat = torch.randn(B * L * H * D + 1, device=DEVICE, dtype=torch.float16)
    k = flat[1:].view(B, L, H, D)
    v = torch.randn(B, L, H, 2 * D, device=DEVICE, dtype=torch.float16)[..., :D]
    with mmkern.backend("cuda"):
        out, lse = mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True)
    with mmkern.backend("reference"):
        ref, ref_lse = mmkern.flash_attn_func(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    assert (out.double() - ref).abs().max().item() < 1e-2
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_unwritten_outputs_would_show(D):
    """The caching allocator hands back freed blocks: fill them with NaN first, so an element the kernel does not
    write stays NaN."""
    B, L, H = 3, 200, 4
    for _ in range(3):
        junk = torch.full((B * L * H * D * 4,), math.nan, device=DEVICE, dtype=torch.float16)
        junk32 = torch.full((B * H * L * 4,), math.nan, device=DEVICE)
        del junk, junk32
        q = torch.randn(B, L, H, D, device=DEVICE, dtype=torch.bfloat16)
        with mmkern.backend("cuda"):
            out, lse = mmkern.flash_attn_func(q, q, q, causal=True, return_lse=True)
        assert not out.isnan().any() and not lse.isnan().any()


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_race_check_same_inputs_give_bitwise_identical_outputs(D):
    q, k, v = (torch.randn(2, 300, 8, D, device=DEVICE, dtype=torch.float16) for _ in range(3))
    cu_q = cu([100, 0, 200])
    with mmkern.backend("cuda"):
        first = mmkern.flash_attn_func(q, k[:, :, :2], v[:, :, :2], causal=True, return_lse=True)
        second = mmkern.flash_attn_func(q, k[:, :, :2], v[:, :, :2], causal=True, return_lse=True)
        packed = mmkern.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_q, 200, 200, causal=True, return_lse=True)
        again = mmkern.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_q, 200, 200, causal=True, return_lse=True)
    for a, b in zip(first + packed, second + again):
        assert torch.equal(a, b)


def test_a_long_sequence_against_torch_sdpa():
    """L = 4096, bf16, D 128: many key blocks (the cp.async pipeline's steady state) against torch's SDPA."""
    q, k, v = (torch.randn(1, 4096, 8, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    with mmkern.backend("cuda"):
        out = mmkern.flash_attn_func(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True).transpose(1, 2)
    assert (out.float() - ref).abs().max().item() < 2e-2
