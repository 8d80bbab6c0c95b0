"""The `mmkern` command: `mmkern info` (what is here and usable) and `mmkern verify` (parity table)."""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> int:
    import torch

    import mmkern
    from mmkern import dispatch
    from mmkern.backends import TRITON_INTERPRET

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # not installed, or broken
        triton_version = f"unavailable ({exc.__class__.__name__}: {exc})"
    lines = [
        f"mmkern {mmkern.__version__}",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton {triton_version}" + (" (TRITON_INTERPRET=1: kernels run on the CPU)" if TRITON_INTERPRET else ""),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("device: no CUDA GPU (CPU only)")
    lines.append(f"backend selection: {dispatch.forced_backend()} (priority {' > '.join(dispatch.PRIORITY)})")
    lines.append("backends:")
    for name, b in dispatch.backends().items():
        reasons = b.environment_reasons()
        if reasons:
            state = "unavailable: " + "; ".join(reasons)
        elif not b.kernels:
            state = "no kernels yet"
        else:
            state = "usable"
        lines.append(f"  {name:<10} {state}")
        lines.append(f"  {'':<10} {b.description}")
        if b.kernels:
            lines.append(f"  {'':<10} ops: {', '.join(sorted(b.kernels))}")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkern", description="mmkern: fused attention, norm and diffusion ops")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends are usable here and why")
    verify = sub.add_parser("verify", help="run every op on every usable backend against the float64 reference")
    verify.add_argument("--backend", action="append", help="verify only this backend (repeatable)")
    verify.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    from mmkern import verify as verify_module
    return verify_module.main(args.backend, args.json)


if __name__ == "__main__":
    sys.exit(main())
