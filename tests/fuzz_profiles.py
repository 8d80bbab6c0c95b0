"""Shared machinery of the property-based (hypothesis) parity suites, tests/test_fuzz_*.py.

Profiles, chosen with MMKERN_FUZZ_PROFILE (default "ci"):
    ci   few, small examples: the three fuzz files together stay within ~2 minutes on 2 CPU cores
         with Triton's interpreter
    gpu  ~10x the examples, longer sequences and wider rows, for a run on a GPU (each new combination of
         constexpr flags compiles a kernel there, so the counts are sized for a few minutes)
Each run draws its examples from one seed, printed in the summary: fixed by default (reproducible CI),
MMKERN_FUZZ_SEED=<n> replays a run, MMKERN_FUZZ_SEED=random draws a fresh one.
deadline=None: under the interpreter one example can take seconds.

Every example is checked with flash-attn's criterion (mmkern.verify.compare: each output tensor on its own,
error against the float64 oracle on the same rounded inputs <= 2 x eager PyTorch's error in the same dtype +
ULPS ulps of the largest oracle output) on every backend that is usable here and takes the inputs; every
usable non-reference backend must check at least one example of each test (every_backend_checks). The
counts (examples run, checks per backend, failures) are printed in pytest's terminal summary, so CI output
shows them.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from collections import Counter
from unittest import mock

import torch
from hypothesis import HealthCheck, seed, settings

import mmkern
from mmkern import dispatch, verify

PROFILE = os.environ.get("MMKERN_FUZZ_PROFILE", "ci")
# Default: a fixed seed (offset by MMKERN_TEST_SEED, as every test's inputs), so a CI run is reproducible
# and a failure replays; MMKERN_FUZZ_SEED=random (scripts/gpu_check.sh) or =<n> explores other examples.
_SEED_SETTING = os.environ.get("MMKERN_FUZZ_SEED", "")
SEED = (random.SystemRandom().randrange(2**32) if _SEED_SETTING == "random" else int(_SEED_SETTING) if _SEED_SETTING
        else (20261129 ^ int(os.environ.get("MMKERN_TEST_SEED", "0"))) % 2**32)
GPU = PROFILE == "gpu"
# Where the examples' tensors live: the GPU when there is one (the Triton and CUDA backends take CUDA tensors
# only; the oracle runs there too), else the CPU (Triton through its interpreter).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

_common = dict(deadline=None, print_blob=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("mmkern-ci", max_examples=10, **_common)
settings.register_profile("mmkern-gpu", max_examples=100, **_common)
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"MMKERN_FUZZ_PROFILE must be 'ci' or 'gpu', got {PROFILE!r}")


def fuzz(ci: int, gpu: int):
    """Decorator: the profile's settings with `ci` / `gpu` examples, and this run's seed.
    (Profiles are applied per test, never loaded globally: other hypothesis tests keep theirs.)"""
    def wrap(test):
        return seed(SEED)(settings(settings.get_profile(f"mmkern-{PROFILE}"),
                                   max_examples=gpu if GPU else ci)(test))
    return wrap


# --------------------------------------------------------------------------- counting

COUNTS: Counter = Counter()      # (test, what) -> n


class _Summary:
    """A pytest plugin registered on first use: prints the counts after the run."""

    def pytest_terminal_summary(self, terminalreporter):
        if not COUNTS:
            return
        terminalreporter.write_sep("-", f"mmkern fuzz: profile {PROFILE}, seed {SEED} "
                                        f"(MMKERN_FUZZ_SEED={SEED} replays it)")
        tests = sorted({t for t, _ in COUNTS})
        for t in tests:
            parts = [f"{COUNTS[(t, 'examples')]} examples", f"{COUNTS[(t, 'failed')]} failed"]
            parts += [f"{what} {n}" for (tt, what), n in sorted(COUNTS.items())
                      if tt == t and what not in ("examples", "failed")]
            terminalreporter.write_line(f"{t}: " + ", ".join(parts))
        total = sum(n for (_, what), n in COUNTS.items() if what == "examples")
        failed = sum(n for (_, what), n in COUNTS.items() if what == "failed")
        terminalreporter.write_line(f"fuzz total: {total} examples run, {failed} failed "
                                    f"(failing examples count once per shrink attempt)")


_summary = _Summary()


def register_summary(config) -> None:
    if not config.pluginmanager.is_registered(_summary):
        config.pluginmanager.register(_summary, "mmkern-fuzz-summary")


# Under pytest-xdist (`pytest -n 2`) the fuzz tests run in workers, whose terminal summaries nobody sees: each
# worker hands its counts to the controller (conftest.py's pytest_sessionfinish / pytest_testnodedown), which
# adds them up and prints the summary.
WORKER_OUTPUT_KEY = "mmkern_fuzz_counts"


def counts_for_controller() -> list[list]:
    return [[test, what, n] for (test, what), n in COUNTS.items()]


def add_worker_counts(config, rows: list[list]) -> None:
    for test, what, n in rows:
        COUNTS[(test, what)] += n
    if rows:
        register_summary(config)


@contextlib.contextmanager
def counted(test: str):
    """Counts one example of `test`, and a failure when its body raises."""
    COUNTS[(test, "examples")] += 1
    try:
        yield
    except Exception:       # not BaseException: hypothesis stops an example it has no data for with one
        COUNTS[(test, "failed")] += 1
        raise


# --------------------------------------------------------------------------- backends and parity

def backends() -> list[str]:
    """Every backend usable in this process (the reference included: its output rounding is checked too).
    A backend built later (the C++ "cpu" one) joins automatically once available_backends() lists it."""
    return mmkern.available_backends()


def takes(backend: str, op: str, device: torch.device, inputs: dict) -> bool:
    """Whether `backend` takes `op` on these schema arguments (the op's record fills in what is left out)."""
    problem = dispatch.problem(op, **inputs)
    assert problem.device == device, (problem.device, device)
    return not dispatch.not_supported_reasons(op, backend, problem)


def _philox_attention_mask(seed, shape, dropout_p, device):
    # the independent numpy model of the kernels' Philox draws (tests/philox_model.py), not the kernels' own
    # dropout_mask: the oracle then checks the mask the kernels use, not only that they use it consistently.
    # The Triton kernels and the C++ CPU kernels draw the same mask (the same counters).
    from philox_model import attention_keep_mask
    B, H, Lq, Lk = shape
    return torch.from_numpy(attention_keep_mask(int(seed), B, H, Lq, Lk, dropout_p)).to(device)


def _triton_norm_mask(seed, shape, dropout_p, device):
    from mmkern.triton.norm import dropout_keep_mask
    return dropout_keep_mask(seed, shape, dropout_p, device)


def _native_norm_mask(seed, shape, dropout_p, device):
    from mmkern.native.norm import dropout_keep_mask
    return dropout_keep_mask(seed, shape, dropout_p, device)


# backend -> the test-path functions giving the keep masks its kernels draw for a seed, with the signature of
# mmkern.reference.dropout.dropout_keep_mask(seed, shape, dropout_p, device). The oracle is run with the
# backend's mask, so dropout is compared element for element. A backend without one here is checked on
# dropout's structural properties instead (see has_mask_function).
ATTENTION_MASKS = {"triton": _philox_attention_mask, "cpu": _philox_attention_mask}
NORM_MASKS = {"triton": _triton_norm_mask, "cpu": _native_norm_mask, "cuda": _native_norm_mask}


def has_mask_function(backend: str, family: str) -> bool:
    return backend == "reference" or backend in (ATTENTION_MASKS if family == "attention" else NORM_MASKS)


@contextlib.contextmanager
def oracle_draws_masks_of(backend: str, family: str):
    """Inside: the reference backend draws the dropout masks `backend`'s kernels draw."""
    if backend == "reference":
        yield
        return
    table = ATTENTION_MASKS if family == "attention" else NORM_MASKS
    target = f"mmkern.reference.{family}.dropout_keep_mask"
    with mock.patch(target, table[backend]):
        yield


ULPS = 4   # the floor of the fuzz tolerance, in ulps of the largest oracle output (verify.measure uses 1)


def check(test: str, case: verify.Case, backend: str, dtype: torch.dtype, family: str | None = None) -> None:
    """flash-attn's criterion for one (case, backend, dtype), each output tensor on its own
    (mmkern.verify.compare), with a wider floor: 2 x baseline + ULPS ulps of the largest oracle output, where
    verify's tolerance has 1 ulp. Why a wider floor when fuzzing: in float32 eager PyTorch is often within
    an ulp of the oracle by luck of the draw, and a kernel summing in another order (exp2, blocked
    accumulation) lands 2-3 ulps away. Fuzzing samples that tail (~1 example in 15 at float32 with
    1 ulp, checked over 30 draws of one varlen backward shape); a real bug is off by far more.
    `family` ("attention" / "norm") is set when dropout is on."""
    with (oracle_draws_masks_of(backend, family) if family else contextlib.nullcontext()):
        comparisons = verify.compare(case, backend, dtype)
    # an example whose public function dispatched nothing (it returned early) checked no kernel of the backend
    ran = all(c.ran for c in comparisons)
    COUNTS[(test, f"checks[{backend}]" if ran else f"no op ran[{backend}]")] += 1
    for c in comparisons:
        strict, tolerance = c.tolerance(verify.row_ulps(c)), c.tolerance(ULPS)
        if strict < c.error <= tolerance:
            COUNTS[(test, "within the fuzz floor only")] += 1
        assert math.isfinite(tolerance) and c.error <= tolerance, (
            f"{c.name} [{backend}, {dtype}, {case.shape}]: error {c.error:.3e} > tolerance {tolerance:.3e} "
            f"(strict {strict:.3e}) {c.note}")


def every_backend_checks(tests: list[str], ops: tuple[str, ...], typical: dict):
    """Decorator of a fuzz test (a hypothesis test drawing examples named `tests`): after its examples, every
    usable non-reference backend that has `ops` and takes `typical` (a plain input of ops[0], as its
    not_supported_reasons sees it) must have checked at least one of them. (The count of examples some backend
    checked always held: the reference takes everything.) A narrow backend (the CUDA C++ attention: fp16/bf16,
    head dims 64/96/128) that refuses the typical input is not required."""
    def wrap(hypothesis_test):
        def test():
            before = Counter(COUNTS)
            hypothesis_test()
            required = [b for b in backends() if b != "reference"
                        and all(op in dispatch.backends()[b].kernels for op in ops) and takes(b, ops[0], DEVICE, typical)]
            missed = [b for b in required if not sum(COUNTS[(t, f"checks[{b}]")] - before[(t, f"checks[{b}]")]
                                                     for t in tests)]
            seen = {what: n - before[(t, what)] for (t, what), n in COUNTS.items() if t in tests}
            assert not missed, f"{tests}: backends {missed} take the typical input but checked no example: {seen}"
        test.__name__, test.__doc__ = hypothesis_test.__name__, hypothesis_test.__doc__
        return test
    return wrap


def seeded(fn, seed: int):
    """`fn` with torch's generator reset before each call: every call draws the same dropout seed."""
    def run(**kwargs):
        torch.manual_seed(seed)
        return fn(**kwargs)
    return run


# --------------------------------------------------------------------------- strided views

LAYOUTS = ("contiguous", "padded", "permuted", "last_dim_strided")


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of `t` in a differently strided view (differentiable, so gradients flow back):
    padded: a slice of a wider buffer (row strides > the row length); permuted: dims 1 and 2 swapped
    in memory; last_dim_strided: every other element of a doubled last dim (stride 2: the public
    functions must copy, never misread)."""
    if layout == "contiguous" or t.dim() == 0:
        return t
    if layout == "padded":
        return torch.cat([t, torch.zeros_like(t[..., :3])], -1)[..., :t.shape[-1]]
    if layout == "permuted" and t.dim() >= 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "last_dim_strided":
        return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    return t
