"""The CUDA C++ flash attention backward (csrc/attention/attention_backward.cu) on a GPU: dq, dk, dv (and the
gradient that flows in through lse, return_lse=True) against the float64 reference (flash-attn's criterion,
mmkern.verify.measure) and against the Triton backend, for every feature the kernels take: dense, causal
bottom-right, cross attention Lq != Lk (rows that see no key), GQA, MQA, varlen with empty sequences, seqused_k
(keys past it get a zero gradient) x fp16, bf16 x head dims 64, 96, 128 at awkward lengths (1, 17, 65, 129, 200);
non-contiguous and misaligned views; unwritten outputs show (the allocator's memory is poisoned first);
deterministic=True run twice gives bitwise-identical gradients.

Without a GPU the whole module is skipped: nothing CUDA runs here (tests/test_native_attention_backward.py checks
what a CPU machine can: the ptxas report, the SASS, and a lane-level model of the kernels' fragment mapping).
"""
import math

import pytest
import torch

import mmkern
from mmkern.verify import Case
from conftest import assert_backend_matches_oracle
from cuda_attention_cases import DENSE, DEVICE, HALF, HEAD_DIMS, cu, cuda_backend, r, requires_gpu  # noqa: F401

pytestmark = [requires_gpu, pytest.mark.usefixtures("cuda_backend")]

GRAD = ("q", "k", "v")
# every row sees a key (lse finite): the cases whose lse gradient is checked
LSE_CASES = ("causal 129", "cross causal 17x129", "GQA 4/2 causal 65x200", "MQA 8/1 1x257")


def _with_lse(out, lse, varlen):
    """One output that depends on both: out + lse broadcast over head_dim (the backward sees dout and dlse)."""
    lse_like_out = lse.transpose(0, 1) if varlen else lse.transpose(1, 2)       # (.., L, H)
    return (out.float() + lse_like_out.unsqueeze(-1),)


def dense_case(name, D, through_lse=False):
    B, Lq, Lk, H, H_kv, causal = DENSE[name]

    def run(q, k, v):
        out, lse = mmkern.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        return _with_lse(out, lse, False) if through_lse else (out, lse)

    return Case("flash_attn_func" + (" through lse" if through_lse else ""), f"{name} D{D}",
                lambda: dict(q=r(B, Lq, H, D), k=r(B, Lk, H_kv, D), v=r(B, Lk, H_kv, D)), run,
                cast=GRAD, grad=GRAD)


LENS_Q, LENS_K = [5, 0, 1, 130, 64, 17], [7, 9, 0, 131, 64, 3]


def varlen_case(causal, D, through_lse=False, H=4, H_kv=2):
    cu_q, cu_k = cu(LENS_Q), cu(LENS_K)

    def run(q, k, v):
        out, lse = mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), causal=causal,
                                                 return_lse=True)
        return _with_lse(out, lse, True) if through_lse else (out, lse)

    return Case("flash_attn_varlen_func" + (" through lse" if through_lse else ""),
                f"{'causal ' if causal else ''}lens {LENS_Q}/{LENS_K} D{D}",
                lambda: dict(q=r(sum(LENS_Q), H, D), k=r(sum(LENS_K), H_kv, D), v=r(sum(LENS_K), H_kv, D)), run,
                cast=GRAD, grad=GRAD)


def all_cases(D):
    return [dense_case(name, D) for name in DENSE] + [varlen_case(c, D) for c in (False, True)]


def lse_cases(D):
    # varlen with lens_k >= lens_q would be needed for causal rows to all see a key: the non-causal one has
    # empty key sequences (lengths 0 with queries), so only the dense cases go through lse
    return [dense_case(name, D, through_lse=True) for name in LSE_CASES]


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gradients_match_the_float64_reference(D):
    for case in all_cases(D):
        assert_backend_matches_oracle("cuda", case, dtypes=HALF)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_the_lse_gradient_matches_the_float64_reference(D):
    for case in lse_cases(D):
        assert_backend_matches_oracle("cuda", case, dtypes=HALF)


def _grads(case, backend, dtype, inputs, dout_seed=0):
    """dq, dk, dv of the case's first output under `backend` (inputs cast to dtype), a fixed random dout."""
    with mmkern.backend(backend):
        leaves = {n: (t.to(dtype) if n in case.cast else t).clone().requires_grad_(n in case.grad)
                  for n, t in inputs.items()}
        first = case.run(**leaves)[0]
        generator = torch.Generator(device=DEVICE).manual_seed(dout_seed)
        dout = torch.randn(first.shape, generator=generator, device=DEVICE, dtype=torch.float64).to(first.dtype)
        return torch.autograd.grad(first, [leaves[n] for n in case.grad], dout)


