"""Numerics at the edges, through every usable backend (mmkern.available_backends()):
scores that overflow float16 unless scaled in float32, softcap with huge (and tiny) logits, rows
that see no key (output 0, lse -inf, zero gradients, never NaN), -inf in additive masks, NaN/inf
inputs that propagate exactly as the oracle's and never into other rows or batches, norm rows
with a mean far from zero, and the first and last timestep of every sampler.
"""
import math

import pytest
import torch

import mmkern
from conftest import DTYPES, assert_backend_matches_oracle, forced
from mmkern import dispatch, verify
from mmkern.diffusion import NoiseSchedule
from mmkern.reference.precision import compute_in

BACKENDS = mmkern.available_backends()
# The GPU when there is one (the Triton and CUDA backends take CUDA tensors only), else the CPU; backends are
# forced through conftest.forced: one that does not take a case skips it with its reasons.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def randn(*shape, dtype=torch.float64, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def backends_with(op: str) -> list[str]:
    """The usable backends that implement `op` (a C++ backend may implement only some op families)."""
    return [b for b in mmkern.available_backends() if op in dispatch.backends()[b].kernels]


ATTN = backends_with("attention_backward")
NORM = backends_with("norm_residual_backward")
STEPS = [b for b in backends_with("ddpm_step") if all(op in dispatch.backends()[b].kernels for op in
         ("ddim_step", "euler_step", "diffusion_loss", "add_noise", "get_velocity", "euler_scale_model_input"))]
HALF = [torch.float16, torch.bfloat16]


def _oracle(fn, *tensors):
    """fn on the same (already rounded) values in float64, on the reference backend."""
    with mmkern.backend("reference"):
        return fn(*(t.double() if t is not None and t.is_floating_point() else t for t in tensors))


def _ulps(got, want, dtype):
    """max |got - want| in units of dtype's eps times the largest |want| (infinities must agree exactly)."""
    got, want = got.double(), want.double()
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN in different places than the oracle"
    diff = torch.where(same, torch.zeros_like(got), (got - want).abs())
    scale = want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 1.0
    return diff.max().item() / (torch.finfo(dtype).eps * max(scale, 1e-3)) if diff.numel() else 0.0


# --------------------------------------------------------------------------- attention scores

