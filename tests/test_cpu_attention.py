"""The `cpu` backend's flash attention (the C++ CPU kernels of mmkern._C: csrc/attention/attention_cpu_*.cpp,
adapter mmkern/native/attention_cpu.py) against the float64 oracle with flash-attn's criterion per output and per
gradient, in float32, float16 and bfloat16, at awkward shapes, with every feature of the public API; its dropout
mask (the Triton kernels' Philox draws, bit for bit); determinism (run to run and across thread counts); the
split over keys; the portable GEMM; memory that stays linear in the sequence length; layouts and bad input."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mmkern
from conftest import DTYPES, assert_backend_matches_oracle, forced
from fuzz_profiles import oracle_draws_masks_of, seeded
from mmkern import dispatch, verify


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Build mmkern._C if missing or stale (cached: fast after the first build), then load it."""
    from mmkern.build import ensure_built
    return ensure_built()


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


def _dense_case(name, B, Lq, Lk, H, H_kv, D, alibi=None, **kwargs):
    def make():
        inputs = dict(q=_randn(B, Lq, H, D), k=_randn(B, Lk, H_kv, D), v=_randn(B, Lk, H_kv, D))
        if alibi == "heads":
            inputs["slopes"] = torch.rand(H, dtype=torch.float32)
        elif alibi == "batch_heads":
            inputs["slopes"] = torch.rand(B, H, dtype=torch.float32)
        return inputs

    def run(q, k, v, slopes=None):
        return mmkern.flash_attn_func(q, k, v, alibi_slopes=slopes, return_lse=True, **kwargs)

    return verify.Case(f"cpu {name}", f"B{B} Lq{Lq} Lk{Lk} H{H}/{H_kv} D{D}", make, run, cast=("q", "k", "v"),
                       grad=("q", "k", "v"), outputs=("out", "lse"))


# every feature, the head dims 8 / 40 / 72 / 96 / 160 / 256, Lq != Lk both ways, GQA 8/2 and 6/1, lengths 0 and 1
DENSE = {
    "plain D8": dict(B=2, Lq=9, Lk=9, H=2, H_kv=2, D=8),
    "causal Lq<Lk GQA 8/2 D40": dict(B=2, Lq=7, Lk=19, H=8, H_kv=2, D=40, causal=True),
    "causal Lq>Lk (empty rows) MQA 6/1 D72": dict(B=1, Lq=13, Lk=6, H=6, H_kv=1, D=72, causal=True),
    "causal square D96": dict(B=2, Lq=17, Lk=17, H=3, H_kv=3, D=96, causal=True),
    "window D24": dict(B=2, Lq=15, Lk=21, H=2, H_kv=2, D=24, window_size=(3, 2)),
    "window causal Lq>Lk D40": dict(B=1, Lq=20, Lk=11, H=4, H_kv=2, D=40, causal=True, window_size=(5, 0)),
    "empty window rows": dict(B=1, Lq=12, Lk=4, H=2, H_kv=2, D=16, window_size=(0, 0)),
    "softcap D160": dict(B=1, Lq=10, Lk=13, H=2, H_kv=1, D=160, softcap=1.5),
    "softcap window alibi": dict(B=2, Lq=11, Lk=11, H=3, H_kv=3, D=24, softcap=2.0, window_size=(4, 2),
                                 alibi="heads"),
    "alibi heads causal GQA": dict(B=2, Lq=11, Lk=14, H=4, H_kv=1, D=16, causal=True, alibi="heads"),
    "alibi batch heads": dict(B=2, Lq=10, Lk=10, H=2, H_kv=2, D=96, alibi="batch_heads"),
    "scale D160": dict(B=1, Lq=5, Lk=8, H=6, H_kv=1, D=160, softmax_scale=0.31),
    "length 1 D256": dict(B=3, Lq=1, Lk=1, H=2, H_kv=2, D=256),
    "decode Lq1 long keys": dict(B=1, Lq=1, Lk=700, H=8, H_kv=2, D=64, causal=True),
    "odd D1": dict(B=1, Lq=3, Lk=5, H=1, H_kv=1, D=1),
    "several key tiles": dict(B=1, Lq=300, Lk=530, H=2, H_kv=1, D=40, causal=True),
    "no keys": dict(B=2, Lq=4, Lk=0, H=2, H_kv=2, D=8),
    "no queries": dict(B=2, Lq=0, Lk=5, H=2, H_kv=2, D=8),
    "empty batch": dict(B=0, Lq=5, Lk=5, H=2, H_kv=2, D=8),
}


