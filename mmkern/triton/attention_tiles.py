"""Tile tables of the Triton attention kernels: which (BLOCK_M, BLOCK_N, warps, stages) each launch takes.

One table per architecture family and pass (`_FORWARD_TILES`, `_BACKWARD_TILES`, `_DECODE_TILES`), plus a
few alternatives (`_FORWARD_ALTERNATIVES`, `_BACKWARD_ALTERNATIVES`) that `triton.autotune` times against
the table's entry on a GPU (mmkern/triton/attention.py: `_launch`); the interpreter takes the table's
entry. Every candidate fits its family's shared memory: mmkern/triton/attention_aot.py yields them all and
mmkern/triton/aot.py compiles each for its architectures (sm_80, sm_86, sm_90) and checks it. Feature
flags are constexprs: they change the code, not the tiles, except that a forward with an attn_mask takes
`masked_tiles` (its mask tile spilled) and float32 takes smaller tiles.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from mmkern.triton._common import INTERPRETING


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (arch family, BLOCK_D) -> tiles for the forward / dQ pass and for the dK dV pass.
# sm_80 (A100, 164 KB shared), sm_86/89 (~99 KB), sm_90 (H100/H200, 227 KB, wgmma from 64-row tiles).
_FORWARD_TILES = {
    "sm80": {16: Tiles(64, 64, 4, 3), 32: Tiles(64, 64, 4, 3), 64: Tiles(128, 64, 4, 3), 128: Tiles(128, 64, 8, 2),
             256: Tiles(64, 32, 4, 2)},
    "sm86": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(64, 64, 4, 2), 128: Tiles(64, 32, 4, 2),
             256: Tiles(64, 16, 4, 1)},
    "sm90": {16: Tiles(64, 64, 4, 3), 32: Tiles(64, 64, 4, 3), 64: Tiles(128, 64, 4, 3), 128: Tiles(128, 64, 8, 3),
             256: Tiles(64, 64, 4, 2)},
}
_BACKWARD_TILES = {
    "sm80": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(64, 64, 4, 2), 128: Tiles(64, 64, 8, 2),
             256: Tiles(32, 32, 4, 1)},
    "sm86": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(32, 64, 4, 2), 128: Tiles(32, 32, 4, 1),
             256: Tiles(16, 16, 4, 1)},
    "sm90": {16: Tiles(64, 64, 4, 2), 32: Tiles(64, 64, 4, 2), 64: Tiles(64, 64, 4, 2), 128: Tiles(64, 64, 8, 2),
             256: Tiles(64, 32, 8, 1)},
}
# Timed against the table's entry by triton.autotune on a GPU: Hopper, 16-bit, head dim 128 (the
# shape of the performance goal). Few on purpose: every candidate is an ahead-of-time compile.
_FORWARD_ALTERNATIVES = {"sm90": {128: Tiles(128, 128, 8, 2)}}
_BACKWARD_ALTERNATIVES = {"sm90": {128: Tiles(64, 128, 8, 2)}}
# Split-KV decode: BLOCK_M packs GQA group x query rows. sm_80/86: 16 rows (mma.sync's minimum);
# sm_90: 64 rows, the smallest wgmma tile (decode is bound by reading K/V, the padding is free).
# Head dims pad to at least 64 (decode_block_d: the padding is masked, never read, and it saves
# compiles). float32 halves BLOCK_N (decode_tiles).
_DECODE_TILES = {
    "sm80": {64: Tiles(16, 128, 4, 3), 128: Tiles(16, 64, 4, 3), 256: Tiles(16, 32, 4, 2)},
    "sm90": {64: Tiles(64, 128, 4, 3), 128: Tiles(64, 128, 4, 2), 256: Tiles(64, 64, 4, 2)},
}
_DECODE_TILES["sm86"] = _DECODE_TILES["sm80"]
ARCH_FAMILIES = {80: "sm80", 86: "sm86", 89: "sm86", 90: "sm90"}


def tiles_for(table: dict, family: str, bd: int, dtype: torch.dtype) -> Tiles:
    """float32 tiles take twice the shared memory of 16-bit ones: halve BLOCK_M for them."""
    tiles = table[family][bd]
    if dtype == torch.float32:
        tiles = tiles._replace(block_m=max(16, tiles.block_m // 2))
    return tiles


def candidates(table: dict, alternatives: dict, family: str, bd: int, dtype: torch.dtype) -> tuple[Tiles, ...]:
    """The table's tiles first (what the interpreter runs), then the alternatives autotune tries."""
    first = tiles_for(table, family, bd, dtype)
    extra = alternatives.get(family, {}).get(bd) if dtype != torch.float32 else None
    return (first,) if extra is None else (first, extra)