@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", HALF)
def test_scores_beyond_the_half_range_are_accumulated_in_fp32(backend, dtype):
    """q.k ~ 2e5 > float16's 65504: a kernel that stored raw scores in half precision gives inf/NaN."""
    q = (randn(2, 9, 2, 64) * 60).to(dtype)
    k = (randn(2, 11, 2, 64) * 60).to(dtype)
    v = randn(2, 11, 2, 64, dtype=dtype)
    raw = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    assert raw.abs().max() > 65504
    scale = 3.0 / raw.abs().max().item()                 # logits of a few units after scaling
    fn = lambda q, k, v: mmkern.flash_attn_func(q, k, v, softmax_scale=scale, return_lse=True)  # noqa: E731
    with forced(backend):
        out, lse = fn(q, k, v)
    want_out, want_lse = _oracle(fn, q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _ulps(out, want_out, dtype) <= 4
    # fp32 lse: scores kept in fp32 land within a few hundred ulps (torch's CPU flash reached 92 on one CI draw);
    # scores rounded to bf16/fp16 anywhere would be off by ~2^-8 / 2^-11 relative, 4096-32768 ulps
    assert _ulps(lse, want_lse, torch.float32) <= 256


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_with_huge_logits_saturates(backend, dtype):
    """Scores ~1e6 under softcap 20: every logit is +-20, the softmax and the gradients stay finite."""
    q, k, v = (randn(1, 7, 2, 32, dtype=dtype, requires_grad=True, scale=s) for s in (300.0, 300.0, 1.0))
    fn = lambda q, k, v: mmkern.flash_attn_func(q, k, v, softmax_scale=10.0, softcap=20.0,  # noqa: E731
                                                causal=True, return_lse=True)
    with forced(backend):
        out, lse = fn(q, k, v)
        out.sum().backward()
    assert all(torch.isfinite(t).all() for t in (out, lse, q.grad, k.grad, v.grad))
    want_out, want_lse = _oracle(fn, q.detach(), k.detach(), v.detach())
    assert _ulps(out, want_out, dtype) <= 4
    assert (lse.double() - want_lse).abs().max() <= 1e-5 * 20 + 2 * math.log(8) * 1e-6
    assert lse.max() <= 20 + math.log(7) + 1e-4          # logits capped at softcap


@pytest.mark.parametrize("backend", ATTN)
def test_softcap_small_scores_keep_float32_precision(backend):
    """|score / softcap| ~ 1e-3: softcap * tanh(score / softcap) ~ score, to float32 precision."""
    q, k, v = (randn(1, 16, 1, 16, dtype=torch.float32) for _ in range(3))
    fn = lambda q, k, v: mmkern.flash_attn_func(q, k, v, softcap=1000.0, return_lse=True)  # noqa: E731
    with forced(backend):
        out, lse = fn(q, k, v)
    want_out, want_lse = _oracle(fn, q, k, v)
    assert _ulps(lse, want_lse, torch.float32) <= 8 and _ulps(out, want_out, torch.float32) <= 8


# --------------------------------------------------------------------------- rows that see no key

def _assert_empty_rows(out, lse, dq, rows_out, rows_lse, rows_dq):
    """rows_* index the rows (of out / lse / dq) that see no key."""
    assert not any(torch.isnan(t).any() for t in (out, lse, dq))
    assert (out[rows_out] == 0).all()
    assert (lse[rows_lse] == float("-inf")).all()
    assert (dq[rows_dq] == 0).all()


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_dense_varlen_and_sdpa(backend, dtype):
    with forced(backend):
        # bottom-right causal with Lq > Lk: the first Lq - Lk queries see nothing
        q, k, v = randn(2, 9, 2, 16, dtype=dtype, requires_grad=True), randn(2, 4, 2, 16, dtype=dtype, requires_grad=True), \
            randn(2, 4, 2, 16, dtype=dtype, requires_grad=True)
        out, lse = mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True)
        (out.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
        _assert_empty_rows(out, lse, q.grad, (slice(None), slice(0, 5)), (slice(None), slice(None), slice(0, 5)),
                           (slice(None), slice(0, 5)))
        assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
        # a window that excludes every key (left 0, right -1 with Lk < Lq, top rows)
        out, lse = mmkern.flash_attn_func(q.detach(), k.detach(), v.detach(), window_size=(0, 0), return_lse=True)
        assert (out[:, :5] == 0).all() and (lse[:, :, :5] == float("-inf")).all() and not torch.isnan(out).any()
        # varlen: a sequence with queries and no keys
        qv = randn(5, 2, 8, dtype=dtype, requires_grad=True)
        kv = randn(3, 2, 8, dtype=dtype, requires_grad=True)
        cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE), \
            torch.tensor([0, 0, 3], dtype=torch.int32, device=DEVICE)
        out, lse = mmkern.flash_attn_varlen_func(qv, kv, kv, cu_q, cu_k, 3, 3, return_lse=True)
        out.float().sum().backward()
        _assert_empty_rows(out, lse, qv.grad, slice(0, 2), (slice(None), slice(0, 2)), slice(0, 2))
        # SDPA: a bool mask row of all False, a float mask row of all -inf
        qs, ks, vs = (randn(1, 2, 4, 8, dtype=dtype, requires_grad=True) for _ in range(3))
        for mask in (torch.tensor([[True] * 4, [False] * 4, [True, False] * 2, [False] * 3 + [True]], device=DEVICE),
                     torch.zeros(4, 4, dtype=dtype, device=DEVICE).index_fill_(0, torch.tensor([1], device=DEVICE),
                                                                                float("-inf"))):
            qs.grad = None
            out = mmkern.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            out.float().sum().backward()
            assert not torch.isnan(out).any() and (out[:, :, 1] == 0).all()
            assert (qs.grad[:, :, 1] == 0).all() and torch.isfinite(ks.grad).all() and torch.isfinite(vs.grad).all()
        # KV cache: an empty cache and nothing appended
        out, lse = mmkern.flash_attn_with_kvcache(q.detach()[:, :1], k.detach(), v.detach(),
                                                  cache_seqlens=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE),
                                                  return_lse=True)
        assert (out[0] == 0).all() and (lse[0] == float("-inf")).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_in_float_mask_matches_oracle(backend, dtype):
    """Additive -inf scattered over a float mask (with its gradient), one row entirely -inf."""
    mask = randn(2, 1, 6, 9).masked_fill(torch.rand(2, 1, 6, 9, device=DEVICE) < 0.4, float("-inf"))
    mask[0, 0, 3] = float("-inf")
    case = verify.Case("sdpa -inf mask", "B2 H3 Lq6 Lk9 D8", lambda: dict(q=randn(2, 3, 6, 8), k=randn(2, 3, 9, 8),
                                                                            v=randn(2, 3, 9, 8), mask=mask.clone()),
                       lambda q, k, v, mask: (mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask),),
                       cast=("q", "k", "v", "mask"), grad=("q", "k", "v", "mask"))
    assert_backend_matches_oracle(backend, case, dtypes=[dtype])


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_most_negative_float_mask_rows_as_transformers_4_builds_them(backend, dtype):
    """transformers 4.x hides a key by adding torch.finfo(dtype).min to its score, so a query that sees no real
    key has only such finite scores, and torch's SDPA gives it the plain average of v. (The Triton online
    softmax took m log2(e) of such a row, which overflows to -inf in fp32: the row came out NaN.)"""
    q, k, v = randn(2, 3, 6, 8, dtype=dtype), randn(2, 3, 9, 8, dtype=dtype), randn(2, 3, 9, 8, dtype=dtype)
    hidden = torch.rand(2, 1, 6, 9, device=DEVICE) < 0.4
    hidden[0, 0, 3] = True                                       # a query that sees no real key
    hidden[:, :, :, 0] = False                                   # the others see at least one
    hidden[0, 0, 3, 0] = True
    mask = torch.zeros(2, 1, 6, 9, dtype=dtype, device=DEVICE).masked_fill(hidden, torch.finfo(dtype).min)
    with forced(backend):
        out = mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    eager = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    if dtype == torch.float32:       # -3.4e38 + s rounds to -3.4e38: the scores of that row are all equal
        torch.testing.assert_close(want[0, :, 3], v[0].double().mean(-2))
    error, yardstick = (out.double() - want).abs().max().item(), (eager.double() - want).abs().max().item()
    assert error <= 2 * yardstick + torch.finfo(dtype).eps * want.abs().max().item(), (error, yardstick)