@pytest.mark.parametrize("name", DENSE)
def test_flash_attn_func_on_cpu_matches_oracle(name):
    assert_backend_matches_oracle("cpu", _dense_case(name, **DENSE[name]), DTYPES)


def test_top_left_causal_through_sdpa_with_float_mask_gradient():
    """torch's alignment (top-left when Lq != Lk) and a float mask whose gradient is asked for."""
    B, H, Lq, Lk, D = 2, 3, 9, 14, 40

    def run(q, k, v, mask):
        return (mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False),)

    def run_causal(q, k, v, mask):
        return (mmkern.scaled_dot_product_attention(q, k, v, is_causal=True),)

    make = lambda: dict(q=_randn(B, H, Lq, D), k=_randn(B, H, Lk, D), v=_randn(B, H, Lk, D),  # noqa: E731
                        mask=_randn(B, H, Lq, Lk))
    assert_backend_matches_oracle("cpu", verify.Case("cpu sdpa float mask", "B2 H3 Lq9 Lk14 D40", make, run,
                                                     cast=("q", "k", "v", "mask"), grad=("q", "k", "v", "mask")),
                                  DTYPES)
    assert_backend_matches_oracle("cpu", verify.Case("cpu sdpa top-left causal", "B2 H3 Lq9 Lk14 D40", make,
                                                     run_causal, cast=("q", "k", "v"), grad=("q", "k", "v")),
                                  DTYPES)


@pytest.mark.parametrize("mask_kind", ["bool", "bool broadcast", "float broadcast"])
def test_masks_on_cpu_match_oracle(mask_kind):
    """bool masks (a row left with no key is the contract's empty row) and masks broadcast over batch/heads
    (stride-0 views: the kernel reads them in place, the gradient comes back summed)."""
    B, H, Lq, Lk, D = 2, 2, 8, 11, 16
    shape = (B, H, Lq, Lk) if mask_kind == "bool" else (1, H, Lq, Lk) if "bool" in mask_kind else (B, 1, Lq, Lk)

    def make():
        inputs = dict(q=_randn(B, H, Lq, D), k=_randn(B, H, Lk, D), v=_randn(B, H, Lk, D))
        if "bool" in mask_kind:
            mask = torch.rand(shape) > 0.4
            mask[..., 0, :] = False                       # a row that sees nothing
            inputs["mask"] = mask
        else:
            inputs["mask"] = _randn(*shape)
        return inputs

    def run(q, k, v, mask):
        return (mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask),)

    grad = ("q", "k", "v") if "bool" in mask_kind else ("q", "k", "v", "mask")
    cast = ("q", "k", "v") if "bool" in mask_kind else ("q", "k", "v", "mask")
    assert_backend_matches_oracle("cpu", verify.Case(f"cpu sdpa {mask_kind}", str(shape), make, run, cast=cast,
                                                     grad=grad), DTYPES)


def test_varlen_with_empty_sequences_on_cpu_matches_oracle():
    lens_q, lens_k, H, H_kv, D = [3, 0, 9, 1, 4], [5, 4, 0, 7, 4], 4, 2, 40
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)

    def run(q, k, v, slopes):
        return mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q) + 1, max(lens_k), causal=True,
                                             window_size=(4, -1), alibi_slopes=slopes, softcap=3.0,
                                             return_lse=True)

    case = verify.Case("cpu varlen causal window alibi softcap", f"lens_q {lens_q} lens_k {lens_k}",
                       lambda: dict(q=_randn(sum(lens_q), H, D), k=_randn(sum(lens_k), H_kv, D),
                                    v=_randn(sum(lens_k), H_kv, D), slopes=torch.rand(5, H)),
                       run, cast=("q", "k", "v"), grad=("q", "k", "v"), outputs=("out", "lse"))
    assert_backend_matches_oracle("cpu", case, DTYPES)


