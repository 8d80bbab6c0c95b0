"""Packaging hook for the compiled extension mmkern._C.

`pip install .` / `pip install -e .` compile nothing (the metadata is in pyproject.toml): the
extension is built on request, by `mmkern build` or, in a checkout,

    python setup.py build_ext --inplace

which compiles csrc/ with the same settings as `mmkern build` (mmkern/build/: CPU kernels
always, CUDA kernels for MMKERN_CUDA_ARCHS when nvcc and a CUDA build of torch are present,
MMKERN_BUILD_CUDA=0 to skip them) into mmkern/, where `import mmkern` finds it.
"""
import sys
from pathlib import Path

from setuptools import setup

if "build_ext" in sys.argv[1:]:
    from setuptools.command.build_ext import build_ext

    class BuildMmkernExtension(build_ext):
        """Delegates to mmkern.build (ninja, MAX_JOBS, build log, ptxas report, stamp)."""

        def run(self):
            sys.path.insert(0, ".")
            from mmkern import build

            directory = None if self.inplace else Path(self.build_lib) / "mmkern"
            build.build(directory)

    setup(cmdclass={"build_ext": BuildMmkernExtension})
else:
    setup()