# --------------------------------------------------------------------------- NaN / inf inputs

def _nan_pattern_matches(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), \
        f"NaN at {torch.isnan(got).nonzero().tolist()[:8]}, oracle at {torch.isnan(want).nonzero().tolist()[:8]}"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    return finite


def _poisoned(where, dtype, D):
    """q (2, 5, 4, D), k/v (2, 7, 2, D) in dtype with one NaN/inf in batch 0: q head 3 or kv head 1 (query
    heads 2, 3)."""
    q, k, v = randn(2, 5, 4, D), randn(2, 7, 2, D), randn(2, 7, 2, D)
    name, value = where.split()
    if name == "q":
        q[0, 2, 3, 3] = float(value)
    else:
        {"k": k, "v": v}[name][0, 2, 1, 3] = float(value)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _attention_with_lse(q, k, v):
    return mmkern.flash_attn_func(q, k, v, return_lse=True)


def _assert_close_where_finite(got, want, eager, dtype, where=None):
    """The accuracy criterion on the positions where the oracle is finite (and `where`, if given): error
    <= 2 x eager PyTorch's (the reference math in dtype) + one ulp of the largest output there."""
    keep = torch.isfinite(want) if where is None else torch.isfinite(want) & where
    error = (got.double() - want)[keep].abs().max().item()
    base = (eager.double() - want)[keep & torch.isfinite(eager)].abs().max().item()   # eager may overflow
    assert error <= 2 * base + torch.finfo(dtype).eps * want[keep].abs().max().item(), (error, base)


