"""Which CUDA code a built shared library carries: SASS and PTX per architecture, read from its fat binaries."""
from __future__ import annotations

import struct
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def embedded_cuda_code(path: Path) -> list[tuple[str, int]]:
    """("sass" | "ptx", sm) for every code object in the CUDA fat binaries of a shared library: what
    `cuobjdump --list-elf/--list-ptx` lists, read from the fatbin headers (no CUDA tools needed).
    Header layout: magic u32, version u16, header size u16, payload size u64; then entries of
    kind u16 (1 PTX, 2 ELF), u16, header size u32, payload size u64, ..., arch u32 at byte 28."""
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
