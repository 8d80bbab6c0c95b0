"""Ahead-of-time compile of every dispatchable Triton kernel configuration, without a GPU.

    python -m mmkern.triton.aot            # compile for sm_80 and sm_90, report, exit 1 on any failure

Each kernel module of this package exposes `aot_configs()`, yielding
(jit_function, signature, constexprs, num_warps, num_stages[, archs]) for every configuration the
dispatcher can launch (archs: the compute capabilities that configuration is for; default ARCHS).
The compiles run in a process pool, one worker per core. The Triton interpreter forgives what the compiler rejects (layouts,
shared memory, unsupported ops), so every configuration is also compiled for real here, and its
shared memory checked against the architecture's limit. Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import importlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# Largest shared memory one block may use (opt-in), in bytes, per compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCHS = (80, 90)
MODULES = ("diffusion", "diffusion_loss", "diffusion_samplers", "norm", "attention")


@dataclass
class Compiled:
    kernel: str
    arch: int
    constexprs: dict
    num_warps: int
    num_stages: int
    shared: int
    error: str | None
    dtype: str = ""
    wgmma: bool = False        # the PTX uses Hopper's warpgroup MMA
    mma: bool = False          # the PTX uses tensor-core mma.sync (sm_80 and up)

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared <= SHARED_MEMORY_LIMIT[self.arch]


def compile_config(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    constants = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    dtype = next((t for t in signature.values() if t.startswith("*")), "")
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # report every failing configuration, not just the first
        return Compiled(fn.__name__, arch, constexprs, num_warps, num_stages, 0, f"{type(exc).__name__}: {exc}", dtype)
    ptx = compiled.asm.get("ptx", "")
    return Compiled(fn.__name__, arch, constexprs, num_warps, num_stages, compiled.metadata.shared, None, dtype,
                    "wgmma" in ptx, "mma.sync" in ptx)


def all_configs() -> list[tuple]:
    """(fn, signature, constexprs, num_warps, num_stages, archs) of every module's configurations."""
    configs = []
    for module in MODULES:
        for config in importlib.import_module(f"mmkern.triton.{module}").aot_configs():
            configs.append(tuple(config) if len(config) == 6 else (*config, ARCHS))
    return configs


def _compile_job(job: tuple[int, int]) -> Compiled:
    index, arch = job
    fn, signature, constexprs, num_warps, num_stages, _ = all_configs()[index]
    return compile_config(fn, signature, constexprs, num_warps, num_stages, arch)


def compile_all() -> list[Compiled]:
    jobs = [(i, arch) for i, config in enumerate(all_configs()) for arch in config[5]]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_compile_job, jobs, chunksize=4))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("mmkern.triton.aot: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    results = compile_all()
    for r in results:
        state = "ok" if r.ok else ("FAIL " + (r.error or f"shared memory {r.shared} > {SHARED_MEMORY_LIMIT[r.arch]}"))
        units = " wgmma" if r.wgmma else (" mma" if r.mma else "")
        print(f"sm_{r.arch} {r.kernel} {r.dtype} warps={r.num_warps} stages={r.num_stages} {r.constexprs} "
              f"shared={r.shared}{units} {state}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
