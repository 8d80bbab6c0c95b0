"""When the Triton attention forward takes its split-KV decode path, and into how many key ranges it cuts.

The rule (`use_split_kv`): a paged or left-padded cache always (only the split kernel reads them), else
num_splits when the caller gives it (1 = the normal forward), else: the problem is decode-shaped (AttentionProblem.decode_shaped: at most
DECODE_MAX_QUERIES = 16 queries per sequence, no attn_mask, no dropout, no input requiring grad: the
backward then runs from the normal forward's out and lse, as always), and `decode_splits` gives at least
two key splits; the normal forward otherwise. The kernels are in attention_decode.py, their launch in
attention.py (`_decode`). The dispatcher sends decode-shaped problems on a GPU to Triton before the CUDA
kernel for this path (mmkern/dispatch.py: RULES).
"""
from __future__ import annotations

import functools

import torch
import triton

from mmkern.triton.attention_tiles import Tiles, arch_family, decode_block_d, decode_tiles


def decode_splits(p, device: torch.device, tiles: Tiles) -> int:
    """How many key ranges the split-KV path cuts max_seqlen_k into (1 = use the normal forward).

    GPU: enough programs for two waves over the SMs, (batch * kv_heads * row chunks) * splits ~
    2 * SMs, with at least 4 key tiles per split (each split's partial output costs a write and a
    read), at most 128 splits. The interpreter has no SMs: a fixed min(4, key tiles), so small tests
    run several splits, some of them empty (short cache_seqlens, causal or window).
    A caller's num_splits > 0 (flash_attn_with_kvcache's) is taken as given, at most one per key tile."""
    blocks = triton.cdiv(p.max_seqlen_k, tiles.block_n)
    if p.num_splits > 0:
        return max(1, min(p.num_splits, blocks))
    if device.type != "cuda":
        return min(4, blocks)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    programs = p.batch * p.kv_heads * triton.cdiv((p.heads // p.kv_heads) * p.max_seqlen_q, tiles.block_m)
    return max(1, min(triton.cdiv(2 * sms, programs), blocks // 4, 128))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def use_split_kv(p) -> bool:
    """The documented rule (module docstring); p: the AttentionProblem."""
    if p.paged or p.leftpad_k is not None:
        return True             # only the split kernel reads pages and left pads (any Lq; inference only)
    if not p.decode_shaped or p.num_splits == 1:
        return False
    if p.num_splits > 1:
        return True
    tiles = decode_tiles(arch_family(p.device), decode_block_d(p.head_dim), p.dtype, p.max_seqlen_k)
    return decode_splits(p, p.device, tiles) >= 2