@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_on_cpu_matches_oracle(causal):
    """seqused_k through flash_attn_with_kvcache: keys past each sequence's cache length are never read
    (poisoned with 1e4 here: a key read by mistake would dominate its row), including an empty cache."""
    B, L_cache, H, H_kv, D = 3, 40, 6, 2, 72
    lengths = torch.tensor([0, 17, 40 - 2], dtype=torch.int32)

    def make():
        k_cache, v_cache = _randn(B, L_cache, H_kv, D), _randn(B, L_cache, H_kv, D)
        for b, n in enumerate(lengths.tolist()):
            k_cache[b, n + 2:] = 1e4
            v_cache[b, n + 2:] = 1e4
        return dict(q=_randn(B, 2, H, D), k_cache=k_cache, v_cache=v_cache, k=_randn(B, 2, H_kv, D),
                    v=_randn(B, 2, H_kv, D))

    def run(q, k_cache, v_cache, k, v):
        return mmkern.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lengths,
                                              causal=causal, return_lse=True)

    case = verify.Case("cpu kvcache", f"B{B} cache {L_cache} H{H}/{H_kv} D{D}", make, run,
                       cast=("q", "k_cache", "v_cache", "k", "v"), outputs=("out", "lse"))
    assert_backend_matches_oracle("cpu", case, DTYPES)


# --------------------------------------------------------------------------- dropout

def _triton_mask(seed, shape, dropout_p, device):
    """The Triton kernels' own test path (under the interpreter here): the mask the Triton kernels draw."""
    from mmkern.triton.attention import dropout_mask
    B, H, Lq, Lk = shape
    return dropout_mask(torch.tensor([seed]), B, H, Lq, Lk, dropout_p, device)


@pytest.mark.parametrize("varlen", [False, True])
def test_dropout_mask_is_the_triton_kernels_bit_for_bit(varlen, monkeypatch):
    """The oracle with the mask Triton's dropout_mask returns: every output and gradient agree, so the CPU kernels
    keep exactly the elements the Triton kernels keep (forward, and both uses in the backward)."""
    monkeypatch.setattr("mmkern.reference.attention.dropout_keep_mask", _triton_mask)
    H, H_kv, D, p = 4, 2, 24, 0.3
    if varlen:
        lens_q, lens_k = [5, 0, 7], [6, 3, 9]
        cu_q, cu_k = _cu(lens_q), _cu(lens_k)
        make = lambda: dict(q=_randn(sum(lens_q), H, D), k=_randn(sum(lens_k), H_kv, D),  # noqa: E731
                            v=_randn(sum(lens_k), H_kv, D))
        run = lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, dropout_p=p,  # noqa: E731
                                                             causal=True, return_lse=True)
    else:
        make = lambda: dict(q=_randn(2, 9, H, D), k=_randn(2, 12, H_kv, D), v=_randn(2, 12, H_kv, D))  # noqa: E731
        run = lambda q, k, v: mmkern.flash_attn_func(q, k, v, dropout_p=p, return_lse=True)  # noqa: E731
    # seeded: the oracle, the yardstick and the kernel each draw the same dropout seed
    case = verify.Case("cpu dropout", "varlen" if varlen else "dense", make, seeded(run, 11), cast=("q", "k", "v"),
                       grad=("q", "k", "v"), outputs=("out", "lse"))
    assert_backend_matches_oracle("cpu", case, [torch.float32])


def test_dropout_against_the_independent_philox_model():
    """The same through tests/philox_model.py (the published Philox-4x32-10, in numpy), in every dtype, over
    two key tiles (the counters of the second start at its first key)."""
    case = verify.Case("cpu dropout GQA causal", "B2 Lq13 Lk300 H4/2 D40",
                       lambda: dict(q=_randn(2, 13, 4, 40), k=_randn(2, 300, 2, 40), v=_randn(2, 300, 2, 40)),
                       seeded(lambda q, k, v: mmkern.flash_attn_func(q, k, v, dropout_p=0.17, causal=True,
                                                                      return_lse=True), 12),
                       cast=("q", "k", "v"), grad=("q", "k", "v"), outputs=("out", "lse"))
    with oracle_draws_masks_of("cpu", "attention"):
        assert_backend_matches_oracle("cpu", case, DTYPES)


