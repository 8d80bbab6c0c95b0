"""The attention problem record: one call of mmkern::attention_forward / attention_backward, validated once.

The op (mmkern/ops/attention.py) builds an `AttentionProblem` from its flat schema arguments (torch.library
needs them flat; nothing below the op does) and every backend's `reasons(problem)` and `run(problem)` read
it. It holds the tensors, the settings, and the facts every backend would otherwise recompute: batch, heads,
kv_heads, head_dim, varlen, the (max) lengths, the lse shape, the effective causal/window bounds.

Layouts (flash-attn's):
- dense:   q (B, Lq, H, D), k/v (B, Lk, H_kv, D); lse (B, H, Lq) float32
- varlen:  q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens_q/k (B + 1,) int32; lse (H, total_q)
- kvcache: dense, with seqused_k (B,) int32 = the end of each sequence's valid keys, and optionally
           leftpad_k (B,) int32 = their start: sequence b's keys are cache rows leftpad_k[b] .. seqused_k[b] - 1,
           and its causal/window/ALiBi positions count from leftpad_k[b] (flash-attn's cache_leftpad)
- paged:   kvcache with block_table (B, max_blocks) int32: k/v are pages (num_blocks, page_size, H_kv, D) and
           cache row j of sequence b is k[block_table[b, j // page_size], j % page_size]; the logical cache
           length (seqlen_k) is max_blocks * page_size. Inference only (no gradient), no attn_mask, no dropout.

The numerics contract every backend keeps (and tests check for each one that takes the inputs):
- a query row that sees no key (all masked, Lk = 0, an empty window, seqused_k = 0): out 0, lse -inf;
- a row with a NaN score (NaN in q, k, v or a float mask): out NaN and lse NaN for that row; never 0;
- a row with a +inf score (and no NaN): out NaN, lse +inf;
- -inf in a float attn_mask hides that key exactly as a False in a bool mask does;
- accumulation in float32 (or better), softmax through the log-sum-exp; lse is the natural log.
Backward: a row that saw no key has dq 0 and contributes 0 to dk, dv.

Validation reads no tensor data (safe on fake tensors while torch.compile traces), except
`check_varlen_values`, which reads cu_seqlens (one small device-to-host copy) in eager calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from mmkern.ops._checks import (FLOAT_DTYPES, check_dim, check_dropout_p, check_same_device, check_same_dtype,
                                check_tensor)

MAX_HEAD_DIM = 256
# decode shapes: at most this many queries per sequence (flash_attn_with_kvcache's one or a few new tokens)
DECODE_MAX_QUERIES = 16


class AttentionProblem(NamedTuple):
    """One attention call, immutable. Field names are the op schema's; the derived facts follow them.

    For the backward (`with_gradients`), dout/out/lse (and dlse, the gradient arriving on lse, or None) are
    set too, and attn_mask_needs_grad says whether a float mask's gradient is asked for.
    (A NamedTuple rather than a frozen dataclass: with 31 fields the dataclass's __init__, one
    object.__setattr__ per field, cost 4.2 us per call on the eager fast path; this costs 1.0 us.)"""
    q: Tensor
    k: Tensor
    v: Tensor
    cu_seqlens_q: Optional[Tensor]     # (B + 1,) int32/int64, varlen only
    cu_seqlens_k: Optional[Tensor]
    seqused_k: Optional[Tensor]        # (B,) int32/int64: valid keys per sequence (a KV cache), dense only
    softmax_scale: float
    causal: bool
    causal_bottom_right: bool          # flash-attn's alignment (True) or torch SDPA's top-left (False)
    window_left: int                   # as given: -1 = unbounded
    window_right: int                  # as given: -1 = unbounded (causal bounds it at 0: see `right`)
    softcap: float                     # 0 = off
    alibi_slopes: Optional[Tensor]     # (H,) or (B, H) float32
    attn_mask: Optional[Tensor]        # (B, H, Lq, Lk) bool (True = attend) or float (added to the scores)
    dropout_p: float
    dropout_seed: Optional[Tensor]     # int64 tensor drawn from torch's generator (mmkern/ops/_rng.py)
    deterministic: bool
    # derived
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    varlen: bool
    seqlen_q: int                      # dense: Lq; varlen: 0 (each sequence's length is in cu_seqlens_q)
    seqlen_k: int                      # dense: Lk (the cache length with seqused_k); varlen: 0
    max_seqlen_q: int                  # dense: Lq; varlen: as given (>= the longest sequence)
    max_seqlen_k: int
    # the backward's inputs (None in a forward problem)
    dout: Optional[Tensor] = None
    out: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    dlse: Optional[Tensor] = None
    attn_mask_needs_grad: bool = False
    # the serving arguments (flash_attn_with_kvcache): see the layouts above
    block_table: Optional[Tensor] = None   # (B, max_blocks) int32: paged k/v
    leftpad_k: Optional[Tensor] = None     # (B,) int32/int64: where each sequence's keys start
    num_splits: int = 0                    # key splits of a decode step: 0 = the backend chooses, 1 = none

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 = MHA; H = MQA)."""
        return self.heads // self.kv_heads

    @property
    def lse_shape(self) -> tuple:
        return (self.heads, self.q.shape[0]) if self.varlen else (self.batch, self.heads, self.seqlen_q)

    @property
    def left(self) -> int:
        """Keys before the aligned position a query sees (-1 = unbounded)."""
        return self.window_left

    @property
    def right(self) -> int:
        """Keys after the aligned position a query sees: 0 when causal, else window_right (-1 = unbounded)."""
        return 0 if self.causal else self.window_right

    @property
    def windowed(self) -> bool:
        """A sliding window beyond plain causal masking."""
        return self.window_left >= 0 or (not self.causal and self.window_right >= 0)

    @property
    def requires_grad(self) -> bool:
        return self.q.requires_grad or self.k.requires_grad or self.v.requires_grad

    @property
    def decode_shaped(self) -> bool:
        """A decode step: few queries per sequence, no gradient, no explicit mask, no dropout
        (the shape of flash_attn_with_kvcache with one or a few new tokens)."""
        return (self.max_seqlen_q <= DECODE_MAX_QUERIES and self.attn_mask is None and self.dropout_p == 0
                and not self.requires_grad)

    @property
    def same_alignment(self) -> bool:
        """Top-left and bottom-right alignment give the same mask: dense, Lq == Lk, no seqused_k."""
        return not self.varlen and self.seqlen_q == self.seqlen_k and self.seqused_k is None \
            and self.leftpad_k is None

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def page_size(self) -> int:
        """Keys per page (paged), else 0."""
        return self.k.shape[1] if self.block_table is not None else 0

    def with_dense_cache(self, k: Tensor, v: Tensor, seqused_k: Optional[Tensor]) -> "AttentionProblem":
        """This problem on a dense copy of its paged / left-padded cache: k, v (B, Lk, H_kv, D) holding each
        sequence's keys from row 0, seqused_k (B,) their counts (for backends that gather rather than page)."""
        return self._replace(k=k, v=v, seqused_k=seqused_k, seqlen_k=k.shape[1], max_seqlen_k=k.shape[1],
                             block_table=None, leftpad_k=None)

    def with_gradients(self, dout: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                       attn_mask_needs_grad: bool) -> "AttentionProblem":
        return self._replace(dout=dout, out=out, lse=lse, dlse=dlse, attn_mask_needs_grad=attn_mask_needs_grad)


