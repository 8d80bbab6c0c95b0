"""mmkern::kvcache_append in plain torch: one indexed copy per cache, no host sync.

Cache row cache_seqlens[b] + t of sequence b = k[b, t] (same for v), in place; k/v (B, L_new, H_kv, D).
Dense caches (B, L_cache, H_kv, D): row j of b is k_cache[b, j]. Paged caches (num_blocks, page_size, H_kv, D)
with block_table (B, max_blocks): row j of b is k_cache[block_table[b, j // page_size], j % page_size], so the
new rows land in their pages and nothing else is touched. Moves 2 x B x L_new x H_kv x D elements each way.
Rows past the cache (possible only on a GPU, where the op does not read cache_seqlens on the host) are clamped
to its last row rather than faulting. The triton and cpu backends register this function too (an indexed copy
needs no kernel of its own)."""
from __future__ import annotations

import torch


def kvcache_append(p) -> None:
    k, v = p.k, p.v
    B, L_new = k.shape[0], k.shape[1]
    if B == 0 or L_new == 0:
        return
    rows = p.cache_seqlens.to(device=k.device, dtype=torch.long).unsqueeze(1) + torch.arange(L_new, device=k.device)
    rows = rows.clamp_(max=p.cache_len - 1)                                   # (B, L_new) cache rows
    if p.block_table is None:
        index = (torch.arange(B, device=k.device).unsqueeze(1), rows)
    else:
        page = p.k_cache.shape[1]
        blocks = p.block_table.long().gather(1, rows // page).clamp_(0, p.k_cache.shape[0] - 1)
        index = (blocks, rows % page)
    p.k_cache[index] = k
    p.v_cache[index] = v


def kvcache_append_reasons(p) -> list[str]:
    if p.k.dtype != p.k_cache.dtype or p.v.dtype != p.v_cache.dtype:
        return [f"k/v ({p.k.dtype}) and the caches ({p.k_cache.dtype}) differ in dtype"]
    return []