def test_gradient_arriving_on_lse():
    """A loss on both out and lse (a ring attention merge, a z-loss): dlse enters the backward's
    delta = rowsum(dO * O) - dlse. float32 kernels against the float64 oracle."""
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 9, 4, 24, dtype=torch.float64), torch.randn(2, 14, 2, 24, dtype=torch.float64), \
        torch.randn(2, 14, 2, 24, dtype=torch.float64)
    w, u = torch.randn(2, 9, 4, 24, dtype=torch.float64), torch.randn(2, 4, 9, dtype=torch.float64)

    def grads(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with mmkern.backend(backend), mmkern.dispatch_log() as log:
            out, lse = mmkern.flash_attn_func(*leaves, causal=True, return_lse=True)
            ((out.double() * w).sum() + (lse.double() * u).sum()).backward()
        assert log.ran(backend)
        return [t.grad.double() for t in leaves]

    for got, want in zip(grads("cpu", torch.float32), grads("reference", torch.float64)):
        assert (got - want).abs().max() < 2e-5 * max(want.abs().max().item(), 1.0)


# --------------------------------------------------------------------------- determinism, threads, splits

def _forward_backward(q, k, v, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with forced("cpu"):
        out, lse = mmkern.flash_attn_func(q, k, v, return_lse=True, **kwargs)
        out.backward(torch.ones_like(out))
    return out, lse, q.grad, k.grad, v.grad


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window_size=(70, 3), softcap=4.0, dropout_p=0.2)],
                         ids=["causal", "window-softcap-dropout"])
def test_bitwise_deterministic_run_to_run_and_across_thread_counts(kwargs):
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 300, 4, 40), torch.randn(2, 333, 2, 40), torch.randn(2, 333, 2, 40)
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(7)
        first = _forward_backward(q, k, v, **kwargs)
        torch.manual_seed(7)
        second = _forward_backward(q, k, v, **kwargs)
        torch.set_num_threads(1)
        torch.manual_seed(7)
        single = _forward_backward(q, k, v, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_decode_split_over_keys_matches_unsplit_and_oracle():
    """Few rows and a long cache: the forward splits the keys into ranges merged through their lse. Forced
    num_splits 1 (none), 3 and 7, and the kernel's own choice, all agree with the oracle; the split count does not
    depend on the thread count (the choice gives the same bits with 1 thread)."""
    from mmkern.native.attention_cpu import attention_forward
    from mmkern.reference import attention as reference
    from mmkern.reference.precision import compute_in
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 2000, 2, 64), torch.randn(2, 2000, 2, 64)
    seqused = torch.tensor([2000, 1203], dtype=torch.int32)
    p = dispatch.problem("attention_forward", q=q, k=k, v=v, seqused_k=seqused, causal=True, window_left=900)
    oracle = reference.forward(p)
    with compute_in(torch.float32):
        eager = reference.forward(p)             # the yardstick: the reference math in float32
    results = {n: attention_forward(p, num_splits=n) for n in (0, 1, 3, 7)}
    for n, got in results.items():
        for g, o, e in zip(got, oracle, eager):
            err, base = (g.double() - o.double()).abs().max(), (e.double() - o.double()).abs().max()
            assert err <= 2 * base + torch.finfo(torch.float32).eps * o.abs().max(), (n, err, base)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = attention_forward(p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], results[0][0]) and torch.equal(single[1], results[0][1])