def build(fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
          causal, causal_bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
          dropout_seed, deterministic, block_table=None, leftpad_k=None, num_splits=0, *, validate: bool = True,
          read_values: bool = False) -> AttentionProblem:
    """The record of one call from the op's flat arguments. `validate`: the shape/dtype/range checks
    (no data reads); `read_values`: also check cu_seqlens' values (eager only: reads them; independent of
    `validate`, which dispatch.call_memoized turns off for a signature it has validated).
    The serving checks (block_table, leftpad_k, num_splits) are part of `validate`; their value checks (CPU
    tensors only: on a GPU they would cost a host sync) part of `read_values`."""
    serving = block_table is not None or leftpad_k is not None
    if validate:
        if serving or num_splits:
            check_serving_inputs(fn, q, k, v, cu_seqlens_q, seqused_k, block_table, leftpad_k, num_splits,
                                 attn_mask, dropout_p)
        check_attention_inputs(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                               window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
                               paged=block_table is not None)
    if read_values and cu_seqlens_q is not None:
        check_varlen_values(fn, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, seqlen_q, seqlen_k = cu_seqlens_q.shape[0] - 1, 0, 0
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1] * block_table.shape[1] if block_table is not None else k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
    if read_values and serving and q.device.type == "cpu":
        check_serving_values(fn, k, seqused_k, block_table, leftpad_k, seqlen_k)
    return AttentionProblem(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softmax_scale, causal, causal_bottom_right, window_left,
        window_right, softcap, alibi_slopes, attn_mask, dropout_p, dropout_seed, deterministic,
        batch=batch, heads=q.shape[-2], kv_heads=k.shape[-2], head_dim=q.shape[-1], varlen=varlen,
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        block_table=block_table, leftpad_k=leftpad_k, num_splits=num_splits)


