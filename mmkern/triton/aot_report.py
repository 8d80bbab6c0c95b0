"""`mmkern aot-report`: what each Triton kernel configuration costs on sm_80 and sm_90, without a GPU.

    mmkern aot-report                                   every configuration (slow: ~1500 compiles)
    mmkern aot-report --filter attention_forward --filter bf16 --arch 90 --limit 2
    mmkern aot-report --markdown aot.md --json aot.json

Per configuration (mmkern/triton/aot.py: each module's aot_configs()) and architecture: the shared
memory Triton allots and the architecture's limit, registers per thread, spill stores/loads and stack
frame bytes (from `ptxas -v` on the PTX: Triton's n_regs/n_spills exist only after loading on a GPU),
whether the matrix products lower to Hopper's `wgmma` (sm_90) or `mma.sync`, and whether it fits.
--filter keeps the configurations whose description (kernel, dtype, warps, stages, constexprs) holds
every given substring. Runs the real compiler: TRITON_INTERPRET must be unset.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from mmkern.triton import aot

KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_N_COLS", "BLOCK", "ROWS")   # constexprs shown in the table


def describe(config: tuple) -> str:
    fn, signature, constexprs, num_warps, num_stages, _ = config
    dtype = next((t for t in signature.values() if t.startswith("*")), "")
    return f"{fn.__name__} {dtype} warps={num_warps} stages={num_stages} {constexprs}"


def select(filters: list[str], archs: list[int], limit: int | None) -> list[tuple[int, int]]:
    """(config index, arch) jobs whose description holds every filter, for the asked architectures."""
    jobs = []
    for i, config in enumerate(aot.all_configs()):
        if all(f.lower() in describe(config).lower() for f in filters):
            for arch in config[5]:
                if arch in archs:
                    jobs.append((i, arch))
    return jobs[:limit] if limit else jobs


def _job(job: tuple[int, int]) -> aot.Compiled:
    index, arch = job
    fn, signature, constexprs, num_warps, num_stages, _ = aot.all_configs()[index]
    return aot.compile_config(fn, signature, constexprs, num_warps, num_stages, arch, resources=True)


def run(jobs: list[tuple[int, int]], workers: int) -> list[aot.Compiled]:
    if workers <= 1 or len(jobs) <= 1:
        return [_job(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_job, jobs))


def rows(results: list[aot.Compiled]) -> list[dict]:
    out = []
    for r in results:
        limit = aot.SHARED_MEMORY_LIMIT[r.arch]
        out.append(dict(kernel=r.kernel, dtype=r.dtype.lstrip("*"), arch=f"sm_{r.arch}", num_warps=r.num_warps,
                        num_stages=r.num_stages, tiles={k: v for k, v in r.constexprs.items() if k in KEYS},
                        constexprs=r.constexprs, shared=r.shared, shared_limit=limit, registers=r.registers,
                        spill_stores=r.spill_stores, spill_loads=r.spill_loads, stack=r.stack,
                        matrix_units="wgmma" if r.wgmma else ("mma.sync" if r.mma else "-"),
                        ok=r.ok, error=r.error))
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| kernel | dtype | arch | tiles | warps | stages | shared / limit (B) | regs | spill st/ld (B) | "
             "stack (B) | matrix units | state |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in table:
        tiles = " ".join(f"{k}={v}" for k, v in r["tiles"].items())
        state = "ok" if r["ok"] else ("FAIL: " + (r["error"] or "shared memory over the limit"))[:120]
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {tiles} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['shared']} / {r['shared_limit']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} "
                     f"| {r['stack']} | {r['matrix_units']} | {state} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", action="append", default=[], help="keep configurations whose description holds "
                        "this substring (kernel name, dtype such as bf16, 'warps=8', 'BLOCK_D': 128); repeatable")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(aot.SHARED_MEMORY_LIMIT),
                        help="compute capability to compile for (repeatable; default 80 and 90)")
    parser.add_argument("--limit", type=int, help="at most this many compiles")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", help="write the table as Markdown here")
    parser.add_argument("--list", action="store_true", help="only list the matching configurations (no compiles)")


def main(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("mmkern aot-report: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    jobs = select(args.filter, args.arch or list(aot.ARCHS), args.limit)
    if not jobs:
        print(f"mmkern aot-report: no configuration matches {args.filter}", file=sys.stderr)
        return 2
    if args.list:
        configs = aot.all_configs()
        for index, arch in jobs:
            print(f"sm_{arch} {describe(configs[index])}")
        return 0
    table = rows(run(jobs, args.jobs))
    text = markdown(table)
    print(text, end="")
    failed = sum(not r["ok"] for r in table)
    spilled = sum(bool(r["spill_stores"] or r["spill_loads"]) for r in table)
    print(f"{len(table)} compiled, {failed} failed, {spilled} with register spills")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m mmkern.triton.aot_report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