POISON = ["q nan", "k nan", "v nan", "k inf", "q -inf"]
# (dtype, head dim): float32 at head dim 8, and the 16-bit dtypes at head dim 64, which the CUDA C++ kernels take
KINDS = [(torch.float32, 8), (torch.float16, 64), (torch.bfloat16, 64)]
KIND_IDS = ["fp32-d8", "fp16-d64", "bf16-d64"]


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("where", POISON)
@pytest.mark.parametrize("dtype,D", KINDS, ids=KIND_IDS)
def test_nan_and_inf_inputs_never_poison_other_batches_or_heads(backend, where, dtype, D):
    q, k, v = _poisoned(where, dtype, D)
    with forced(backend):
        out, lse = _attention_with_lse(q, k, v)
    want_out, _ = _oracle(_attention_with_lse, q, k, v)
    with mmkern.backend("reference"), compute_in(dtype):
        eager, _ = _attention_with_lse(q, k, v)
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, :, :2]).all()   # batch 1; heads 0, 1
    assert torch.isfinite(lse[1]).all() and torch.isfinite(lse[0, :2]).all()
    clean = torch.zeros_like(want_out, dtype=torch.bool)
    clean[1] = True
    _assert_close_where_finite(out, want_out, eager, dtype, clean)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("where", POISON)
@pytest.mark.parametrize("dtype,D", KINDS, ids=KIND_IDS)
def test_nan_and_inf_inputs_propagate_as_the_oracle(backend, where, dtype, D):
    """One poisoned element: out and lse are NaN exactly where the oracle's are (the numerics contract: a NaN
    score gives a NaN row; +inf, NaN out and lse +inf), and equal elsewhere."""
    q, k, v = _poisoned(where, dtype, D)
    with forced(backend):
        out, lse = _attention_with_lse(q, k, v)
    want_out, want_lse = _oracle(_attention_with_lse, q, k, v)
    with mmkern.backend("reference"), compute_in(dtype):
        eager, _ = _attention_with_lse(q, k, v)
    _nan_pattern_matches(out, want_out)
    _nan_pattern_matches(lse, want_lse)
    infinite = torch.isinf(want_lse)                     # -inf: a row that sees no key; +inf: a +inf score
    assert torch.equal(lse[infinite], want_lse[infinite].float())
    _assert_close_where_finite(out, want_out, eager, dtype)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("where", POISON)
