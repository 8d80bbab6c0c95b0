"""The `mmkern` command.

    mmkern info          versions, device, and which backends are usable here and why
    mmkern verify        every op on every usable backend against the float64 reference

Further subcommands live in their own modules (COMMANDS below), imported only when asked for:
each module defines `add_arguments(parser)` and `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
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


# subcommand -> (module defining add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "build": ("mmkern.build.command", "compile the C++/CUDA extension mmkern._C (CPU kernels always, CUDA ones when possible)"),
    "bench": ("mmkern.bench.cli", "run a quick benchmark selection and print a table"),
    "report": ("mmkern.bench.report", "turn saved pytest-benchmark JSON into a Markdown table and PNG plots"),
    "aot-report": ("mmkern.triton.aot_report", "per Triton kernel configuration: shared memory, registers, spills, wgmma"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkern", description="mmkern: fused attention, norm and diffusion ops")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends are usable here and why")
    verify = sub.add_parser("verify", help="run every op on every usable backend against the float64 reference")
    verify.add_argument("--backend", action="append", help="verify only this backend (repeatable)")
    verify.add_argument("--json", action="store_true", help="print the rows as JSON")
    argv = sys.argv[1:] if argv is None else argv
    # Only the module of the subcommand asked for is imported (they pull in heavy optional packages).
    asked = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name == asked:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "verify":
        from mmkern import verify as verify_module
        return verify_module.main(args.backend, args.json)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