def masked_tiles(tiles: Tiles) -> Tiles:
    """Forward tiles when the kernel also reads an attn_mask tile: half the key block and 8 warps from 64 rows.

    The mask tile's (BLOCK_M, BLOCK_N) 64-bit addresses and values are live next to the score tile; with the
    table's tiles ptxas gave up on registers for it: bf16, head dim 64, sm_80, 128x64 with 4 warps went from
    255 registers / 140 B of spills without a mask to 32 registers / 16 KB with one (sm_90: 3-4 KB; head dim
    128, 8 warps: 10.6 KB). 128x32 with 8 warps: 0-8 B (head dim 64), 116-172 B (128), at the same arithmetic
    per key and less shared memory. mmkern aot-report shows every configuration."""
    return tiles._replace(block_n=max(16, tiles.block_n // 2),
                          num_warps=max(8, tiles.num_warps) if tiles.block_m >= 64 else tiles.num_warps)


def fp32_forward_tiles(tiles: Tiles, bd: int) -> Tiles:
    """float32 forward tiles from head dim 128: half the key block too, 8 warps. The float32 dots (ieee, FMA
    on the CUDA cores) keep the whole (BLOCK_M, BLOCK_D) fragments in registers; with BLOCK_N 64 ptxas fell
    into the same 32-register allocation as masks did: sm_80 head dim 128, 64x64 with 8 warps, 17 KB of spills
    with no feature on; 64x32: 0-44 B. Head dim 256: 32x32 with 4 warps 18.8 KB, 32x16 with 8 warps 0 B."""
    if bd < 128:
        return tiles
    return tiles._replace(block_n=max(16, tiles.block_n // 2), num_warps=8)


def forward_candidates(family: str, bd: int, dtype: torch.dtype, masked: bool) -> tuple[Tiles, ...]:
    """The forward's tiles: the table's and its autotune alternatives; float32 adjusted (fp32_forward_tiles);
    with a mask, masked_tiles of the table's alone (the alternatives are tuned for the unmasked performance
    goal, and each one is another compile)."""
    tiles = candidates(_FORWARD_TILES, _FORWARD_ALTERNATIVES, family, bd, dtype)
    if dtype == torch.float32:
        tiles = tuple(fp32_forward_tiles(t, bd) for t in tiles)
    return (masked_tiles(tiles[0]),) if masked else tiles


def decode_tiles(family: str, bd: int, dtype: torch.dtype, max_seqlen_k: int = 0) -> Tiles:
    """The table's decode tiles. Under the interpreter (no compile, no shared memory: tiles only
    change the speed) BLOCK_N also grows so a split walks at most 8 key tiles: 128k keys take
    seconds, not minutes; the GPU tables never see this."""
    tiles = _DECODE_TILES[family][max(64, bd)]
    if dtype == torch.float32:
        tiles = tiles._replace(block_n=tiles.block_n // 2)
    if INTERPRETING:
        tiles = tiles._replace(block_n=max(tiles.block_n, triton.next_power_of_2(triton.cdiv(max_seqlen_k, 32))))
    return tiles


def decode_block_d(head_dim: int) -> int:
    """At least 64 on a GPU (see _DECODE_TILES); the interpreter, where the padding only costs time,
    takes block_d as is."""
    return block_d(head_dim) if INTERPRETING else max(64, block_d(head_dim))


def arch_family(device: torch.device) -> str:
    if device.type != "cuda":        # the interpreter: any table works; use the A100 one
        return "sm80"
    major, minor = torch.cuda.get_device_capability(device)
    return ARCH_FAMILIES.get(major * 10 + minor, "sm90" if major >= 9 else ("sm86" if minor > 0 else "sm80"))


def block_d(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.dot's minimum); the padding is masked."""
    return max(16, triton.next_power_of_2(head_dim))