# --------------------------------------------------------------------------- validation

def check_attention_inputs(fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                           window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
                           paged: bool = False) -> None:
    """Shape/dtype/range checks (no data reads: safe on fake tensors). paged: k/v are pages (checked by
    check_serving_inputs), so their batch and length are not q's."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != rank:
            raise ValueError(f"{fn}: {name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        check_same_dtype(fn, q=q, k=k, v=v)
    device = q.device          # the common case first: the full check (and its message) only on a mismatch
    if any(t is not None and t.device != device
           for t in (k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, attn_mask)):
        check_same_device(fn, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                          seqused_k=seqused_k, alibi_slopes=alibi_slopes, attn_mask=attn_mask)
    H, D = q.shape[-2], q.shape[-1]
    H_kv = k.shape[-2]
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"{fn}: head_dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {D}")
    check_dim(fn, "k", k, -1, D, "head_dim, as q")
    check_dim(fn, "v", v, -1, D, "head_dim, as q")
    check_dim(fn, "v", v, -2, H_kv, "heads, as k")
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"{fn}: the number of key/value heads ({H_kv}) must divide the number of query heads "
                         f"({H}); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_dim(fn, "v", v, 0, k.shape[0], "as k")
    if not varlen:
        if not paged:
            check_dim(fn, "k", k, 0, q.shape[0], "batch, as q")
        check_dim(fn, "v", v, 1, k.shape[1], "seqlen, as k")
    else:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            check_tensor(fn, name, cu, dtypes=(torch.int32, torch.int64), ndim=1)
            if cu.shape[0] < 1:
                raise ValueError(f"{fn}: {name} must hold batch + 1 offsets (at least [0]), got shape {tuple(cu.shape)}")
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
            raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1); got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{fn}: {name} must be an int >= 0, got {value!r}")
    if seqused_k is not None:
        check_tensor(fn, "cache_seqlens", seqused_k, dtypes=(torch.int32, torch.int64), ndim=1)
        check_dim(fn, "cache_seqlens", seqused_k, 0, q.shape[0], "batch")
    for name, value in (("window_size[0]", window_left), ("window_size[1]", window_right)):
        if not isinstance(value, int) or value < -1:
            raise ValueError(f"{fn}: {name} must be an int >= -1 (-1 = unbounded), got {value!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"{fn}: softcap must be a float >= 0 (0 = off), got {softcap!r}")
    check_dropout_p(fn, dropout_p)
    if alibi_slopes is not None:
        check_tensor(fn, "alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndim=(1, 2))
        batch = (cu_seqlens_q.shape[0] - 1) if varlen else q.shape[0]
        allowed = [(H,), (batch, H)]
        if tuple(alibi_slopes.shape) not in allowed:
            raise ValueError(f"{fn}: alibi_slopes must have shape (heads,) = ({H},) or (batch, heads) = "
                             f"({batch}, {H}); got {tuple(alibi_slopes.shape)}")
    if attn_mask is not None:
        if varlen:
            raise ValueError(f"{fn}: attn_mask is not supported with varlen inputs")
        check_tensor(fn, "attn_mask", attn_mask, dtypes=(torch.bool, *FLOAT_DTYPES), ndim=4)
        want = (q.shape[0], H, q.shape[1], k.shape[1])
        if tuple(attn_mask.shape) != want:
            raise ValueError(f"{fn}: attn_mask must broadcast to (batch, heads, seqlen_q, seqlen_k) = {want}; "
                             f"got {tuple(attn_mask.shape)}")


def check_serving_inputs(fn: str, q, k, v, cu_seqlens_q, seqused_k, block_table, leftpad_k, num_splits, attn_mask,
                         dropout_p) -> None:
    """The serving arguments' shapes and dtypes (no data reads): block_table against the pages k/v,
    leftpad_k, num_splits; and what they do not combine with."""
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"{fn}: num_splits must be an int >= 0 (0 = the backend chooses, 1 = no split); "
                         f"got {num_splits!r}")
    if block_table is None and leftpad_k is None:
        return
    what = "block_table" if block_table is not None else "cache_leftpad"
    if cu_seqlens_q is not None:
        raise ValueError(f"{fn}: {what} takes dense (batch, seqlen, heads, head_dim) q, not varlen")
    if attn_mask is not None or dropout_p:
        raise ValueError(f"{fn}: {what} (a KV cache) takes no attn_mask and no dropout")
    if any(t.requires_grad for t in (q, k, v)):
        raise ValueError(f"{fn}: {what} is for inference (a KV cache): q, k and v must not require grad")
    batch = q.shape[0] if q.dim() == 4 else -1
    if block_table is not None:
        check_tensor(fn, "block_table", block_table, dtypes=(torch.int32,), ndim=2)
        if block_table.shape[0] != batch:
            raise ValueError(f"{fn}: block_table must have shape (batch, max_blocks_per_seq) with batch = {batch} "
                             f"(q.shape[0]); got {tuple(block_table.shape)}")
        if k.dim() != 4 or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"{fn}: with block_table, k_cache and v_cache are pages (num_blocks, page_block_size, "
                             f"kv_heads, head_dim) of one shape; got k_cache {tuple(k.shape)}, v_cache "
                             f"{tuple(v.shape)}")
        if k.shape[0] == 0 and block_table.numel():
            raise ValueError(f"{fn}: block_table has entries but k_cache holds no pages (num_blocks = 0)")
    if leftpad_k is not None:
        check_tensor(fn, "cache_leftpad", leftpad_k, dtypes=(torch.int32, torch.int64), ndim=1)
        check_dim(fn, "cache_leftpad", leftpad_k, 0, batch, "batch")
        if seqused_k is None:
            raise ValueError(f"{fn}: cache_leftpad needs cache_seqlens (where each sequence's cache ends)")
    for name, t in (("block_table", block_table), ("cache_leftpad", leftpad_k)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{fn}: {name} must be on q's device {q.device}; got {t.device}")


def check_serving_values(fn: str, k, seqused_k, block_table, leftpad_k, seqlen_k: int) -> None:
    """The serving arguments' values (reads them: CPU tensors only). On a GPU the kernels clamp instead."""
    if block_table is not None and block_table.numel():
        lo, hi = int(block_table.min()), int(block_table.max())
        if lo < 0 or hi >= k.shape[0]:
            raise ValueError(f"{fn}: block_table entries must be page indices in 0..{k.shape[0] - 1} (num_blocks "
                             f"= k_cache.shape[0] = {k.shape[0]}); got entries from {lo} to {hi}")
    used = seqused_k.tolist() if seqused_k is not None else None
    if used is not None and used and (min(used) < 0 or max(used) > seqlen_k):
        raise ValueError(f"{fn}: cache_seqlens (+ the new tokens) must be in 0..{seqlen_k}, the cache length"
                         f"{' (max_blocks_per_seq * page_block_size)' if block_table is not None else ''}; got {used}")
    if leftpad_k is not None:
        pads = leftpad_k.tolist()
        bad = [b for b, (pad, end) in enumerate(zip(pads, used)) if not 0 <= pad <= end]
        if bad:
            raise ValueError(f"{fn}: cache_leftpad must be in 0..cache_seqlens for every sequence; got cache_leftpad "
                             f"{pads} and cache_seqlens (+ the new tokens) {used}")


