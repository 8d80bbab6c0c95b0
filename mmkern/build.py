"""Build the compiled extension mmkern._C from csrc/ (`mmkern build`, `python setup.py build_ext`).

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

This module imports nothing heavy at import time: `import mmkern` reads the stamp through it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
CSRC_DIR = REPO_DIR / "csrc"
STAMP_NAME = "_C.build.json"
LOG_NAME = "_C.build.log"
DEFAULT_ARCHS = "80;90"


def so_name() -> str:
    return "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def cache_dir() -> Path:
    """Per-user, per-torch, per-python cache for installs whose package directory is read-only."""
    import torch

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmkern"
    tag = f"torch{torch.__version__}-cu{torch.version.cuda or 'none'}-{sys.implementation.cache_tag}"
    return root / re.sub(r"[^A-Za-z0-9_.+-]", "_", tag)


def build_dir() -> Path:
    """Where the extension is built to and looked for: $MMKERN_BUILD_DIR, else the package directory
    when writable (a checkout or a user install), else cache_dir()."""
    override = os.environ.get("MMKERN_BUILD_DIR")
    if override:
        return Path(override)
    return PACKAGE_DIR if _writable(PACKAGE_DIR) else cache_dir()


def candidate_dirs() -> list[Path]:
    """Places a built extension may lie, most specific first."""
    override = os.environ.get("MMKERN_BUILD_DIR")
    if override:
        return [Path(override)]
    dirs = [PACKAGE_DIR]
    try:
        dirs.append(cache_dir())
    except Exception:  # no home directory: only the package dir
        pass
    return dirs


# --------------------------------------------------------------------------- configuration

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
        return "MMKERN_BUILD_CUDA=0"
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


def configuration() -> dict:
    """Everything a build depends on; its hash decides whether a build is stale."""
    import torch

    cpp, cu, headers = sources()
    reason = cuda_unavailable_reason()
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


# --------------------------------------------------------------------------- stamp and ptxas report

PTXAS_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"ptxas info\s*: Used (\d+) registers")


NVCC_COMMAND = re.compile(r"^\[\d+/\d+\] .*nvcc.* -c (\S+\.cu) ")


def compiled_cu_files(log: str) -> set[str]:
    """The .cu files ninja compiled in this build (an incremental build recompiles only what changed)."""
    return {m.group(1) for m in map(NVCC_COMMAND.search, log.splitlines()) if m}


def parse_ptxas(log: str) -> list[dict]:
    """One record per (kernel, arch) from `-Xptxas -v` output: registers, stack, spill stores/loads, and the
    .cu file it came from (the ninja command line printed before the compiler's output)."""
    records: list[dict] = []
    current = None
    source = None
    for line in log.splitlines():
        m = NVCC_COMMAND.search(line)
        if m:
            source = m.group(1)
            continue
        m = PTXAS_ENTRY.search(line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0}
            if source is not None:
                current["source"] = source
            records.append(current)
            continue
        if current is None:
            continue
        m = PTXAS_SPILLS.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = PTXAS_REGS.search(line)
        if m:
            current["registers"] = int(m.group(1))
    return records


FATBIN_MAGIC = 0xBA55ED50


def embedded_cuda_code(path: Path) -> list[tuple[str, int]]:
    """("sass" | "ptx", sm) for every code object in the CUDA fat binaries of a shared library: what
    `cuobjdump --list-elf/--list-ptx` lists, read from the fatbin headers (no CUDA tools needed).
    Header layout: magic u32, version u16, header size u16, payload size u64; then entries of
    kind u16 (1 PTX, 2 ELF), u16, header size u32, payload size u64, ..., arch u32 at byte 28."""
    import struct

    data = Path(path).read_bytes()
    magic = struct.pack("<I", FATBIN_MAGIC)
    found, pos = [], 0
    while (start := data.find(magic, pos)) >= 0:
        pos = start + 4
        if start + 16 > len(data):
            break
        _, header_size, payload = struct.unpack_from("<HHQ", data, start + 4)
        entry, end = start + header_size, min(start + header_size + payload, len(data))
        while entry + 32 <= end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
            if entry_header == 0:
                break
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            found.append(({1: "ptx", 2: "sass"}.get(kind, f"kind{kind}"), arch))
            entry += entry_header + size
    return found


def read_stamp(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def stale_reason(stamp: dict | None) -> str | None:
    """Why a build with this stamp must not be used here (None: it is current). Source changes
    count only where the sources are present (a checkout)."""
    if stamp is None:
        return "it has no build stamp (_C.build.json)"
    import torch

    if stamp.get("torch") != torch.__version__:
        return f"it was built for torch {stamp.get('torch')}, this is torch {torch.__version__}"
    if stamp.get("cpu_isa", "default") == "avx2" and cpu_isa() != "avx2":
        return "it was built for CPUs with AVX2 and FMA; this one lacks them (or MMKERN_CPU_ISA=default)"
    if stamp.get("python") != sys.implementation.cache_tag:
        return f"it was built for {stamp.get('python')}, this is {sys.implementation.cache_tag}"
    if CSRC_DIR.is_dir():
        try:
            current = configuration()["source_hash"]
        except Exception as exc:  # unreadable sources: judge by torch alone
            return None if isinstance(exc, OSError) else f"its configuration cannot be computed: {exc}"
        if current != stamp.get("source_hash"):
            return "csrc/ or the build settings changed since it was built"
    return None


# --------------------------------------------------------------------------- building

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
    code = ("import sys, json; from pathlib import Path; from mmkern import build; "
            "build._run_build_ext(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))")
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
        if (directory / so_name()).exists() and stale_reason(read_stamp(directory)) is None:
            break
        build(directory, quiet=quiet)
    native.reset()
    return native.load()


# --------------------------------------------------------------------------- `mmkern build`

def add_arguments(parser) -> None:
    parser.add_argument("--dir", type=Path, default=None,
                        help="build into this directory (default: the package directory when writable, else a "
                             "per-torch cache directory; $MMKERN_BUILD_DIR overrides)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: MAX_JOBS or "
                        "every core)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernels (as MMKERN_BUILD_CUDA=0)")
    parser.add_argument("--if-stale", action="store_true", help="do nothing when the existing build is current")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def main(args) -> int:
    if args.cpu_only:
        os.environ["MMKERN_BUILD_CUDA"] = "0"
    if args.dir is not None:
        os.environ["MMKERN_BUILD_DIR"] = str(args.dir)
    directory = build_dir()
    if args.if_stale and (directory / so_name()).exists() and stale_reason(read_stamp(directory)) is None:
        print(f"mmkern build: {directory / so_name()} is current")
        return 0
    if not CSRC_DIR.is_dir():
        print(f"mmkern build: no sources at {CSRC_DIR}; build from a checkout (pip install -e .)", file=sys.stderr)
        return 1
    try:
        build(directory, quiet=args.quiet, jobs=args.jobs)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    from mmkern import native
    native.reset()
    reasons = native.extension_reasons()
    if reasons:
        print("mmkern build: built, but it does not load: " + "; ".join(reasons), file=sys.stderr)
        return 1
    print("mmkern build: mmkern._C loads; ops: " + ", ".join(native.op_names()))
    return 0