def test_portable_gemm_and_avx2_exp_paths_match_oracle():
    """The paths this machine does not take by default, in a subprocess: MMKERN_CPU_GEMM=portable (what a torch
    without MKL runs: the at::vec GEMM) and MMKERN_CPU_ISA=avx2 (the softmax's 8-lane exponential, what a CPU
    without AVX-512 runs), every dtype, forward and backward, with the contract's NaN/inf rows."""
    script = textwrap.dedent("""
        import torch, mmkern, sys
        sys.path.insert(0, "tests")
        from conftest import DTYPES, assert_backend_matches_oracle
        from test_cpu_attention import DENSE, _dense_case
        for name in ("causal Lq<Lk GQA 8/2 D40", "softcap window alibi", "decode Lq1 long keys"):
            assert_backend_matches_oracle("cpu", _dense_case(name, **DENSE[name]), DTYPES)
        import pytest   # the contract's edge rows (NaN/inf inputs, empty rows, huge logits) on this path too
        edge = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_edge_numerics.py", "-k",
                            "cpu and not norm and not samplers"])
        print("ok" if edge == 0 else f"test_edge_numerics failed: {edge}")
    """)
    env = dict(os.environ, MMKERN_CPU_GEMM="portable", MMKERN_CPU_ISA="avx2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# --------------------------------------------------------------------------- memory, layouts, bad input

def test_memory_stays_linear_in_the_sequence_length():
    """Forward and backward at L = 16384 with a window (an S x S float32 score matrix would be 1 GiB): the peak
    resident memory grows by well under that, and by about the inputs' size from L = 4096 to 16384."""
    script = textwrap.dedent("""
        import resource, sys, torch, mmkern
        L = int(sys.argv[1])
        q, k, v = (torch.randn(1, L, 2, 64, requires_grad=True) for _ in range(3))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with mmkern.backend("cpu"):
            out = mmkern.flash_attn_func(q, k, v, window_size=(128, 0))
            out.sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    growth = {}
    for L in (4096, 16384):
        result = subprocess.run([sys.executable, "-c", script, str(L)], capture_output=True, text=True,
                                timeout=600, check=True)
        growth[L] = int(result.stdout.split()[-1])
    tensor_bytes = 16384 * 2 * 64 * 4
    assert growth[16384] < 24 * tensor_bytes, growth          # inputs, out, grads, scratch: ~10 tensors
    assert growth[16384] - growth[4096] < 16 * tensor_bytes, growth


def test_strided_and_non_contiguous_inputs():
    """q/k/v as views of torch's (B, H, L, D) layout, heads sliced out of a wider tensor, and a head dim with a
    stride (copied by the adapter): the same numbers as contiguous inputs."""
    torch.manual_seed(1)
    q = torch.randn(2, 6, 11, 40).transpose(1, 2)                  # (B, L, H, D) with strides of (B, H, L, D)
    kv = torch.randn(2, 13, 5, 40)[:, :, 1:3]                      # 2 heads of 5
    v = torch.randn(2, 13, 2, 80)[..., ::2]                         # head dim stride 2
    assert not q.is_contiguous() and not kv.is_contiguous() and v.stride(-1) == 2
    got = _forward_backward(q, kv, v, causal=True)
    want = _forward_backward(q.contiguous(), kv.contiguous(), v.contiguous(), causal=True)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def _cpu_op(name):
    from mmkern.native import cpp_op
    return cpp_op(name)


def test_direct_op_calls_with_out_of_range_lengths_raise():
    """A direct torch.ops.mmkern_C call skips the op layer's checks: the kernel's own checks stop what would
    read past a tensor (seqused_k beyond the cache, cu_seqlens beyond the packed rows)."""
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 5, 2, 8)
    fwd = _cpu_op("cpu_attention_forward")
    args = (-1, -1, 0.0, None, None, 0.0, 0, 0)
    with pytest.raises(ValueError, match="seqused_k"):
        fwd(q, k, k, None, None, torch.tensor([5, 6], dtype=torch.int32), 3, 5, 0.3, False, True, *args)
    packed = torch.randn(7, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fwd(packed, packed, packed, _cu([3, 5]), _cu([3, 4]), None, 5, 4, 0.3, False, True, *args)
    with pytest.raises(ValueError, match="num_splits"):
        fwd(q, k, k, None, None, None, 3, 5, 0.3, False, True, -1, -1, 0.0, None, None, 0.0, 0, -2)
    with pytest.raises(ValueError, match="contiguous head dim"):
        fwd(q, torch.randn(2, 5, 2, 16)[..., ::2], k, None, None, None, 3, 5, 0.3, False, True, *args)


def test_the_cpu_backend_is_what_auto_takes_on_a_cpu_and_names_float64():
    """Without Triton's interpreter (which this test session turns on), auto takes the C++ kernels on a CPU."""
    script = ("import torch, mmkern\nfrom mmkern import dispatch\nq = torch.randn(1, 4, 2, 16)\n"
              "print(dispatch.select('attention_forward', dispatch.problem('attention_forward', q=q, k=q, v=q)))")
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.split()[-1:] == ["cpu"], result.stdout + result.stderr
    q = torch.randn(1, 4, 2, 16)
    reasons = dispatch.not_supported_reasons("attention_forward", "cpu", dispatch.problem(
        "attention_forward", q=q.double(), k=q.double(), v=q.double()))
    assert any("float64" in r for r in reasons)


# --------------------------------------------------------------------------- what a CPU user's calls run on

_CPU_USER = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, mmkern
q, k, v = torch.randn(2, 33, 4, 40), torch.randn(2, 20, 2, 40), torch.randn(2, 20, 2, 40)
calls = {
    "dense": lambda: mmkern.flash_attn_func(q, k, v),
    "causal window alibi softcap": lambda: mmkern.flash_attn_func(q, k, v, causal=True, window_size=(5, 0),
                                                                   alibi_slopes=torch.rand(4), softcap=5.0),
    "dropout": lambda: mmkern.flash_attn_func(q, k, v, dropout_p=0.1),
    "bf16": lambda: mmkern.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True),
    "fp16": lambda: mmkern.flash_attn_func(q.half(), k.half(), v.half()),
    "sdpa drop-in": lambda: mmkern.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=torch.rand(33, 20) > 0.5, enable_gqa=True),
    "kvcache": lambda: mmkern.flash_attn_with_kvcache(q[:, :1], k.clone(), v.clone(), k[:, :1], v[:, :1],
                                                      cache_seqlens=torch.tensor([3, 19], dtype=torch.int32)),
    "varlen": lambda: mmkern.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 10, 33], dtype=torch.int32),
                                                    torch.tensor([0, 0, 20], dtype=torch.int32), 23, 20),
}
for name, call in calls.items():
    with mmkern.dispatch_log() as log:
        call()
    print(f"{name}: {sorted(log.backends('attention_forward'))}")