def _err(a, b):
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() if a.numel() else 0.0


def _scale(t):
    return max(t.abs().max().item() if t.numel() else 0.0, 1e-3)


def triton_cases(D):
    """One case per feature (each new Triton constexpr combination compiles and autotunes on the GPU: the full
    matrix is the float64 tests' job)."""
    return ([dense_case(name, D) for name in ("causal 129", "cross causal 129x17 (rows without keys)",
                                              "GQA 4/2 causal 65x200", "MQA 8/1 1x257")]
            + [varlen_case(True, D), dense_case("cross causal 17x129", D, through_lse=True)])


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gradients_match_the_triton_backend(D, dtype):
    """cuda vs triton on the same inputs: within twice the triton kernel's own error against float64 plus a few
    units in the last place (both accumulate in fp32, in different orders and tile sizes)."""
    for case in triton_cases(D):
        inputs = case.make()
        oracle = _grads(case, "reference", torch.float64, inputs)
        ours, theirs = _grads(case, "cuda", dtype, inputs), _grads(case, "triton", dtype, inputs)
        for name, a, b, o in zip(("dq", "dk", "dv"), ours, theirs, oracle):
            assert a.shape == b.shape and a.dtype == b.dtype == dtype, (case.shape, name)
            assert not a.isnan().any(), f"{case.op} {case.shape} {name}: NaN"
            tolerance = 2 * _err(b, o) + 4 * torch.finfo(dtype).eps * _scale(o)
            assert _err(a, b) <= tolerance, f"{case.op} {case.shape} {name}: |cuda - triton| {_err(a, b):.3e} > " \
                                            f"{tolerance:.3e}"


def _backward_op(backend, dout, q, k, v, out, lse, dlse=None, cu_q=None, cu_k=None, seqused_k=None, max_q=None,
                 max_k=None, causal=False, deterministic=True):
    max_q = q.shape[1] if max_q is None else max_q
    max_k = k.shape[1] if max_k is None else max_k
    with mmkern.backend(backend):
        dq, dk, dv, _ = torch.ops.mmkern.attention_backward(
            dout, q, k, v, out, lse, dlse, cu_q, cu_k, seqused_k, max_q, max_k, 1 / math.sqrt(q.shape[-1]), causal,
            True, -1, -1, 0.0, None, None, 0.0, None, deterministic, False)
    return dq, dk, dv


