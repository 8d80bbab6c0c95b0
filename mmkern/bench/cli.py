"""`mmkern bench`: a quick selection timed on this machine, printed as a table.

    mmkern bench                          attention (forward, forward+backward), residual + LayerNorm, add_noise
    mmkern bench --only attention --json out.json      and write pytest-benchmark-style JSON for `mmkern report`

Each case runs mmkern's usable backends beside what a user would otherwise call (torch SDPA with each
of its backends, the eager code, a plain device copy as the roof for memory-bound ops), on the same
fresh random inputs, timed in device time after a warm-up (mmkern.bench.timing), with rates and
fractions of this device's measured ceilings. Sizes: a GPU-sized case on a GPU, a small one on a CPU.
The full comparison (more sizes, dtypes, torch.compile, flash-attn, xformers, Liger, apex) is the
pytest-benchmark suite in the repository's benchmarks/ folder.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import mmkern
from mmkern.bench import attention as A
from mmkern.bench.ceilings import device_name, measure_ceilings
from mmkern.bench.counts import attention_bytes, attention_flops, rates
from mmkern.bench.timing import median, time_function

FAMILIES = ("attention", "norm", "diffusion")


@dataclass
class Case:
    group: str
    impl: str
    make: Callable[[], tuple[Callable, tuple]]     # -> (fn, args); raises A.Unavailable or fails to run
    flops: float = 0.0
    bytes: float = 0.0
    info: dict = field(default_factory=dict)


def _mmkern_backends(op: str) -> list[str]:
    return [b for b in mmkern.available_backends() if b != "reference" and op in mmkern.dispatch.backends()[b].kernels]


def attention_cases(device: str) -> list[Case]:
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    b, h, l, d = (4, 16, 4096, 128) if on_gpu else (1, 2, 128, 64)
    impls = [f"mmkern_{x}" for x in _mmkern_backends("attention_forward")] + list(A.SDPA_BACKENDS) + ["torch_eager"]
    cases = []
    for pass_ in ("fwd", "fwd+bwd"):
        group = f"attention {pass_} causal {str(dtype)[6:]} B{b} H{h} L{l} D{d}"
        for name in impls:
            def make(name=name, pass_=pass_):
                impl = A.make_impl(name)
                q, k, v = A.random_qkv(impl, b, h, l, l, d, dtype, device, requires_grad=pass_ != "fwd")
                if pass_ == "fwd":
                    def fn(q, k, v):
                        with torch.no_grad():
                            return impl.fn(q, k, v, True)
                else:
                    dout = torch.randn_like(impl.fn(q, k, v, True))

                    def fn(q, k, v):
                        return torch.autograd.grad(impl.fn(q, k, v, True), (q, k, v), dout)
                return fn, (q, k, v)
            cases.append(Case(group, name, make, attention_flops(b, h, l, l, d, True, pass_),
                              attention_bytes(b, h, l, l, d, torch.finfo(dtype).bits // 8, pass_=pass_),
                              dict(op="attention", series=f"attention {pass_} causal", x=l, x_label="sequence length")))
    return cases


def norm_cases(device: str) -> list[Case]:
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows, n = (16384, 4096) if on_gpu else (256, 1024)
    group = f"layer_norm_residual forward {str(dtype)[6:]} {rows}x{n}"
    size = rows * n * torch.finfo(dtype).bits // 8

    def inputs():
        return [torch.randn(rows, n, device=device, dtype=dtype) for _ in range(2)] + \
               [torch.randn(n, device=device, dtype=dtype) for _ in range(2)]

    def mmkern_fn(backend):
        def fn(x, r, w, bias):
            with mmkern.backend(backend):
                return mmkern.layer_norm_residual(x, r, w, bias, prenorm=True)
        return fn

    def eager(x, r, w, bias):
        pre = x + r
        return F.layer_norm(pre, (n,), w, bias), pre

    info = dict(op="layer_norm_residual", series="layer_norm_residual forward", x=n, x_label="hidden size")
    cases = [Case(group, "device_copy", lambda: (torch.Tensor.clone, (inputs()[0],)), 0, 2 * size, info)]
    for backend in _mmkern_backends("norm_residual_forward"):
        cases.append(Case(group, f"mmkern_{backend}", lambda b=backend: (mmkern_fn(b), tuple(inputs())), 0, 4 * size,
                          info))
    cases.append(Case(group, "torch_eager", lambda: (eager, tuple(inputs())), 0, 4 * size, info))
    return cases


def diffusion_cases(device: str) -> list[Case]:
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = (16, 16, 256, 256) if on_gpu else (2, 4, 32, 32)
    group = f"add_noise {str(dtype)[6:]} {'x'.join(map(str, shape))}"
    ac = mmkern.diffusion.NoiseSchedule().alphas_cumprod.float().to(device)
    size = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8

    def inputs():
        return (torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype),
                torch.randint(0, len(ac), (shape[0],), device=device))

    def eager(x0, noise, t):
        a = ac.to(x0.dtype)[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def mmkern_fn(backend):
        def fn(x0, noise, t):
            with mmkern.backend(backend):
                return mmkern.diffusion.add_noise(x0, noise, t, ac)
        return fn

    info = dict(op="add_noise", series="add_noise", x=torch.Size(shape).numel(), x_label="elements")
    cases = [Case(group, "device_copy", lambda: (torch.Tensor.clone, (inputs()[0],)), 0, 2 * size, info)]
    for backend in _mmkern_backends("add_noise"):
        cases.append(Case(group, f"mmkern_{backend}", lambda b=backend: (mmkern_fn(b), inputs()), 0, 3 * size, info))
    cases.append(Case(group, "torch_eager", lambda: (eager, inputs()), 0, 3 * size, info))
    return cases


def run_cases(cases: list[Case], device: str, max_time: float) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """(pytest-benchmark-style result dicts, (group, impl, reason) of each case that could not run)."""
    ceilings = measure_ceilings(device)
    results, skipped = [], []
    for case in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn, args = case.make()
                times = time_function(fn, args, device, max_time=max_time, flush_l2=not case.flops)
        except A.Unavailable as exc:
            skipped.append((case.group, case.impl, str(exc)))
            continue
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            skipped.append((case.group, case.impl, str(exc).strip().splitlines()[0][:160]))
            continue
        t = median(times)
        info = dict(case.info, impl=case.impl, device=ceilings.device, **rates(t, case.flops, case.bytes, ceilings))
        results.append(dict(group=case.group, name=f"{case.group} [{case.impl}]", fullname=f"mmkern bench::{case.group}"
                            f"::{case.impl}", params={"impl": case.impl}, extra_info=info,
                            stats=dict(median=t, min=min(times), max=max(times), mean=sum(times) / len(times),
                                       rounds=len(times), data=times)))
    return results, skipped


def machine_info(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"unavailable ({exc.__class__.__name__})"
    return {"mmkern": {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                       "triton": triton_version, "mmkern": mmkern.__version__, "python": platform.python_version(),
                       "backends": mmkern.available_backends(), "sizes": "mmkern bench",
                       "ceilings": measure_ceilings(device).as_dict()}}


def table(results: list[dict], skipped: list[tuple[str, str, str]]) -> str:
    lines = [f"{'group':<52} {'implementation':<16} {'median':>11} {'TFLOP/s':>9} {'GB/s':>9} {'% roof':>7}"]
    for r in results:
        info = r["extra_info"]
        frac = info.get("fraction_of_matmul") if "TFLOP/s" in info and info.get("op") == "attention" \
            else info.get("fraction_of_copy")
        lines.append(f"{r['group']:<52} {r['params']['impl']:<16} {r['stats']['median'] * 1e3:>8.4f} ms "
                     f"{info.get('TFLOP/s', ''):>9} {info.get('GB/s', ''):>9} "
                     f"{'' if frac is None else f'{100 * frac:.1f}':>7}")
    for group, impl, reason in skipped:
        lines.append(f"{group:<52} {impl:<16} skipped: {reason}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=FAMILIES, action="append", help="run only this op family (repeatable)")
    parser.add_argument("--max-time", type=float, default=0.3, help="seconds of timed rounds per case (default 0.3)")
    parser.add_argument("--json", help="also write the results as pytest-benchmark-style JSON (for `mmkern report`)")


def main(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    builders = {"attention": attention_cases, "norm": norm_cases, "diffusion": diffusion_cases}
    cases = [c for family in (args.only or FAMILIES) for c in builders[family](device)]
    results, skipped = run_cases(cases, device, args.max_time)
    info = machine_info(device)
    c = info["mmkern"]["ceilings"]
    print(f"{c['device']}: copy {c['copy_gbps']:.4g} GB/s, {c['matmul_dtype']} matmul {c['matmul_tflops']:.4g} TFLOP/s "
          f"(measured now); mmkern backends usable: {', '.join(info['mmkern']['backends'])}")
    print(table(results, skipped))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine_info": info, "commit_info": {}, "benchmarks": results,
                       "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "version": mmkern.__version__}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0 if results else 1
