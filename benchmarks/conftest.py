"""Shared pieces of the pytest-benchmark suites (the tools themselves live in mmkern.bench).

    python -m pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-json=out.json
    MMKERN_BENCH_SIZES=quick ...     the selection scripts/gpu_check.sh runs (fewer sizes)

How a result is timed (the `bench` fixture):
  * the clock is device time: CUDA events on a GPU (mmkern.bench.timing.CudaEventClock, installed as
    pytest-benchmark's timer for the test), the host's perf_counter on a CPU;
  * warm-up calls (compilation, autotuning, handle creation) run before and outside the measurement;
    their time sets how many rounds fit in --benchmark-max-time (at least --benchmark-min-rounds);
  * memory-bound results (bytes given, no FLOPs) flush the GPU's L2 between rounds, outside the timed
    interval, so no round reads its inputs from the cache the previous one warmed;
  * inputs are fresh random tensors made by each test (never zeros);
  * extra_info records FLOPs, bytes, TFLOP/s, GB/s (at the median round) and their fractions of the
    ceilings measured once per run on this device (copy bandwidth, dense matmul rate); the JSON's
    machine_info["mmkern"] holds the device, the versions and those ceilings.
On a CPU-only machine the sizes are small: the suites are smoke tests (CI runs them with
--benchmark-disable) and a record of the CPU's cost. The Triton backend runs there only under
TRITON_INTERPRET=1 set before the run; otherwise its rows are skipped with the reason.
"""
import os
import platform

import pytest
import torch

import mmkern
from mmkern.bench import counts, timing
from mmkern.bench.ceilings import device_name, measure_ceilings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# "quick": the selection scripts/gpu_check.sh and CI run; "full" (default): every size of the issues.
QUICK = os.environ.get("MMKERN_BENCH_SIZES", "full") == "quick"
_MEASURED = {}          # device -> Ceilings, once per run, for machine_info


def synchronized(fn):
    """fn, followed by a device synchronisation (for targets timed with a host clock)."""
    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        if ON_GPU:
            torch.cuda.synchronize()
        return result
    return run


def skip_unless_backend(name: str) -> None:
    """Skip the current test, with the reasons, when mmkern's backend `name` is not usable here."""
    if name not in mmkern.available_backends():
        backend = mmkern.dispatch.backends().get(name)
        reasons = backend.environment_reasons() if backend else [f"no backend named {name}"]
        pytest.skip(f"mmkern's {name} backend is not usable here: " + ("; ".join(reasons) or "no kernels"))


def _ceilings(device):
    if device not in _MEASURED:
        _MEASURED[device] = measure_ceilings(device)
    return _MEASURED[device]


_CLOCK = {}


def _clock(device):
    if device not in _CLOCK:
        _CLOCK[device] = timing.clock_for(device)
    return _CLOCK[device]


@pytest.fixture
def bench(benchmark):
    """bench(fn, *args, flops=None, bytes=None, setup=None, flush_l2=None, device=DEVICE, **extra_info)
    -> fn's result.

    Times fn(*args) (or fn(*setup()) with fresh arguments each round) in `device` time after a
    warm-up, and records the rates in benchmark.extra_info. flush_l2 defaults to True for
    memory-bound results (bytes given without flops). device="cpu" times CPU work with the host
    clock (and CPU ceilings) even on a machine with a GPU."""
    def run(fn, *args, flops=None, bytes=None, setup=None, flush_l2=None, device=DEVICE, **extra_info):
        on_gpu = torch.device(device).type == "cuda"
        benchmark.extra_info.update(extra_info, device=device_name(device))
        if benchmark.disabled:                    # --benchmark-disable: one call, a smoke test
            if setup:
                return benchmark.pedantic(fn, setup=lambda: (setup(), {}))
            return benchmark.pedantic(fn, args=args)
        clock = _clock(device)
        benchmark._timer = clock                  # pytest-benchmark reads this clock around every round
        if flush_l2 is None:
            flush_l2 = bool(bytes) and not flops
        flush = timing.L2Flusher(device) if flush_l2 and on_gpu else None
        estimate = timing.warm_up(fn, args, clock, setup=setup)
        rounds = timing.choose_rounds(estimate, benchmark._max_time, benchmark._min_rounds)
        if flush or setup:
            def round_setup():
                if flush:
                    flush()
                return (setup() if setup else args), {}
            result = benchmark.pedantic(fn, setup=round_setup, rounds=rounds)
        else:
            # several calls per round when one is short, so launch gaps do not dominate
            iterations = max(1, min(100, int(1e-4 / max(estimate, 1e-9)))) if on_gpu else 1
            result = benchmark.pedantic(fn, args=args, rounds=max(benchmark._min_rounds, rounds // iterations),
                                        iterations=iterations)
        benchmark.extra_info.update(counts.rates(benchmark.stats.stats.median, flops, bytes, _ceilings(device)))
        return result
    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"unavailable ({exc.__class__.__name__})"
    info = {"device": device_name(DEVICE), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "mmkern": mmkern.__version__, "python": platform.python_version(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "sizes": "quick" if QUICK else "full",
            "backends": mmkern.available_backends()}
    if DEVICE in _MEASURED:
        info["ceilings"] = _MEASURED[DEVICE].as_dict()
    if ON_GPU and "cpu" in _MEASURED:           # CPU rows (device="cpu") were timed too
        info["cpu_ceilings"] = _MEASURED["cpu"].as_dict()
    machine_info["mmkern"] = info
