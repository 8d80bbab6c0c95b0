"""The two ceilings of a device, measured once per process (not read off a datasheet):

    copy bandwidth   dst.copy_(src) of a large buffer, counting bytes read + bytes written
                     (GPU: 1 GiB device-to-device; CPU: 64 MiB memcpy)
    matmul rate      a dense matrix product on random data (never zeros: they run faster)
                     (GPU: bf16 8192^3; CPU: fp32 1024^3, the CPU's dense rate)

A benchmark result divided by these says how far an op is from its roof: memory-bound ops against
the copy bandwidth, matrix-bound ones (attention) against the matmul rate.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from mmkern.bench.timing import median, time_function


@dataclass(frozen=True)
class Ceilings:
    device: str                 # e.g. "NVIDIA H200" or "cpu"
    copy_gbps: float            # GB/s (1e9 bytes), read + write
    matmul_tflops: float        # TFLOP/s (1e12)
    matmul_dtype: str           # the dtype of the matmul measured

    def as_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@functools.lru_cache(maxsize=None)
def _measure(device: str) -> Ceilings:
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    numel = (2**30 if on_gpu else 64 * 2**20) // 4
    src = torch.randn(numel, device=dev)
    dst = torch.empty_like(src)
    copy_s = median(time_function(dst.copy_, (src,), dev, max_time=0.3, min_rounds=5))
    del src, dst
    n, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    matmul_s = median(time_function(torch.mm, (a, b), dev, max_time=0.5, min_rounds=5))
    return Ceilings(device_name(dev), copy_gbps=2 * numel * 4 / copy_s / 1e9,
                    matmul_tflops=2 * n**3 / matmul_s / 1e12, matmul_dtype=str(dtype).replace("torch.", ""))


def measure_ceilings(device: torch.device | str = "cpu") -> Ceilings:
    """The device's copy bandwidth and matmul rate, measured on the first call for that device."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _measure(str(dev))
