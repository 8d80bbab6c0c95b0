"""`mmkern build`: compile mmkern._C (mmkern/build/compiler.py), then check that it loads and list its ops."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mmkern.build.compiler import build
from mmkern.build.paths import CSRC_DIR, build_dir, so_name
from mmkern.build.stamp import read_stamp, stale_reason


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
    if args.if_stale and (directory / so_name()).exists() and \
            stale_reason(read_stamp(directory), accept_cpu_only=args.cpu_only) is None:
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
