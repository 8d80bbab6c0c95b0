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

from mmkern.triton._common import kernel_options

# Largest shared memory one block may use (opt-in), in bytes, per compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCHS = (80, 90)
MODULES = ("diffusion", "diffusion_loss", "diffusion_samplers", "norm", "rotary", "attention_aot")


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
    # from `ptxas -v` on the PTX (compile_config(..., resources=True) only; None otherwise)
    registers: int | None = None
    spill_stores: int | None = None    # bytes
    spill_loads: int | None = None     # bytes
    stack: int | None = None           # bytes of stack frame (local memory)

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared <= SHARED_MEMORY_LIMIT[self.arch]


def ptxas_path(arch: int) -> str:
    """The ptxas Triton compiles with (its own copy, else one on PATH)."""
    import shutil

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(arch)
        except TypeError:              # older Triton: get_ptxas() takes no architecture
            tool = get_ptxas()
        path = getattr(tool, "path", tool)
        if path and os.path.exists(str(path)):
            return str(path)
    except Exception:
        pass
    return shutil.which("ptxas") or "ptxas"


def ptxas_resources(ptx: str, arch: int) -> dict:
    """registers, spill_stores, spill_loads, stack of the kernel in `ptx`, read off `ptxas -v`."""
    import re
    import subprocess
    import tempfile

    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    arch_name = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        # the flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py make_cubin); Triton
        # >= 3.8 adds --regAllocOptLevel=2 against a ptxas 13 register-allocation bug, older ptxas lack it
        for extra in (["--regAllocOptLevel=2"], []):
            proc = subprocess.run([ptxas_path(arch), "-lineinfo", "-v", *extra, f"--gpu-name={arch_name}", src,
                                   "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode == 0:
                break
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")

    def number(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack=number(r"(\d+) bytes stack frame"))


def compile_config(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                   resources: bool = False) -> Compiled:
    """Compile one configuration for `arch`; with resources=True also run `ptxas -v` on its PTX
    (registers, spills, stack frame), which Triton keeps only after loading on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    constants = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    dtype = next((t for t in signature.values() if t.startswith("*")), "")
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages, **kernel_options(fn)})
    except Exception as exc:  # report every failing configuration, not just the first
        return Compiled(fn.__name__, arch, constexprs, num_warps, num_stages, 0, f"{type(exc).__name__}: {exc}", dtype)
    ptx = compiled.asm.get("ptx", "")
    result = Compiled(fn.__name__, arch, constexprs, num_warps, num_stages, compiled.metadata.shared, None, dtype,
                      "wgmma" in ptx, "mma.sync" in ptx)
    if resources:
        try:
            for key, value in ptxas_resources(ptx, arch).items():
                setattr(result, key, value)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
    return result


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
