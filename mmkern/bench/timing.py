"""Device-time clocks and the measuring loop.

GPU work is asynchronous: a host clock read right after a launch measures the launch, not the
kernel. `CudaEventClock` is a clock (a callable returning seconds, like time.perf_counter) that
records a CUDA event on the current stream, waits for it, and returns its time since a reference
event: the difference of two readings is the device time between them. pytest-benchmark reads its
timer around each round, so plugging this clock in as its timer (see benchmarks/conftest.py) gives
device time per round without changing the targets. On a CPU, time.perf_counter is the clock.

Warm-up (compilation, autotuning, cuBLAS/cuDNN handle creation, allocator growth) runs outside the
measurement. Memory-bound ops should not find their inputs in L2 from the previous round: an
`L2Flusher` overwrites a buffer twice the L2 size between rounds, outside the timed region.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


class CudaEventClock:
    """Seconds of device time on `device`'s current stream since this clock was made.

    Each reading records an event and synchronises on it (~10 us of host time, outside the
    device-side interval that the next reading measures from)."""

    def __init__(self, device: torch.device | str | int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        with torch.cuda.device(self.device):
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
            self._origin.synchronize()

    def __call__(self) -> float:
        with torch.cuda.device(self.device):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            event.synchronize()
            return self._origin.elapsed_time(event) / 1e3

    def __repr__(self) -> str:          # pytest-benchmark stores the timer's name in its JSON
        return f"CudaEventClock({self.device})"

    __name__ = "CudaEventClock"


def clock_for(device: torch.device | str) -> Callable[[], float]:
    """The clock to time work on `device` with: CUDA events on a GPU, the host's perf_counter on a CPU."""
    device = torch.device(device)
    return CudaEventClock(device) if device.type == "cuda" else time.perf_counter


class L2Flusher:
    """Evicts the L2 cache of a GPU by overwriting a buffer of twice its size (call between rounds).

    On a CPU it does nothing (the CPU suites are smoke tests; their caches are not modelled)."""

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        self.buffer = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
            self.buffer = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.fill_(1.0)


def warm_up(fn: Callable, args: Sequence = (), clock: Callable[[], float] = time.perf_counter,
            min_calls: int = 3, min_seconds: float = 0.02, setup: Callable[[], Sequence] | None = None) -> float:
    """Run fn(*args) (or fn(*setup()), fresh arguments made outside the timed part) until both min_calls
    and min_seconds are reached, the first call (which compiles) not counted; return seconds per call."""
    fn(*(setup() if setup else args))
    calls, elapsed = 0, 0.0
    while calls < min_calls or elapsed < min_seconds:
        call_args = setup() if setup else args
        start = clock()
        fn(*call_args)
        elapsed += clock() - start
        calls += 1
    return elapsed / calls


def choose_rounds(seconds_per_call: float, max_time: float = 1.0, min_rounds: int = 5,
                  max_rounds: int = 1000) -> int:
    """How many timed rounds fit in max_time seconds, at least min_rounds."""
    if seconds_per_call <= 0:
        return max_rounds
    return int(max(min_rounds, min(max_rounds, max_time / seconds_per_call)))


def time_function(fn: Callable, args: Sequence = (), device: torch.device | str = "cpu", max_time: float = 0.5,
                  min_rounds: int = 5, flush_l2: bool = False) -> list[float]:
    """Device seconds of each timed round of fn(*args), after a warm-up (for use without pytest)."""
    clock = clock_for(device)
    flush = L2Flusher(device) if flush_l2 else (lambda: None)
    rounds = choose_rounds(warm_up(fn, args, clock), max_time, min_rounds)
    times = []
    for _ in range(rounds):
        flush()
        start = clock()
        fn(*args)
        times.append(clock() - start)
    return times


def median(times: Sequence[float]) -> float:
    return statistics.median(times)