def check_varlen_values(fn: str, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """Checks that read cu_seqlens (one small device-to-host copy): eager calls only."""
    for name, cu, packed, max_len, max_name in (("cu_seqlens_q", cu_seqlens_q, q, max_seqlen_q, "max_seqlen_q"),
                                                 ("cu_seqlens_k", cu_seqlens_k, k, max_seqlen_k, "max_seqlen_k")):
        offsets = cu.tolist()
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
            raise ValueError(f"{fn}: {name} must start at 0 and never decrease; got {offsets}")
        if offsets[-1] != packed.shape[0]:
            raise ValueError(f"{fn}: {name}[-1] must equal the packed length {packed.shape[0]} "
                             f"(shape[0] of {'q' if name.endswith('q') else 'k'}); got {offsets[-1]}")
        longest = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
        if longest > max_len:
            raise ValueError(f"{fn}: {max_name} ({max_len}) is smaller than the longest sequence in {name} ({longest})")


@dataclass(frozen=True)
class KVCacheAppend:
    """One mmkern::kvcache_append: cache row cache_seqlens[b] + t of sequence b = k[b, t] (same for v), in place.
    k/v (B, L_new, H_kv, D), cache_seqlens (B,) int32/int64; k_cache/v_cache (B, L_cache, H_kv, D), or pages
    (num_blocks, page_size, H_kv, D) with block_table (B, max_blocks) int32 (the layouts above)."""
    k_cache: Tensor
    v_cache: Tensor
    k: Tensor
    v: Tensor
    cache_seqlens: Tensor
    block_table: Optional[Tensor] = None

    @property
    def cache_len(self) -> int:
        """Rows each sequence's cache holds: L_cache, or max_blocks * page_size when paged."""
        if self.block_table is None:
            return self.k_cache.shape[1]
        return self.block_table.shape[1] * self.k_cache.shape[1]

    @property
    def device(self) -> torch.device:
        return self.k_cache.device
