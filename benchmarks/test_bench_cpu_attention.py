"""Attention on a CPU: mmkern's C++ CPU kernels (backend `cpu`, csrc/attention/attention_cpu_*.cpp) beside torch's
own CPU attention, in one run, on the same random inputs per case. Timed on the host clock even on a GPU machine
(device="cpu"). Goals, never timed assertions: the README of each results folder says which rows met them.

1. test_cpu_attention: the original issue's shape, B1 H12 D64 causal forward, L 512 and 2048, fp32 and bf16
       mmkern_auto, mmkern_cpu, mmkern_torch, sdpa, and mmkern_reference (the float64 oracle auto used to pick
       here: 330 ms at L512 on the 2-core CI machine; L512 only, it is quadratic).
2. test_cpu_attention_kernel: forward and forward+backward, fp32 and bf16, L 512..8192, D 64 and 128, causal
   and not; impls (KERNEL_IMPLS)
       sdpa           F.scaled_dot_product_attention on contiguous (B, H, L, D) tensors
       mmkern_cpu     mmkern.flash_attn_func on (B, L, H, D), forced onto the C++ CPU kernels
       mmkern_auto    the same under auto dispatch (what a user gets; extra_info["ran_on"] says what ran)
       mmkern_torch   forced onto the torch backend (torch's CPU flash attention behind mmkern's op)
   B x H per L (KERNEL_SHAPES) keeps B*H >= 2 (torch's CPU flash backward parallelises over batch x heads only:
   B*H = 1 would run it on one of the two cores) and one fwd+bwd call at L8192 to about a second. Goal:
   mmkern >= 1.0x sdpa (stretch 1.3x).
3. test_cpu_attention_feature: fp32, L2048, D64, forward and fwd+bwd: sliding window (256, 0) causal, softcap 30
   causal, ALiBi causal, GQA 16/4 causal, varlen (4 sequences of 2048, 1024, 512, 512 tokens, bidirectional):
       baseline       what a user writes without mmkern (extra_info["baseline"]): SDPA with a mask built for the
                      feature (window: (L, L) bool; ALiBi: (1, H, L, L) float bias with -inf above the diagonal;
                      varlen: a padded (4, 2048) batch with a (B, 1, L, L) key-padding bool mask, as transformers'
                      SDPA path builds it), SDPA with enable_gqa=True (repeat_interleave where torch lacks it), and
                      for softcap the eager math (scores, tanh, mask, softmax, matmul), since SDPA cannot softcap.
                      The mask is built once outside the timed call (a model builds it once for all layers);
                      extra_info["mask_mb"] is its size, held for as long as the call runs.
       mmkern_cpu, mmkern_auto
   Goal: mmkern >= 3x the baseline.
4. test_cpu_attention_decode: one new token (Lq = 1) against a full KV cache of 1k..32k (B1) and 4k (B8),
   32 query heads on 8 KV heads, D128, fp32 and bf16: mmkern.flash_attn_with_kvcache (no new k/v,
   cache_seqlens = the full cache) under auto and forced cpu, against SDPA over a (B, Hkv, L, D) cache with
   enable_gqa. Goal: >= 1.0x.
Every row records in extra_info["peak_mb"] the growth of the process's peak resident memory during one call
(Linux: /proc/self/clear_refs resets VmHWM; peak_call), on the warm-up's first timed call (the only call under
--benchmark-disable): linear in L for mmkern, L x L for the explicit-mask and eager rows.

Sizes: under --benchmark-disable (CI's smoke test: every function runs once) and MMKERN_BENCH_SIZES=quick,
tiny shapes that take every code path in a few seconds; otherwise the full sizes above (about 15 minutes with
--benchmark-min-rounds=3 --benchmark-max-time=0.3 on two cores). test_cpu_feature_baselines_agree checks,
outside any timing, that each baseline computes what mmkern computes (it runs under --benchmark-disable).
"""
from __future__ import annotations

import ctypes
import gc
import math

import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import QUICK
from mmkern.bench.attention import HAS_ENABLE_GQA, sdpa_gqa
from mmkern.bench.counts import attention_bytes, attention_decode_bytes, attention_flops

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = [torch.float32, torch.bfloat16]


