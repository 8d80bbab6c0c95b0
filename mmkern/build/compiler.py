"""Compiling mmkern._C: `build()` runs torch.utils.cpp_extension.BuildExtension (ninja, incremental: a
second build only recompiles changed files; MAX_JOBS in parallel, default every core) in a child process,
shows and logs its output, installs the .so atomically and writes the stamp with the ptxas report;
`ensure_built()` builds when the build is missing or stale, then loads it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mmkern.build.config import configuration, cuda_home, extension, sources
from mmkern.build.paths import LOG_NAME, REPO_DIR, STAMP_NAME, build_dir, so_name
from mmkern.build.ptxas import compiled_cu_files, parse_ptxas
from mmkern.build.stamp import read_stamp, stale_reason


def _run_build_ext(out_dir: Path, temp_dir: Path, config: dict) -> None:
    """Compile and link into out_dir (in this process; ninja prints every compiler command and output)."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension

    if config["with_cuda"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[0]}.{a[1:]}" for a in config["cuda_archs"])
    dist = Distribution({"name": "mmkern-extension", "ext_modules": [extension(config)],
                         "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}})
    command = dist.get_command_obj("build_ext")
    command.build_lib = str(out_dir)
    command.build_temp = str(temp_dir)
    command.inplace = False
    command.ensure_finalized()
    command.run()


def build(directory: Path | None = None, *, quiet: bool = False, jobs: int | None = None) -> Path:
    """Build the extension into `directory` (default build_dir()); returns the .so path.

    The compiler runs in a child process whose output is shown (unless quiet) and written to
    _C.build.log; the ptxas report goes into the stamp. Raises RuntimeError when the build fails."""
    directory = Path(directory or build_dir())
    directory.mkdir(parents=True, exist_ok=True)
    config = configuration()
    staging = directory / "_C.build"         # ninja's incremental state and the link output
    env = dict(os.environ, MAX_JOBS=str(jobs or os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    if config["with_cuda"]:
        env["CUDA_HOME"] = str(cuda_home())     # read by torch.utils.cpp_extension at import, in the child
    code = ("import sys, json; from pathlib import Path; from mmkern.build.compiler import _run_build_ext; "
            "_run_build_ext(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))")
    started = time.perf_counter()
    what = "CPU + CUDA (" + ", ".join(f"sm_{a}" for a in config["cuda_archs"]) + ")" if config["with_cuda"] \
        else f"CPU only ({config['no_cuda_reason']})"
    header = f"mmkern build: compiling mmkern._C, {what}, MAX_JOBS={env['MAX_JOBS']}, into {directory}\n"
    log_lines = [header]
    if not quiet:
        print(header, end="", flush=True)
    process = subprocess.Popen([sys.executable, "-c", code, str(staging / "lib"), str(staging / "temp"),
                                json.dumps(config)], cwd=str(REPO_DIR), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in process.stdout:
        log_lines.append(line)
        if not quiet:
            print(line, end="", flush=True)
    rc = process.wait()
    seconds = time.perf_counter() - started
    log = "".join(log_lines)
    (directory / LOG_NAME).write_text(log)
    if rc != 0:
        tail = "".join(log_lines[-40:])
        raise RuntimeError(f"mmkern build failed (exit {rc}); the full log is {directory / LOG_NAME}:\n{tail}")
    built = staging / "lib" / "mmkern" / so_name()
    target = directory / so_name()
    # replace atomically: a process that already loaded the old file keeps its mapping
    tmp = directory / (so_name() + ".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, target)
    # ptxas reports of .cu files this (incremental) build did not recompile come from the previous stamp
    ptxas = parse_ptxas(log)
    previous = read_stamp(directory) or {}
    recompiled = compiled_cu_files(log)
    current_cu = {str(p) for p in sources()[1]} if config["with_cuda"] else set()
    ptxas = [r for r in previous.get("ptxas", []) if r.get("source") in current_cu - recompiled
             and previous.get("cuda_archs") == config["cuda_archs"]] + ptxas
    stamp = dict(config, build_seconds=round(seconds, 1), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 ptxas=ptxas)
    (directory / STAMP_NAME).write_text(json.dumps(stamp, indent=1))
    if not quiet:
        spills = [r for r in ptxas if r["spill_stores"] or r["spill_loads"]]
        print(f"mmkern build: done in {seconds:.0f} s -> {target}; ptxas: {len(ptxas)} kernel builds, "
              f"{len(spills)} with register spills", flush=True)
    return target


def ensure_built(*, quiet: bool = True):
    """Build if missing or stale, then load; returns the loaded module mmkern._C (for tests)."""
    from mmkern import native

    directory = build_dir()
    for _ in range(3):      # sources edited during a build leave it stale: build again (ninja: only what changed)
        if (directory / so_name()).exists() and stale_reason(read_stamp(directory), accept_cpu_only=False) is None:
            break
        build(directory, quiet=quiet)
    native.reset()
    return native.load()
