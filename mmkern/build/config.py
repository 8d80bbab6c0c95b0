"""What a build of mmkern._C compiles and how: the sources, the CUDA toolkit and architectures, the CPU
ISA, the compiler flags, and `configuration()`, everything a build depends on (its hash decides whether
a build is stale, mmkern/build/stamp.py).

- csrc/**/*.cpp always: the C++ CPU kernels and the op schemas (namespace mmkern_C);
- csrc/**/*.cu when nvcc and a CUDA build of torch are present (MMKERN_BUILD_CUDA=0 turns this off),
  for the architectures in MMKERN_CUDA_ARCHS (default "80;90"), with `-Xptxas -v`;
- MMKERN_BUILD_FAMILIES ("common,norm") restricts the csrc/ folders, MMKERN_CPU_ISA=default the ISA.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from mmkern.build.paths import CSRC_DIR

DEFAULT_ARCHS = "80;90"


def families() -> list[str] | None:
    """csrc/ folders to compile: $MMKERN_BUILD_FAMILIES ("common,norm"; common/ is always in), else all (None).
    For quick iteration on one op family; a normal build takes every folder."""
    raw = os.environ.get("MMKERN_BUILD_FAMILIES", "").strip()
    if not raw:
        return None
    return sorted({"common", *(f.strip() for f in re.split(r"[;, ]+", raw) if f.strip())})


def sources() -> tuple[list[Path], list[Path], list[Path]]:
    """(cpp, cu, headers) under csrc/, sorted (the order is part of the source hash)."""
    chosen = families()

    def glob(*patterns):
        return sorted({p for pattern in patterns for p in CSRC_DIR.glob(pattern) if p.is_file()
                       and (chosen is None or p.relative_to(CSRC_DIR).parts[0] in chosen)})

    return glob("**/*.cpp"), glob("**/*.cu"), glob("**/*.h", "**/*.cuh")


def cuda_archs() -> list[str]:
    """MMKERN_CUDA_ARCHS ("80;90", "8.0 9.0", "sm_80,sm_90") -> ["80", "90"]."""
    raw = os.environ.get("MMKERN_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().lower().removeprefix("sm_").replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d{2,3}[a-z]?", a):
            raise ValueError(f"MMKERN_CUDA_ARCHS: cannot read architecture {a!r} in {raw!r} (want e.g. \"80;90\")")
    return archs


def _has_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").exists() and any(
        any((home / lib).glob("libcudart.so*")) for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))


def cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH, else the toolkit of the `nvcc` on PATH, else /usr/local/cuda.
    (A wrapper script as nvcc, e.g. /usr/local/bin/nvcc, would make torch guess /usr/local: the toolkit is the
    directory that holds both bin/nvcc and the CUDA runtime library.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    return next((home for home in candidates if _has_toolkit(home)), None)


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels will not be compiled, or None when they will."""
    import torch

    if os.environ.get("MMKERN_BUILD_CUDA", "1") == "0":
        return CPU_ONLY_REASON
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if cuda_home() is None:
        return "no CUDA toolkit (nvcc and the CUDA runtime library) found; set CUDA_HOME"
    return None


def cpu_isa() -> str:
    """The x86 vector ISA the C++ CPU kernels are compiled for: "avx2" when this machine has AVX2 and FMA
    (at::vec then uses its AVX2 implementation, as torch's own kernels do), else "default" (portable).
    $MMKERN_CPU_ISA=default forces the portable build. The stamp records it: a build for AVX2 is stale
    on a machine without."""
    wanted = os.environ.get("MMKERN_CPU_ISA", "auto")
    if wanted == "default":
        return "default"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "default"
    cpu_flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    return "avx2" if {"avx2", "fma", "f16c"} <= cpu_flags else "default"


def flags(with_cuda: bool) -> dict[str, list[str]]:
    """The compiler flags: {"cxx": [...]} and, with_cuda, {"nvcc": [...]} (one -gencode per architecture)."""
    # -fopenmp: at::parallel_for is an inline template that runs in parallel only where _OPENMP is defined
    # (torch's CPU backend is OpenMP); without it the C++ CPU kernels would run on one thread.
    cxx = ["-O3", "-fvisibility=hidden"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])
    if cpu_isa() == "avx2":
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    result = {"cxx": cxx}
    if with_cuda:
        gencode = []
        for a in cuda_archs():
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        result["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v", "-lineinfo", *gencode]
    return result


CPU_ONLY_REASON = "MMKERN_BUILD_CUDA=0"


def configuration(cpu_only: bool = False) -> dict:
    """Everything a build depends on; its hash decides whether a build is stale. cpu_only: the configuration of
    a build asked for without CUDA (`mmkern build --cpu-only`), whatever this machine has."""
    import torch

    cpp, cu, headers = sources()
    reason = CPU_ONLY_REASON if cpu_only else cuda_unavailable_reason()
    with_cuda = reason is None and bool(cu)
    digest = hashlib.sha256()
    for path in [*cpp, *cu, *headers]:
        digest.update(str(path.relative_to(CSRC_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    config = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
        "with_cuda": with_cuda,
        "cuda_archs": cuda_archs() if with_cuda else [],
        "no_cuda_reason": None if with_cuda else (reason or "no .cu sources"),
        "families": families(),
        "cpu_isa": cpu_isa(),
        "flags": flags(with_cuda),
    }
    digest.update(json.dumps(config, sort_keys=True).encode())
    config["source_hash"] = digest.hexdigest()
    return config


def extension(config: dict | None = None):
    """The setuptools Extension (a CUDAExtension when CUDA kernels are compiled)."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    config = config or configuration()
    cpp, cu, _ = sources()
    files = [str(p) for p in cpp] + ([str(p) for p in cu] if config["with_cuda"] else [])
    kind = CUDAExtension if config["with_cuda"] else CppExtension
    link = ["-fopenmp"] if "-fopenmp" in config["flags"]["cxx"] else []
    return kind("mmkern._C", files, include_dirs=[str(CSRC_DIR)], extra_compile_args=config["flags"],
                extra_link_args=link)
