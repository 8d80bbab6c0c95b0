"""mmkern::kvcache_append in plain torch: one indexed copy per cache, no host sync.

k_cache[b, cache_seqlens[b] + t] = k[b, t] (same for v), in place; k_cache/v_cache (B, L_cache, H_kv, D),
k/v (B, L_new, H_kv, D). Moves 2 x B x L_new x H_kv x D elements each way. The triton and cpu backends
register this function too (an indexed copy needs no kernel of its own)."""
from __future__ import annotations

import torch


def kvcache_append(p) -> None:
    k, v = p.k, p.v
    B, L_new = k.shape[0], k.shape[1]
    if B == 0 or L_new == 0:
        return
    batch = torch.arange(B, device=k.device).unsqueeze(1)
    positions = p.cache_seqlens.to(device=k.device, dtype=torch.long).unsqueeze(1) + torch.arange(L_new, device=k.device)
    p.k_cache[batch, positions] = k
    p.v_cache[batch, positions] = v


def kvcache_append_reasons(p) -> list[str]:
    if p.k.dtype != p.k_cache.dtype or p.v.dtype != p.v_cache.dtype:
        return [f"k/v ({p.k.dtype}) and the caches ({p.k_cache.dtype}) differ in dtype"]
    return []
