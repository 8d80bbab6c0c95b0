"""Benchmark tools: device-time clocks, the device's measured ceilings, FLOP/byte counts, the quick
`mmkern bench` selection and the `mmkern report` generator. Installed with the package, so a user can
time mmkern outside a checkout; the pytest-benchmark suites in benchmarks/ are built on it.

    timing.py     device clocks (CUDA events) usable as pytest-benchmark's timer, warm-up, L2 flush
    ceilings.py   copy bandwidth and dense matmul rate, measured once per process per device
    counts.py     FLOPs and minimum bytes of each op; rates and fractions of the ceilings
    attention.py  attention implementations a user could call (mmkern backends, torch SDPA backends, ...)
    cli.py        `mmkern bench`;  report.py  `mmkern report`
"""
from mmkern.bench.ceilings import Ceilings, measure_ceilings
from mmkern.bench.counts import attention_decode_bytes, attention_flops, rates
from mmkern.bench.timing import CudaEventClock, L2Flusher, clock_for, time_function, warm_up

__all__ = ["Ceilings", "CudaEventClock", "L2Flusher", "attention_decode_bytes", "attention_flops", "clock_for",
           "measure_ceilings", "rates", "time_function", "warm_up"]
