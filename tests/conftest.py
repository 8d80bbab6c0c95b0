"""Shared test helpers: fresh random inputs, the seed the public functions draw, error measures.

Without a GPU the Triton kernels run on the CPU through Triton's interpreter, which must be chosen
before triton is first imported: this file sets TRITON_INTERPRET=1 then, before importing mmkern.
"""
import contextlib
import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmkern  # noqa: E402,F401  (registers the ops)
from mmkern import dispatch, verify  # noqa: E402
from mmkern.ops._rng import _SEED_RANGE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def seed_drawn_after(manual_seed: int) -> int:
    """The dropout seed an mmkern function draws first after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, _SEED_RANGE, (1,), dtype=torch.int64))


@contextlib.contextmanager
def forced(backend: str):
    """mmkern.backend(backend) for a test parametrized over backends; a case the backend does not take
    (NoBackendError: e.g. the CUDA C++ attention takes fp16/bf16 with head dims 64/96/128 only) is skipped
    with the backend's own reasons, not failed: the case still runs on every backend that takes it.
    The block must run at least one op on `backend` (mmkern.dispatch_log, yielded): a test that names a
    backend and runs none of its kernels is a test of nothing."""
    try:
        with mmkern.backend(backend), mmkern.dispatch_log() as log:
            yield log
    except mmkern.NoBackendError as exc:
        pytest.skip(f"backend {backend!r} does not take this case: {exc}")
    assert log.ran(backend), f"no mmkern op ran on backend {backend!r} inside forced({backend!r}): {log.calls}"


def assert_backend_matches_oracle(backend: str, case: "verify.Case", dtypes=DTYPES, reduced_elements=None,
                                  conditioning: float = 1.0):
    """flash-attn's criterion, through `mmkern verify`'s measure, for each output and each gradient on its own:
    error against the float64 oracle (on the same rounded inputs) <= 2 x the error of eager PyTorch in the
    same dtype + one ulp of the largest output; a row whose bound is not finite fails (Row.passed).

    reduced_elements = n for a forward that sums n terms into one scalar (the diffusion loss): two correct fp32
    summation orders differ by up to ~log2(n) ulps of the sum, and the eager baseline's own error can be near 0
    by luck (it failed 1 run in ~150 at n = 420 with the plain criterion), so the tolerance of the forward's
    outputs is multiplied by log2(n) there. Gradients keep the plain criterion.

    conditioning = c multiplies the outputs' tolerance where the op amplifies one rounding of its inputs by a
    large factor (a DDPM step's x0 = (s - sqrt(1 - a) eps) / sqrt(a) at t = 999: 1 / sqrt(a) = 156): the eager
    yardstick's error is then one draw of that amplified rounding, and correct kernels associating differently
    (a reciprocal multiply, precomputed coefficients, sqrt(a) from a float64 table) measured 1.1-1.3x the plain
    bound there; torch.randn's draws differ between CPUs (AVX2 / AVX-512), and with them which draws are lucky."""
    for dtype in dtypes:
        for row in verify.measure(case, backend, dtype):
            allowed = row.tolerance
            if reduced_elements and not row.gradient:
                allowed *= max(1.0, math.log2(reduced_elements))
            if not row.gradient:
                allowed *= conditioning
            assert math.isfinite(allowed) and row.error <= allowed, (
                f"{row.op} [{backend}, {row.dtype}, {row.shape}]: error {row.error:.3e} > tolerance {allowed:.3e} "
                f"{row.note}")


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def randn(*shape, dtype=torch.float64, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=torch.float64) * scale
    return t.to(dtype).requires_grad_(requires_grad)


# Test inputs are random, drawn from a seed made of the test's name and MMKERN_TEST_SEED (default 0): every
# test gets its own inputs, a run is reproducible (CI sees the same inputs every time: a failure is a bug to
# replay, not a flake), and MMKERN_TEST_SEED=<n> draws a whole new set. (Python's hash() of a string is salted
# per process, so it gave other inputs on every run.)
TEST_SEED = int(os.environ.get("MMKERN_TEST_SEED", "0"))


def pytest_report_header(config):
    return f"mmkern test inputs: MMKERN_TEST_SEED={TEST_SEED} (set it to draw other random inputs)"


def pytest_sessionfinish(session):
    """An xdist worker hands its fuzz counts to the controller, which prints them (tests/fuzz_profiles.py)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        import fuzz_profiles
        workeroutput[fuzz_profiles.WORKER_OUTPUT_KEY] = fuzz_profiles.counts_for_controller()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """(pytest-xdist, on the controller) a worker finished: add its fuzz counts to the summary."""
    import fuzz_profiles
    rows = getattr(node, "workeroutput", {}).get(fuzz_profiles.WORKER_OUTPUT_KEY, [])
    fuzz_profiles.add_worker_counts(node.config, rows)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Random inputs of their own in every test, reproducible from the test's name and MMKERN_TEST_SEED."""
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ TEST_SEED) % 2**31)
    yield


@pytest.fixture(autouse=True)
def _fresh_dispatch_memo():
    """An empty per-signature memo (mmkern.dispatch.call_memoized) in every test: tests monkeypatch backends'
    kernels and reasons, which the memo's backends were chosen under, and the first call of a signature in each
    test then goes through the full validation."""
    dispatch.forget_selections()
    yield
    dispatch.forget_selections()


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, 0 (not NaN) in rows where every score is -inf."""
    finite_row = torch.isfinite(scores).any(-1, keepdim=True)
    safe = torch.where(finite_row, scores, torch.zeros_like(scores))
    return torch.where(finite_row, torch.softmax(safe, -1), torch.zeros_like(scores))


def naive_attention_one(q, k, v, *, scale=None, causal=False, bottom_right=True, window=(-1, -1), softcap=0.0,
                        slopes=None, keep=None, dropout_p=0.0):
    """softmax(Q K^T) V written out by hand for ONE sequence, head by head.

    q (Lq, H, D), k/v (Lk, H_kv, D); slopes (H,); keep (H, Lq, Lk) bool. Returns out (Lq, H, D), lse (H, Lq).
    """
    Lq, H, D = q.shape
    Lk, H_kv = k.shape[0], k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    outs, lses = [], []
    for h in range(H):
        kh, vh = k[:, h * H_kv // H], v[:, h * H_kv // H]
        s = (q[:, h] @ kh.T) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        rows = torch.arange(Lq).unsqueeze(1) + ((Lk - Lq) if bottom_right else 0)
        cols = torch.arange(Lk).unsqueeze(0)
        if slopes is not None:
            s = s - slopes[h] * (rows - cols).abs()
        allowed = torch.ones(Lq, Lk, dtype=torch.bool)
        right = 0 if causal else window[1]
        if right >= 0:
            allowed &= cols <= rows + right
        if window[0] >= 0:
            allowed &= cols >= rows - window[0]
        s = s.masked_fill(~allowed, float("-inf"))
        p = softmax_rows(s)
        lses.append(torch.logsumexp(s, -1))
        if keep is not None:
            p = p * keep[h] / (1 - dropout_p)
        outs.append(p @ vh)
    return torch.stack(outs, 1), torch.stack(lses, 0)
