"""The `nvcc -Xptxas -v` report in a build log: per kernel and architecture, registers, stack and register
spills, and the .cu file it came from. The build keeps it in the stamp (`mmkern build` prints the spills).
"""
from __future__ import annotations

import re

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