# --------------------------------------------------------------------------- peak memory of one call

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets VmHWM (the peak resident set) to the current RSS ("5" -> /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def peak_call(fn, *args, collect: bool = True):
    """(fn(*args), MiB by which the process's peak resident memory grew during the call, or None where Linux's
    /proc interface is missing). Garbage from earlier calls is collected first (collect: a full gc.collect(),
    ~0.15 s with transformers loaded, left out of smoke runs) and freed heap pages go back to the OS
    (malloc_trim), so a call cannot hide its peak in memory an earlier call freed but glibc kept."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    before = _status_kib("VmRSS")
    if before is None or not _reset_peak():
        return fn(*args), None
    result = fn(*args)
    peak = _status_kib("VmHWM")
    return result, round((peak - before) / 1024, 1)


class _RanOn(mmkern.dispatch_log):
    """A dispatch_log that keeps (op, backend) only: the problem records dispatch_log keeps would hold every
    call's tensors (a model's per-layer q, k, v) alive to the end of the block and inflate the peak measured."""

    def record(self, op: str, name: str, problem) -> None:
        self.calls.append((op, name))


class PeakOnce:
    """fn, measured once: call number `at` (0 under --benchmark-disable, where it is the only call; else 1, the
    warm-up's first timed call, after any first-call set-up) runs through peak_call, inside a dispatch_log.
    After the run: `peak_mb`, and `ran_on` (the mmkern ops of that call and the backends they ran on)."""

    def __init__(self, fn, at: int):
        self.fn, self.at, self.calls = fn, at, 0
        self.peak_mb, self.ran_on = None, ""

    def __call__(self, *args):
        self.calls += 1
        if self.calls - 1 != self.at:
            return self.fn(*args)
        with _RanOn() as log:
            result, self.peak_mb = peak_call(self.fn, *args, collect=self.at > 0)
        self.ran_on = ", ".join(sorted({f"{op}@{name}" for op, name in log.calls}))
        return result

    def info(self) -> dict:
        return dict(peak_mb=self.peak_mb, ran_on=self.ran_on)


def smoke(config) -> bool:
    """The run only checks that every row runs (--benchmark-disable) or is the quick selection: tiny sizes."""
    return bool(config.getoption("benchmark_disable", False)) or QUICK


def timed(bench, benchmark, fn, *args, **info):
    """bench(fn, *args, **info) with PeakOnce around fn; its peak memory and ran-on in extra_info."""
    measured = PeakOnce(fn, at=0 if benchmark.disabled else 1)
    result = bench(measured, *args, device="cpu", **info)
    benchmark.extra_info.update(measured.info())
    return result


# --------------------------------------------------------------------------- sizes

KERNEL_SHAPES = {512: (2, 8), 1024: (1, 8), 2048: (1, 4), 4096: (1, 2), 8192: (1, 2)}   # L -> (B, H)
SMOKE_KERNEL_SHAPES = {128: (1, 2)}
KERNEL_IMPLS = ["sdpa", "mmkern_cpu", "mmkern_auto", "mmkern_torch"]
PASSES = ["fwd", "fwd+bwd"]

FEATURES = ["window", "softcap", "alibi", "gqa", "varlen"]
FEATURE_SIZES = dict(seqlen=2048, heads=8, gqa_heads=(16, 4), head_dim=64, window=256, softcap=30.0,
                     varlen=(2048, 1024, 512, 512))
SMOKE_FEATURE_SIZES = dict(seqlen=256, heads=2, gqa_heads=(4, 1), head_dim=64, window=32, softcap=30.0,
                           varlen=(256, 128, 64, 64))
FEATURE_IMPLS = ["baseline", "mmkern_cpu", "mmkern_auto"]

DECODE_CASES = [(1, 1024), (1, 4096), (1, 16384), (1, 32768), (8, 4096)]    # (batch, cache length)
SMOKE_DECODE_CASES = [(1, 256), (2, 128)]
DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM = 32, 8, 128
DECODE_IMPLS = ["sdpa", "mmkern_cpu", "mmkern_auto"]


def pytest_generate_tests(metafunc):
    """The sizes depend on the run: tiny under --benchmark-disable / quick (smoke), the full ones otherwise."""
    small = smoke(metafunc.config)
    name = metafunc.function.__name__
    if name == "test_cpu_attention_kernel":
        shapes = SMOKE_KERNEL_SHAPES if small else KERNEL_SHAPES
        metafunc.parametrize("seqlen", list(shapes), ids=[f"L{l}" for l in shapes])
    elif name == "test_cpu_attention_decode":
        cases = SMOKE_DECODE_CASES if small else DECODE_CASES
        metafunc.parametrize("batch,cache_len", cases, ids=[f"B{b}-cache{c}" for b, c in cases])


def _forced(backend: str | None, fn):
    """fn run under mmkern.backend(backend) (auto dispatch when None). Wrap the whole timed function, backward
    included: autograd dispatches mmkern's attention_backward when torch.autograd.grad runs, and outside the
    block that is auto dispatch's choice (torch's backward for bf16 here), not the forced backend."""
    if backend is None:
        return fn

    def run(*args):
        with mmkern.backend(backend):
            return fn(*args)
    return run


_BACKEND = {"mmkern_cpu": "cpu", "mmkern_auto": None, "mmkern_torch": "torch", "mmkern_reference": "reference"}


def _skip_unless_usable(impl: str) -> None:
    backend = _BACKEND.get(impl)
    if backend is not None and backend not in mmkern.available_backends():
        known = mmkern.dispatch.backends().get(backend)
        reasons = known.environment_reasons() if known else [f"no backend named {backend}"]
        pytest.skip(f"mmkern's {backend} backend is not usable here: " + ("; ".join(reasons) or "no kernels"))


def _training(fn, dout):
    """Forward + backward of fn(q, k, v) against the fixed output gradient dout: returns (dq, dk, dv)."""
    def forward_backward(q, k, v):
        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    return forward_backward


def _inference(fn):
    def forward(*args):
        with torch.no_grad():
            return fn(*args)
    return forward


# --------------------------------------------------------------------------- 1. the shape

SEQLENS = [512] if QUICK else [512, 2048]      # quick: the selection gpu_check.sh runs
IMPLS = ["mmkern_auto", "mmkern_cpu", "mmkern_torch", "mmkern_reference", "sdpa"]
B, H, D = 1, 12, 64


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seqlen", SEQLENS, ids=[f"L{l}" for l in SEQLENS])
@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_attention(bench, benchmark, impl, seqlen, dtype):
    if impl == "mmkern_reference" and seqlen > 512:
        pytest.skip("the float64 oracle is quadratic: L512 only")
    _skip_unless_usable(impl)
    benchmark.group = f"cpu attention fwd {str(dtype).replace('torch.', '')} causal L{seqlen}"
    shape = (B, seqlen, H, D) if impl.startswith("mmkern") else (B, H, seqlen, D)
    q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
    if impl == "sdpa":
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        fn = _forced(_BACKEND[impl], lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=True))
    timed(bench, benchmark, _inference(fn), q, k, v, op="attention", impl=impl,
          series=f"cpu attention {dtype}", x=seqlen, x_label="sequence length", shape=f"B{B} H{H} L{seqlen} D{D}",
          dtype=str(dtype))


# --------------------------------------------------------------------------- 2. kernel rows

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_cpu_attention_kernel(bench, benchmark, impl, pass_, dtype, head_dim, seqlen, causal):
    _skip_unless_usable(impl)
    batch, heads = {**KERNEL_SHAPES, **SMOKE_KERNEL_SHAPES}[seqlen]
    series = f"cpu attention {pass_} {_DT[dtype]} d{head_dim} {'causal' if causal else 'full'}"
    benchmark.group = f"{series} L{seqlen}"
    torch.manual_seed(seqlen * 1000 + head_dim + causal)      # the same values for every impl of a case
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(4))
    if impl == "sdpa":              # contiguous (B, H, L, D), as a user of torch's layout holds them
        q, k, v, dout = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    else:
        fn = lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
    if pass_ == "fwd+bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fn = _training(fn, dout)
    else:
        fn = _inference(fn)
    fn = _forced(_BACKEND.get(impl), fn)        # around the backward too: autograd dispatches it on its own
    timed(bench, benchmark, fn, q, k, v, op="attention", impl=impl, series=series, x=seqlen,
          x_label="sequence length", shape=f"B{batch} H{heads} L{seqlen} D{head_dim}", dtype=_DT[dtype],
          causal=causal, pass_=pass_, flops=attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, pass_),
          bytes=attention_bytes(batch, heads, seqlen, seqlen, head_dim, q.element_size(), pass_=pass_))


# --------------------------------------------------------------------------- 3. feature rows

def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes for a power-of-two head count: 2^(-8 (h + 1) / H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


class FeatureCase:
    """One feature's inputs in both layouts and both formulations (mmkern's arguments; the baseline's mask).

    mmkern(q, k, v) and baseline(q, k, v) take the same values: (B, L, H, D) for mmkern ((total, H, D) packed for
    varlen), contiguous (B, H, L, D) for the baseline (the padded batch for varlen)."""

    def __init__(self, feature: str, sizes: dict, seed: int = 0):
        self.feature, self.sizes = feature, sizes
        L, D = sizes["seqlen"], sizes["head_dim"]
        hq, hk = sizes["gqa_heads"] if feature == "gqa" else (sizes["heads"], sizes["heads"])
        self.heads, self.kv_heads, self.seqlen, self.head_dim = hq, hk, L, D
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
        self.mask = None
        visible = torch.ones(L, L, dtype=torch.bool).tril()            # causal, j <= i
        if feature == "varlen":
            lens = sizes["varlen"]
            self.lengths, self.batch = lens, len(lens)
            total = sum(lens)
            packed = [rand(total, hq, D) for _ in range(4)]
            self.mm_inputs = packed[:3]
            self.mm_dout = packed[3]
            padded = [torch.zeros(len(lens), L, hq, D) for _ in range(4)]
            keep = torch.zeros(len(lens), L, dtype=torch.bool)
            start = 0
            for row, n in enumerate(lens):
                for dst, src in zip(padded, packed):
                    dst[row, :n] = src[start:start + n]
                keep[row, :n] = True
                start += n
            self.keep = keep
            self.base_inputs = [t.transpose(1, 2).contiguous() for t in padded[:3]]
            self.base_dout = padded[3].transpose(1, 2).contiguous()
            self.mask = keep[:, None, None, :].expand(len(lens), 1, L, L).contiguous()   # (B, 1, L, L) bool
            self.cu_seqlens = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
            self.max_seqlen = max(lens)
            self.flops_bhll = sum(n * n for n in lens) * hq
            self.baseline_how = "SDPA on the padded (B, L) batch with a (B, 1, L, L) key-padding bool mask"
            return
        self.batch = 1
        self.mm_inputs = [rand(1, L, h, D) for h in (hq, hk, hk)]
        self.mm_dout = rand(1, L, hq, D)
        self.base_inputs = [t.transpose(1, 2).contiguous() for t in self.mm_inputs]
        self.base_dout = self.mm_dout.transpose(1, 2).contiguous()
        self.flops_bhll = hq * L * L / 2
        if feature == "window":
            i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
            self.mask = visible & (i - j <= sizes["window"])                           # (L, L) bool
            self.flops_bhll = hq * L * (sizes["window"] + 1)
            self.baseline_how = f"SDPA with an (L, L) bool sliding-window mask ({sizes['window']} left, causal)"
        elif feature == "alibi":
            self.slopes = alibi_slopes(hq)
            i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
            bias = -self.slopes[:, None, None] * (i - j).abs().float()
            self.mask = bias.masked_fill(~visible, float("-inf"))[None].contiguous()   # (1, H, L, L) float
            self.baseline_how = "SDPA with a (1, H, L, L) float ALiBi bias, -inf above the diagonal"
        elif feature == "softcap":
            self.mask = visible                                                         # (L, L) bool
            self.baseline_how = "eager: q k^T * scale, cap * tanh(s / cap), causal mask, softmax, @ v"
        else:   # gqa
            self.baseline_how = ("SDPA is_causal, enable_gqa=True" if HAS_ENABLE_GQA else
                                 "SDPA is_causal on k/v repeat_interleave'd to the query heads")

    @property
    def mask_mb(self) -> float:
        return 0.0 if self.mask is None else round(self.mask.numel() * self.mask.element_size() / 2**20, 1)

    def mmkern(self, q, k, v):
        s = self.sizes
        if self.feature == "varlen":
            return mmkern.flash_attn_varlen_func(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen,
                                                 self.max_seqlen, causal=False)
        kwargs = dict(causal=True)
        if self.feature == "window":
            kwargs["window_size"] = (s["window"], 0)
        elif self.feature == "softcap":
            kwargs["softcap"] = s["softcap"]
        elif self.feature == "alibi":
            kwargs["alibi_slopes"] = self.slopes
        return mmkern.flash_attn_func(q, k, v, **kwargs)

    def baseline(self, q, k, v):
        if self.feature == "gqa":
            return sdpa_gqa(q, k, v, is_causal=True)
        if self.feature == "softcap":
            cap = self.sizes["softcap"]
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            scores = cap * torch.tanh(scores / cap)
            scores = scores.masked_fill(~self.mask, float("-inf"))
            return torch.softmax(scores, dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


_CASES: dict = {}


def _feature_case(feature: str, small: bool) -> FeatureCase:
    key = (feature, small)
    if key not in _CASES:
        _CASES.clear()              # one feature's tensors at a time (the masks are L x L)
        _CASES[key] = FeatureCase(feature, SMOKE_FEATURE_SIZES if small else FEATURE_SIZES)
    return _CASES[key]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", FEATURE_IMPLS)
@pytest.mark.parametrize("feature", FEATURES)
def test_cpu_attention_feature(bench, benchmark, request, feature, impl, pass_):
    _skip_unless_usable(impl)
    case = _feature_case(feature, smoke(request.config))
    L, D = case.seqlen, case.head_dim
    series = f"cpu attention feature {pass_} fp32"
    benchmark.group = f"{series} {feature} L{L}"
    if impl == "baseline":
        fn, inputs, dout = case.baseline, case.base_inputs, case.base_dout
    else:
        fn, inputs, dout = case.mmkern, case.mm_inputs, case.mm_dout
    q, k, v = (t.detach().clone() for t in inputs)
    if pass_ == "fwd+bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fn = _training(fn, dout)
    else:
        fn = _inference(fn)
    fn = _forced(_BACKEND.get(impl), fn)        # around the backward too: autograd dispatches it on its own
    kind = "bwd" if pass_ == "fwd+bwd" else "fwd"
    flops = 4.0 * case.flops_bhll * D * (3.5 if kind == "bwd" else 1.0)      # the useful work: visible pairs
    shape = (f"B{case.batch} Hq{case.heads} Hkv{case.kv_heads} L{L} D{D}" if feature != "varlen" else
             f"lens {list(case.lengths)} H{case.heads} D{D}")
    timed(bench, benchmark, fn, q, k, v, op="attention", impl=impl, series=series, x=feature,
          x_label="feature", shape=shape, dtype="fp32", pass_=pass_, feature=feature, flops=flops,
          baseline=case.baseline_how if impl == "baseline" else "", mask_mb=case.mask_mb if impl == "baseline" else 0)


@pytest.mark.parametrize("feature", FEATURES)
def test_cpu_feature_baselines_agree(feature):
    """The baseline formulations compute what mmkern computes (at the smoke size, outside any timing)."""
    case = FeatureCase(feature, SMOKE_FEATURE_SIZES, seed=1)
    with torch.no_grad():
        got = case.mmkern(*case.mm_inputs)
        want = case.baseline(*case.base_inputs).transpose(1, 2)        # (B, L, H, D)
    if feature == "varlen":
        want = want[case.keep]                                         # the real tokens, packed in order
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------- 4. decode rows

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_cpu_attention_decode(bench, benchmark, impl, dtype, batch, cache_len):
    _skip_unless_usable(impl)
    h, hk, d = DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM
    series = f"cpu attention decode {_DT[dtype]} d{d} Hq{h}/Hkv{hk}"
    benchmark.group = f"{series} B{batch} cache{cache_len}"
    torch.manual_seed(cache_len + batch)
    q = torch.randn(batch, 1, h, d, dtype=dtype)
    k_cache, v_cache = (torch.randn(batch, cache_len, hk, d, dtype=dtype) for _ in range(2))
    if impl == "sdpa":              # the cache held as (B, Hkv, L, D), the layout transformers' caches use
        q, k_cache, v_cache = (t.transpose(1, 2).contiguous() for t in (q, k_cache, v_cache))
        fn = lambda q, k, v: sdpa_gqa(q, k, v)  # noqa: E731
    else:
        seqlens = torch.full((batch,), cache_len, dtype=torch.int32)
        fn = _forced(_BACKEND[impl], lambda q, k, v: mmkern.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens,
                                                                                    causal=True))
    timed(bench, benchmark, _inference(fn), q, k_cache, v_cache, op="attention_decode", impl=impl,
          metric="GB/s", series=series, x=cache_len, x_label="KV cache length",
          shape=f"B{batch} Hq{h} Hkv{hk} Lq1 Lk{cache_len} D{d}", dtype=_DT[dtype],
          flops=attention_flops(batch, h, 1, cache_len, d),
          bytes=attention_decode_bytes(batch, h, hk, 1, cache_len, d, q.element_size()))