def _forward_op(backend, q, k, v, seqused_k=None, causal=False):
    with mmkern.backend(backend):
        return torch.ops.mmkern.attention_forward(q, k, v, None, None, seqused_k, q.shape[1], k.shape[1],
                                                  1 / math.sqrt(q.shape[-1]),
                                                  causal, True, -1, -1, 0.0, None, None, 0.0, None, True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_seqused_k_keys_past_the_used_length_get_zero_gradient(D, causal):
    """seqused_k (B,) caps the keys of each sequence (a KV cache): the backward op with seqused_k against the
    float64 reference and the Triton backend; the gradient of every key past seqused_k is exactly 0."""
    B, Lq, Lk, H, H_kv = 4, 17, 200, 8, 2
    used = torch.tensor([0, 17, 129, 200], dtype=torch.int32, device=DEVICE)
    q64, k64, v64, dout64 = r(B, Lq, H, D), r(B, Lk, H_kv, D), r(B, Lk, H_kv, D), r(B, Lq, H, D)
    for dtype in HALF:
        q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
        out, lse = _forward_op("cuda", q, k, v, used, causal)
        ours = _backward_op("cuda", dout, q, k, v, out, lse, seqused_k=used, causal=causal)
        theirs = _backward_op("triton", dout, q, k, v, out, lse, seqused_k=used, causal=causal)
        out64, lse64 = _forward_op("reference", q64, k64, v64, used, causal)
        oracle = _backward_op("reference", dout64, q64, k64, v64, out64, lse64, seqused_k=used, causal=causal)
        # the Triton backward leaves dk/dv of keys past seqused_k unwritten (torch.empty): compare the used keys
        used_keys = (torch.arange(Lk, device=DEVICE)[None, :] < used[:, None])[..., None, None]
        for name, a, b, o in zip(("dq", "dk", "dv"), ours, theirs, oracle):
            if name != "dq":
                a, b, o = (torch.where(used_keys, t, 0) for t in (a, b, o))
            tolerance = 2 * _err(b, o) + 4 * torch.finfo(dtype).eps * _scale(o)
            assert _err(a, b) <= tolerance, f"{name} {dtype}: |cuda - triton| {_err(a, b):.3e} > {tolerance:.3e}"
            assert _err(a, o) <= 2 * tolerance, f"{name} {dtype}: |cuda - float64| {_err(a, o):.3e}"
        for batch, n in enumerate(used.tolist()):
            assert (ours[1][batch, n:] == 0).all() and (ours[2][batch, n:] == 0).all()


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_deterministic_runs_are_bitwise_identical(D):
    """deterministic=True (and False: the kernels have no atomics at all) twice on the same inputs: the same bits.
    GQA 8/2, causal, several query tiles per key tile and a varlen batch with an empty sequence."""
    q, k, v, dout = (torch.randn(2, 300, 8, D, device=DEVICE, dtype=torch.float16) for _ in range(4))
    k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    out, lse = _forward_op("cuda", q, k, v, causal=True)
    cu_q = cu([100, 0, 200])
    packed = dict(cu_q=cu_q, cu_k=cu_q, max_q=200, max_k=200, causal=True)
    out_p, lse_p = torch.ops.mmkern_C.attention_forward(q[0], k[0], v[0], cu_q, cu_q, None, 200, 200,
                                                        1 / math.sqrt(D), True)
    for deterministic in (True, False):
        runs = [_backward_op("cuda", dout, q, k, v, out, lse, causal=True, deterministic=deterministic)
                + _backward_op("cuda", dout[0], q[0], k[0], v[0], out_p, lse_p, deterministic=deterministic, **packed)
                for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_unwritten_gradients_would_show(D):
    """The caching allocator hands back freed blocks: fill them with NaN first, so an element the kernels do not
    write stays NaN (varlen with empty sequences on either side, rows that see no key, GQA)."""
    lens_q, lens_k = [0, 33, 70, 5], [9, 0, 40, 80]
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    for _ in range(3):
        junk = torch.full((sum(lens_q) * 8 * D * 8,), math.nan, device=DEVICE, dtype=torch.bfloat16)
        junk32 = torch.full((sum(lens_q) * 8 * 4,), math.nan, device=DEVICE)
        del junk, junk32
        q = torch.randn(sum(lens_q), 8, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(sum(lens_k), 2, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(sum(lens_k), 2, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        with mmkern.backend("cuda"):
            out = mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
            out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert not t.grad.isnan().any()
        assert (q.grad[:33] == 0).all() and (k.grad[:9] == 0).all()    # seq 1: no key; seq 0: no query
        assert (q.grad[33:33 + 30] == 0).all()     # sequence 2: 70 queries, 40 keys, causal: rows 0..29 see none


def test_strided_and_misaligned_views():
    """q/k/v and dout as (B, H, L, D) tensors transposed to (B, L, H, D) views, a view starting 1 element into its
    storage (not 16-byte aligned), a view of the first half of a wider tensor: the host code copies what the
    kernels cannot read in place."""
    B, L, H, D = 2, 77, 4, 96
    q = torch.randn(B, H, L, D, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    flat = torch.randn(B * L * H * D + 1, device=DEVICE, dtype=torch.float16)
    k = flat[1:].view(B, L, H, D)
    v = torch.randn(B, L, H, 2 * D, device=DEVICE, dtype=torch.float16)[..., :D]
    dout = torch.randn(B, H, L, D, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    grads = {}
    for backend, dtype in (("cuda", torch.float16), ("reference", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() if dtype != t.dtype else t.detach().requires_grad_() for t in (q, k, v)]
        with mmkern.backend(backend):
            out = mmkern.flash_attn_func(*leaves, causal=True)
            out.backward(dout.to(dtype))
        grads[backend] = [t.grad for t in leaves]
    for name, a, b in zip(("dq", "dk", "dv"), grads["cuda"], grads["reference"]):
        assert a.shape == b.shape
        assert _err(a, b) < 2e-2 * _scale(b), name


def test_a_long_sequence_against_torch_sdpa():
    """L = 2048, bf16, D 128, causal, GQA 8/2: many query and key tiles (the cp.async pipelines' steady state)
    against the gradients of torch's SDPA in float32."""
    q = torch.randn(1, 2048, 8, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2048, 2, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 2048, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    with mmkern.backend("cuda"):
        mmkern.flash_attn_func(q, k, v, causal=True).backward(dout)
    q32, k32, v32 = (t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q32, k32.repeat_interleave(4, 1), v32.repeat_interleave(4, 1), is_causal=True)
    ref.backward(dout.float().transpose(1, 2))
    for name, ours, theirs in (("dq", q.grad, q32.grad), ("dk", k.grad, k32.grad), ("dv", v.grad, v32.grad)):
        theirs = theirs.transpose(1, 2)
        assert _err(ours, theirs) < 2e-2 * _scale(theirs), name
