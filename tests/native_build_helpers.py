"""Helpers for tests that look inside the compiled extension mmkern._C: the SASS of its CUDA kernels.

The build fixtures (`extension`, `stamp`) live in tests/test_native_build.py; import them from there.
SASS is read with `cuobjdump -sass` (which runs `nvdisasm`). A minimal CUDA toolkit (nvcc only, as on
the CI machine) has neither; the pip wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm ship both
(in site-packages/nvidia/cu13/bin), and are looked for there too.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

CUOBJDUMP_HINT = ("cuobjdump/nvdisasm not found (a minimal CUDA toolkit lacks them): "
                  "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def _tool_dirs() -> list[Path]:
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "bin")
    try:
        import nvidia      # namespace package of NVIDIA's pip wheels
        for root in nvidia.__path__:
            dirs += sorted(Path(root).glob("cu*/bin")) + sorted(Path(root).glob("cuda_*/bin"))
    except ImportError:
        pass
    return dirs + [Path("/usr/local/cuda/bin")]


def cuobjdump() -> tuple[str, dict] | None:
    """(cuobjdump path, environment whose PATH holds nvdisasm), or None when either is missing."""
    found = {}
    for tool in ("cuobjdump", "nvdisasm"):
        path = shutil.which(tool) or next((str(d / tool) for d in _tool_dirs() if (d / tool).is_file()), None)
        if path is None:
            return None
        found[tool] = path
    env = dict(os.environ, PATH=str(Path(found["nvdisasm"]).parent) + os.pathsep + os.environ.get("PATH", ""))
    return found["cuobjdump"], env


@functools.lru_cache(maxsize=None)
def kernel_sass(so_path: str, arch: str) -> dict[str, str]:
    """{mangled kernel name: its SASS text} for one architecture ("sm_90") of a shared library."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError(CUOBJDUMP_HINT)
    exe, env = tool
    text = subprocess.run([exe, "-sass", "-arch", arch, so_path], env=env, capture_output=True, text=True,
                          check=True).stdout
    kernels: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            kernels[name] = ""
        elif name is not None:
            kernels[name] += line + "\n"
    return kernels
