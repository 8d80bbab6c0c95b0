"""Where the compiled extension mmkern._C is built to and looked for.

    _C<python suffix>.so   the extension (import name mmkern._C)
    _C.build.json          its stamp (mmkern/build/stamp.py)
    _C.build.log           the whole compiler output
in build_dir(): $MMKERN_BUILD_DIR, else the package directory when writable (a checkout, a user install),
else a per-user, per-torch, per-python cache directory. Imports nothing heavy (torch only inside cache_dir).
"""
from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent      # mmkern/
REPO_DIR = PACKAGE_DIR.parent
CSRC_DIR = REPO_DIR / "csrc"
STAMP_NAME = "_C.build.json"
LOG_NAME = "_C.build.log"


def so_name() -> str:
    """The extension's file name: "_C" + this Python's extension suffix (e.g. _C.cpython-311-x86_64-linux-gnu.so)."""
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