from mmkern.integrations import transformers_parity as tp
gpt2 = tp._prepare(tp.tiny_gpt2(), torch.float32, "cpu", True).eval()     # attn_implementation="mmkern"
ids = torch.randint(3, 100, (2, 7))
with torch.no_grad(), mmkern.dispatch_log() as log:
    gpt2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
print(f"transformers generate: {sorted(log.backends('attention_forward'))}")
try:
    from mmkern.integrations import diffusers as mmd, diffusers_parity as dp
except ImportError:
    print("diffusers: ['cpu']")       # diffusers is an optional extra
else:
    make_model, make_inputs = dp.model_cases()["UNet2DConditionModel"]
    unet = mmd.apply_mmkern(make_model().eval())
    with torch.no_grad(), mmkern.dispatch_log() as log:
        dp.forward(unet, make_inputs(), torch.float32, "cpu")
    print(f"diffusers: {sorted(log.backends('attention_forward'))}")
from mmkern.models import TinyText2Image
model = TinyText2Image(["a red square", "a blue circle"], dim=32, depth=1, heads=2, text_layers=1)
with mmkern.dispatch_log() as log:
    model.loss(torch.rand(2, 3, 16, 16) * 2 - 1, ["a red square", "a blue circle"]).backward()
print(f"tiny text-to-image: {sorted(log.backends('attention_forward') | log.backends('attention_backward'))}")
"""


def test_a_cpu_user_s_attention_runs_on_the_cpp_kernels():
    """Without Triton's interpreter and with the extension built, auto dispatch takes the C++ kernels for every
    attention a CPU user calls: the flash-attn functions with every feature (dropout and softcap included), the SDPA
    drop-in, the KV cache, varlen, transformers generation, a diffusers UNet, the tiny text-to-image model."""
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _CPU_USER], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 11 and all(line.endswith(": ['cpu']") for line in lines), lines
