"""Paged and left-padded KV caches as one dense (B, Lk, H_kv, D) copy: the torch backend's way to run them.

torch's attention ops take dense keys only, so this backend gathers: for sequence b, dense row j is cache row
leftpad_k[b] + j, read through block_table when paged (k[block_table[b, row // page], row % page]), and
sequence b has seqused_k[b] - leftpad_k[b] valid keys. One indexed copy per cache: reads and writes
B x Lk x H_kv x D elements each (Lk = the logical cache length), no host sync. This is what "SDPA over a
gathered cache" costs, the row the paged kernels are benchmarked against; the kernels themselves never gather.
"""
from __future__ import annotations

import torch

from mmkern.ops.attention_problem import AttentionProblem


def gathered_cache(p: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(k, v, valid keys (B,) int64 or None): dense copies of p's paged / left-padded cache."""
    device, Lk = p.k.device, p.seqlen_k
    rows = torch.arange(Lk, device=device).unsqueeze(0).expand(p.batch, Lk)          # (B, Lk)
    used = p.seqused_k.long() if p.seqused_k is not None else None
    if p.leftpad_k is not None:
        pad = p.leftpad_k.long().unsqueeze(1)
        rows = (rows + pad).clamp_(max=max(Lk - 1, 0))
        used = used - pad.squeeze(1)
    if p.paged:
        page = p.page_size
        blocks = p.block_table.long().gather(1, rows // page)
        index = (blocks, rows % page)
    else:
        index = (torch.arange(p.batch, device=device).unsqueeze(1), rows)
    return p.k[index], p.v[index], used
