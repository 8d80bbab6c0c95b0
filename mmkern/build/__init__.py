"""Build the compiled extension mmkern._C from csrc/ (`mmkern build`, `python setup.py build_ext`).

One concept per module:
    paths.py     where the extension is built to and looked for (build_dir, candidate_dirs, so_name)
    config.py    what is compiled and how: sources, CUDA toolkit and architectures, CPU ISA, flags,
                 configuration() (everything a build depends on) and the setuptools Extension
    stamp.py     the stamp _C.build.json and whether a build is current here (read_stamp, stale_reason)
    ptxas.py     the `-Xptxas -v` report in a build log (registers, spills per kernel and arch)
    fatbin.py    the SASS / PTX a built library carries (embedded_cuda_code)
    compiler.py  build() and ensure_built()
    command.py   the `mmkern build` command (add_arguments, main)
Every name is also importable from here (`from mmkern import build; build.ensure_built()`).

What is compiled:
- csrc/**/*.cpp always: the C++ CPU kernels and the op schemas (namespace mmkern_C);
- csrc/**/*.cu when nvcc and a CUDA build of torch are present (MMKERN_BUILD_CUDA=0 turns this off),
  for the architectures in MMKERN_CUDA_ARCHS (default "80;90"), with `-Xptxas -v`.

torch.utils.cpp_extension.BuildExtension does the compiling with ninja (incremental: a second build
only recompiles changed files), MAX_JOBS in parallel (default: every core). The result is cached
where the package looks for it (see `build_dir`):
    _C<python suffix>.so   the extension (import name mmkern._C; loading it registers torch.ops.mmkern_C.*)
    _C.build.json          stamp: torch version, CUDA archs, source hash, the ptxas report (per kernel and arch:
                           registers, spill stores/loads)
    _C.build.log           the whole compiler output
A stamp that no longer matches (other torch, changed sources or flags) makes the build stale:
`mmkern.native` then refuses it with a reason (`mmkern info` shows it) and `ensure_built()` rebuilds.

This package imports nothing heavy at import time: `import mmkern` reads the stamp through it
(mmkern.native imports paths.py and stamp.py; nothing here imports mmkern.native at import time).
"""
from __future__ import annotations

from mmkern.build.paths import (CSRC_DIR, LOG_NAME, PACKAGE_DIR, REPO_DIR, STAMP_NAME, build_dir,  # noqa: F401
                                cache_dir, candidate_dirs, so_name)
from mmkern.build.config import (DEFAULT_ARCHS, configuration, cpu_isa, cuda_archs, cuda_home,  # noqa: F401
                                 cuda_unavailable_reason, extension, families, flags, sources)
from mmkern.build.stamp import read_stamp, stale_reason  # noqa: F401
from mmkern.build.ptxas import (NVCC_COMMAND, PTXAS_ENTRY, PTXAS_REGS, PTXAS_SPILLS,  # noqa: F401
                                compiled_cu_files, parse_ptxas)
from mmkern.build.fatbin import FATBIN_MAGIC, embedded_cuda_code  # noqa: F401
from mmkern.build.compiler import build, ensure_built  # noqa: F401
from mmkern.build.command import add_arguments, main  # noqa: F401