@pytest.mark.parametrize("dtype,D", KINDS, ids=KIND_IDS)
def test_nan_and_inf_inputs_propagate_through_the_backward(backend, where, dtype, D):
    """The backward never turns a NaN (or an inf - inf) into a finite gradient, nor leaks it: dq, dk, dv
    are NaN exactly where the float64 oracle's are (batch 1 finite) and equal elsewhere."""
    q, k, v = (t.requires_grad_() for t in _poisoned(where, dtype, D))
    dout = randn(2, 5, 4, D, dtype=dtype)
    with forced(backend):
        got = torch.autograd.grad(mmkern.flash_attn_func(q, k, v), (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with mmkern.backend("reference"):
        want = torch.autograd.grad(mmkern.flash_attn_func(q64, k64, v64), (q64, k64, v64), dout.double())
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with mmkern.backend("reference"), compute_in(dtype):
        eager = torch.autograd.grad(mmkern.flash_attn_func(qe, ke, ve), (qe, ke, ve), dout)
    assert any(torch.isnan(w).any() for w in want)
    for g, w, e in zip(got, want, eager):
        _nan_pattern_matches(g, w)
        assert torch.isfinite(w[1]).all()
        _assert_close_where_finite(g, w, e, dtype)


@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("rms", [False, True])
def test_nan_in_a_norm_row_stays_in_that_row(backend, rms):
    x, r = randn(6, 40, dtype=torch.float32, requires_grad=True), randn(6, 40, dtype=torch.float32)
    w = randn(40, dtype=torch.float32)
    with torch.no_grad():
        x[2, 5] = float("nan")
        r[4, 0] = float("inf")
    fn = mmkern.rms_norm_residual if rms else mmkern.layer_norm_residual
    with forced(backend):
        out = fn(x, r, w)
        out.backward(torch.ones_like(out))
    with mmkern.backend("reference"):
        want = fn(x.detach().double(), r.double(), w.double())
    _nan_pattern_matches(out, want)
    clean = [0, 1, 3, 5]
    assert torch.isfinite(out[clean]).all() and torch.isfinite(x.grad[clean]).all()
    assert (out[clean].double() - want[clean]).abs().max() < 1e-4


# --------------------------------------------------------------------------- norms far from zero

@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("dtype,offset,tolerance", [(torch.bfloat16, 300.0, 2), (torch.float16, 300.0, 2),
                                                    (torch.float32, 1e4, 2e4)])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_rows_with_mean_far_from_zero(backend, dtype, offset, tolerance, rms):
    """Rows mean + N(0, 1): a one-pass E[x^2] - E[x]^2 variance cancels catastrophically (float32 with a
    mean of 1e4 loses every digit of a unit variance). Error in ulps of the output dtype against the oracle
    on the same rounded inputs (float32: the input rounding itself moves the mean by ~1e-3)."""
    x = (randn(5, 257) + offset).to(dtype)
    w, b = randn(257, dtype=dtype), randn(257, dtype=dtype)
    with forced(backend):
        out = mmkern.rms_norm_residual(x, weight=w) if rms else mmkern.layer_norm_residual(x, weight=w, bias=b)
    want = _oracle(lambda x, w, b: mmkern.rms_norm_residual(x, weight=w) if rms else
                   mmkern.layer_norm_residual(x, weight=w, bias=b), x, w, b)
    assert _ulps(out, want, dtype) <= tolerance


# --------------------------------------------------------------------------- first and last timesteps

def _schedule(zero_snr=False):
    schedule = NoiseSchedule(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=zero_snr)
    return schedule.alphas_cumprod.float().to(DEVICE)


def _step_cases(zero_snr):
    ac = _schedule(zero_snr)
    T = ac.shape[0]
    t = torch.tensor([0, T - 1, 0, T - 1], device=DEVICE)
    # with zero terminal SNR, alpha_{T-1} = 0: only v_prediction (and sample) are defined there
    predictions = ["v_prediction", "sample"] if zero_snr else ["epsilon", "v_prediction", "sample"]
    sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)]).to(DEVICE)
    make = lambda: dict(mo=randn(4, 3, 5), sample=randn(4, 3, 5), noise=randn(4, 3, 5))  # noqa: E731
    cases = []
    for pred in predictions:
        cases += [
            verify.Case(f"ddpm t0/T-1 {pred}", "B4 3x5", make, lambda mo, sample, noise, pred=pred:
                        mmkern.diffusion.ddpm_step(mo, t, sample, ac, noise=noise, prediction_type=pred),
                        cast=("mo", "sample", "noise")),
            verify.Case(f"ddim t0/T-1 {pred}", "B4 3x5", make, lambda mo, sample, noise, pred=pred:
                        mmkern.diffusion.ddim_step(mo, t, sample, ac, t - 20, eta=1.0, noise=noise,
                                                   prediction_type=pred), cast=("mo", "sample", "noise")),
            verify.Case(f"add_noise/velocity/loss t0/T-1 {pred}", "B4 3x5", make, lambda mo, sample, noise, pred=pred:
                        (mmkern.diffusion.diffusion_loss(mo, sample, noise, t, ac, pred,
                                                         None if zero_snr else 5.0),
                         mmkern.diffusion.add_noise(sample, noise, t, ac),
                         mmkern.diffusion.get_velocity(sample, noise, t, ac)),
                        cast=("mo", "sample", "noise"), grad=("mo",)),
        ]
    steps = torch.tensor([0, 9, 0, 9], device=DEVICE)
    cases.append(verify.Case("euler first/last step", "B4 3x5", make, lambda mo, sample, noise:
                             (*mmkern.diffusion.euler_step(mo, steps, sample, sigmas, noise=noise, s_churn=1.0),
                              mmkern.diffusion.euler_scale_model_input(sample, steps, sigmas)),
                             cast=("mo", "sample", "noise")))
    return cases


@pytest.mark.parametrize("backend", STEPS)
@pytest.mark.parametrize("zero_snr", [False, True], ids=["scaled_linear", "zero_terminal_snr"])
def test_samplers_at_the_first_and_last_timestep(backend, zero_snr):
    for case in _step_cases(zero_snr):
        for dtype in DTYPES:
            rows = verify.measure(case, backend, dtype)
            for row in rows:
                assert math.isfinite(row.error), f"{row.op} [{backend}, {row.dtype}]: not finite"
                assert row.passed, f"{row.op} [{backend}, {row.dtype}]: error {row.error:.3e} > {row.tolerance:.3e}"
