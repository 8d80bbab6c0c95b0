"""Ahead-of-time compile of every dispatchable Triton kernel configuration, without a GPU.

    python -m mmkern.triton.aot            # compile for sm_80 and sm_90, report, exit 1 on any failure

Each kernel module of this package exposes `aot_configs()`, yielding
(jit_function, signature, constexprs, num_warps, num_stages) for every configuration the
dispatcher can launch. The Triton interpreter forgives what the compiler rejects (layouts,
shared memory, unsupported ops), so every configuration is also compiled for real here, and its
shared memory checked against the architecture's limit. Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

# Largest shared memory one block may use (opt-in), in bytes, per compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCHS = (80, 90)
MODULES = ("diffusion", "diffusion_loss", "diffusion_samplers", "norm")


@dataclass
class Compiled:
    kernel: str
    arch: int
    constexprs: dict
    num_warps: int
    num_stages: int
    shared: int
    error: str | None
    ptx: str = ""

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
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # report every failing configuration, not just the first
        return Compiled(fn.__name__, arch, constexprs, num_warps, num_stages, 0, f"{type(exc).__name__}: {exc}")
    return Compiled(fn.__name__, arch, constexprs, num_warps, num_stages, compiled.metadata.shared, None,
                    compiled.asm.get("ptx", ""))


def all_configs():
    for module in MODULES:
        yield from importlib.import_module(f"mmkern.triton.{module}").aot_configs()


def compile_all(archs=ARCHS) -> list[Compiled]:
    return [compile_config(fn, sig, const, warps, stages, arch)
            for fn, sig, const, warps, stages in all_configs() for arch in archs]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("mmkern.triton.aot: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    results = compile_all()
    for r in results:
        state = "ok" if r.ok else ("FAIL " + (r.error or f"shared memory {r.shared} > {SHARED_MEMORY_LIMIT[r.arch]}"))
        print(f"sm_{r.arch} {r.kernel} warps={r.num_warps} stages={r.num_stages} {r.constexprs} "
              f"shared={r.shared} {state}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
