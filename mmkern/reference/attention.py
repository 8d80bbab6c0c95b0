"""Reference attention: the oracle every attention kernel is compared with.

Plain eager PyTorch, computed in float64 (unless precision.compute_in says otherwise), written to read like the math, and
materialising the whole (B, H, Lq, Lk) score matrix (this is what the kernels avoid).

Semantics (flash-attn's, shared by every backend):
  s_ij   = softmax_scale * q_i . k_j                       raw scores
  s_ij   = softcap * tanh(s_ij / softcap)                  if softcap > 0
  s_ij  += -slope_h * |i + off - j|                        if alibi_slopes (bottom-right aligned)
  s_ij  += attn_mask_ij  (float mask) / s_ij = -inf where attn_mask_ij is False (bool mask)
  key j is visible from query i when j < k_len, and with off = k_len - q_len (bottom-right
  alignment) or off = 0 (top-left, torch SDPA's causal):
      j <= i + off + window_right     (causal means window_right = 0)
      j >= i + off - window_left      (-1 = unbounded)
  lse_i  = log sum_j visible exp(s_ij)                     -inf when no key is visible
  p_ij   = exp(s_ij - lse_i), 0 when not visible           (computed through the row max: _probabilities)
  out_i  = sum_j dropout(p_ij) v_j,  dropout(p) = p * keep / (1 - dropout_p)
MQA/GQA: query head h reads key/value head h // (H / H_kv).

Layouts: dense q (B, Lq, H, D), k/v (B, Lk, H_kv, D); varlen packs the batch along dim 0,
q (total_q, H, D) with cu_seqlens_q (B + 1,) int32 offsets. Internally varlen is unpacked
into a zero-padded dense batch with per-sequence lengths q_lens, k_lens.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mmkern.reference.dropout import dropout_keep_mask, seed_value
from mmkern.reference.precision import compute_dtype, up


class Masking(NamedTuple):
    """Everything that decides which keys a query sees and what is added to its scores."""
    causal: bool
    bottom_right: bool     # flash-attn alignment (True) or torch SDPA's top-left (False)
    window_left: int       # -1 = unbounded
    window_right: int      # -1 = unbounded
    softcap: float         # 0 = off
    alibi_slopes: torch.Tensor | None   # (H,) or (B, H), float32
    attn_mask: torch.Tensor | None      # (B, H, Lq, Lk) bool (True = attend) or float (added)


# --------------------------------------------------------------------------- packing helpers

def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    offsets = cu_seqlens.tolist()
    return [b - a for a, b in zip(offsets[:-1], offsets[1:])]


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """(total, ...) packed rows -> (B, max_len, ...) zero-padded batch."""
    offsets = cu_seqlens.tolist()
    out = packed.new_zeros((len(offsets) - 1, max_len, *packed.shape[1:]))
    for b, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        out[b, : end - start] = packed[start:end]
    return out


def pack(padded: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(B, max_len, ...) padded batch -> (total, ...) packed rows."""
    offsets = cu_seqlens.tolist()
    rows = [padded[b, : end - start] for b, (start, end) in enumerate(zip(offsets[:-1], offsets[1:]))]
    if not rows:
        return padded.new_zeros((0, *padded.shape[2:]))
    return torch.cat(rows, dim=0)


# --------------------------------------------------------------------------- the math on a padded batch

def _visible(q_lens: torch.Tensor, k_lens: torch.Tensor, Lq: int, Lk: int, m: Masking) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool: which keys each query may attend to (before attn_mask)."""
    i = torch.arange(Lq, device=q_lens.device).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=q_lens.device).view(1, 1, 1, Lk)
    q_len = q_lens.view(-1, 1, 1, 1)
    k_len = k_lens.view(-1, 1, 1, 1)
    aligned = i + (k_len - q_len if m.bottom_right else 0)   # key position query i lines up with
    visible = (j < k_len) & (i < q_len)
    window_right = 0 if m.causal else m.window_right
    if window_right >= 0:
        visible &= j <= aligned + window_right
    if m.window_left >= 0:
        visible &= j >= aligned - m.window_left
    return visible


def _alibi_bias(slopes: torch.Tensor, q_lens, k_lens, Lq: int, Lk: int, dtype) -> torch.Tensor:
    """(B, H, Lq, Lk): -slope * |i + k_len - q_len - j| (flash-attn's bottom-right ALiBi)."""
    B = q_lens.shape[0]
    slopes = slopes.to(dtype)
    slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(B, slopes.shape[-1], 1, 1)  # B may be 0
    i = torch.arange(Lq, device=q_lens.device).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=q_lens.device).view(1, 1, 1, Lk)
    distance = (i + (k_lens - q_lens).view(-1, 1, 1, 1) - j).abs().to(dtype)
    return -slopes * distance


def _scores(q, k, softmax_scale, q_lens, k_lens, m: Masking):
    """Returns (s, visible, tanh_s): masked scores (B, H, Lq, Lk) with -inf where not visible,
    the visibility mask, and tanh(raw / softcap) (needed by the softcap gradient) or None."""
    B, Lq, H, _ = q.shape
    Lk, H_kv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // H_kv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    tanh_s = None
    if m.softcap > 0:
        tanh_s = torch.tanh(s / m.softcap)
        s = m.softcap * tanh_s
    if m.alibi_slopes is not None:
        s = s + _alibi_bias(m.alibi_slopes, q_lens, k_lens, Lq, Lk, s.dtype)
    visible = _visible(q_lens, k_lens, Lq, Lk, m).expand(B, H, Lq, Lk)
    if m.attn_mask is not None:
        if m.attn_mask.dtype == torch.bool:
            visible = visible & m.attn_mask
        else:
            s = s + m.attn_mask.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    return s, visible, tanh_s


def _probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """p = exp(s - lse), 0 in rows that see no key (lse = -inf) instead of NaN. A row whose scores hold
    a NaN (NaN input) has lse NaN and stays NaN, as in torch's SDPA: NaN input never turns into 0.

    Computed as exp(s - m) / sum exp(s - m) with m the row max, not as exp(s - lse): where every score
    of a row is huge and negative (transformers 4.x hides a key by adding torch.finfo(float32).min, and a
    query that sees no real key has only such scores), lse = m + log(sum) rounds to m even in float64,
    and exp(s - lse) would lose the 1 / sum (p = 1 for every key instead of the uniform 1 / Lk). Rows
    whose max is not finite (+inf or NaN scores) keep exp(s - lse): NaN where the score is, 0 elsewhere."""
    if s.shape[-1] == 0:        # no keys at all (Lk = 0): nothing to normalise
        return torch.zeros_like(s)
    seen = (lse != float("-inf")).unsqueeze(-1)
    m = s.amax(-1, keepdim=True)
    finite = torch.isfinite(m)
    e = torch.exp(s - torch.where(finite, m, torch.zeros_like(m)))
    p = torch.where(finite, e / e.sum(-1, keepdim=True), torch.exp(s - lse.unsqueeze(-1)))
    return torch.where(seen, p, torch.zeros_like(s))


def attention_padded(q, k, v, q_lens, k_lens, softmax_scale: float, m: Masking,
                     dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """Attention on a padded batch, computed in q's dtype.

    q (B, Lq, H, D), k/v (B, Lk, H_kv, D), q_lens/k_lens (B,) int, keep (B, H, Lq, Lk) bool or None.
    Returns out (B, Lq, H, D) and lse (B, H, Lq) (-inf for rows that see no key).
    """
    s, _, _ = _scores(q, k, softmax_scale, q_lens, k_lens, m)
    lse = torch.logsumexp(s, dim=-1)
    p = _probabilities(s, lse)
    if dropout_p > 0:
        p = p * keep / (1.0 - dropout_p)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def attention_padded_backward(dout, q, k, v, dlse, q_lens, k_lens, softmax_scale: float, m: Masking,
                              dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """Gradients of attention_padded, in q's dtype:

        dV  = dropout(P)^T dO                  dP = dropout(dO V^T)
        D_i = sum_d dO_id O_id (= sum_j P_ij dP_ij)
        dS  = P * (dP - D + dlse)              (dlse: gradient arriving on the returned lse)
        dS_raw = dS * (1 - tanh^2)             when softcap is on
        dQ  = scale dS_raw K                   dK = scale dS_raw^T Q
    dK and dV are summed over the query heads that share a key/value head (GQA).
    The kernels reuse the forward's saved out and (float32) lse; the oracle recomputes both in
    its own precision instead, so that its gradients are exact for float64 inputs.
    Returns dq, dk, dv and d_attn_mask (= dS, (B, H, Lq, Lk); None without a float mask).
    """
    B, Lq, H, _ = q.shape
    H_kv = k.shape[2]
    group = H // H_kv
    s, _, tanh_s = _scores(q, k, softmax_scale, q_lens, k_lens, m)
    lse = torch.logsumexp(s, dim=-1)
    p = _probabilities(s, lse)
    dropped = p * keep / (1.0 - dropout_p) if dropout_p > 0 else p
    k_rep = k.repeat_interleave(group, dim=2)
    v_rep = v.repeat_interleave(group, dim=2)
    out = torch.einsum("bhqk,bkhd->bqhd", dropped, v_rep)

    dv = torch.einsum("bhqk,bqhd->bkhd", dropped, dout)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v_rep)
    if dropout_p > 0:
        dp = dp * keep / (1.0 - dropout_p)
    row_dot = (dout * out).sum(-1).transpose(1, 2)                          # (B, H, Lq)
    if dlse is not None:
        row_dot = row_dot - dlse
    ds = p * (dp - row_dot.unsqueeze(-1))
    d_mask = ds if (m.attn_mask is not None and m.attn_mask.dtype != torch.bool) else None
    if tanh_s is not None:
        ds = ds * (1 - tanh_s * tanh_s)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k_rep) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * softmax_scale

    def sum_groups(t):  # (B, Lk, H, D) -> (B, Lk, H_kv, D)
        return t.view(B, t.shape[1], H_kv, group, t.shape[-1]).sum(3)

    return dq, sum_groups(dk), sum_groups(dv), d_mask


# --------------------------------------------------------------------------- the backend kernels

def _as_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, dtype):
    """Bring dense or varlen inputs to the padded-batch form, in `dtype`."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    device = q.device
    if cu_seqlens_q is not None:
        q_lens = torch.tensor(lengths_from_cu_seqlens(cu_seqlens_q), dtype=torch.long, device=device)
        k_lens = torch.tensor(lengths_from_cu_seqlens(cu_seqlens_k), dtype=torch.long, device=device)
        q = unpack(q, cu_seqlens_q, max_seqlen_q)
        k = unpack(k, cu_seqlens_k, max_seqlen_k)
        v = unpack(v, cu_seqlens_k, max_seqlen_k)
    else:
        B = q.shape[0]
        q_lens = torch.full((B,), q.shape[1], device=device)
        k_lens = torch.full((B,), k.shape[1], device=device) if seqused_k is None else seqused_k.to(device).long()
    return q, k, v, q_lens, k_lens


def _keep_mask(dropout_p, dropout_seed, q, k):
    if dropout_p == 0:
        return None
    B, Lq, H, _ = q.shape
    return dropout_keep_mask(seed_value(dropout_seed), (B, H, Lq, k.shape[1]), dropout_p, q.device)


def _masking(p) -> Masking:
    return Masking(p.causal, p.causal_bottom_right, p.window_left, p.window_right, p.softcap, p.alibi_slopes,
                   p.attn_mask)


def forward(p):
    """Kernel of mmkern::attention_forward (p: the op's AttentionProblem): float64 math (see precision.py),
    output in q's dtype, lse float32. Paged / left-padded caches are first read into a plain dense view."""
    if p.paged or p.leftpad_k is not None:
        p = p.with_dense_cache(*_cache_view(p))
    qp, kp, vp, q_lens, k_lens = _as_padded(p.q, p.k, p.v, p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k,
                                            p.max_seqlen_q, p.max_seqlen_k, compute_dtype())
    keep = _keep_mask(p.dropout_p, p.dropout_seed, qp, kp)
    out, lse = attention_padded(qp, kp, vp, q_lens, k_lens, p.softmax_scale, _masking(p), p.dropout_p, keep)
    if p.cu_seqlens_q is not None:
        out = pack(out, p.cu_seqlens_q)
        lse = pack(lse.transpose(1, 2), p.cu_seqlens_q).transpose(0, 1)       # (H, total_q)
    return out.to(p.q.dtype).contiguous(), lse.float().contiguous()


def backward(p):
    """Kernel of mmkern::attention_backward: float64 math, gradients in their inputs' dtypes.
    (`out` and `lse` are recomputed in float64 rather than read: see attention_padded_backward.)"""
    q, k, v, cu_q = p.q, p.k, p.v, p.cu_seqlens_q
    qp, kp, vp, q_lens, k_lens = _as_padded(q, k, v, cu_q, p.cu_seqlens_k, p.seqused_k, p.max_seqlen_q,
                                            p.max_seqlen_k, compute_dtype())
    if cu_q is not None:
        doutp = unpack(up(p.dout), cu_q, p.max_seqlen_q)
        dlsep = None if p.dlse is None else unpack(up(p.dlse).transpose(0, 1), cu_q,
                                                    p.max_seqlen_q).transpose(1, 2)
    else:
        doutp = up(p.dout)
        dlsep = None if p.dlse is None else up(p.dlse)
    keep = _keep_mask(p.dropout_p, p.dropout_seed, qp, kp)
    dq, dk, dv, d_mask = attention_padded_backward(doutp, qp, kp, vp, dlsep, q_lens, k_lens, p.softmax_scale,
                                                   _masking(p), p.dropout_p, keep)
    if cu_q is not None:
        dq, dk, dv = pack(dq, cu_q), pack(dk, p.cu_seqlens_k), pack(dv, p.cu_seqlens_k)
    if p.attn_mask_needs_grad and d_mask is not None:
        d_mask = d_mask.to(p.attn_mask.dtype)
    else:
        d_mask = q.new_empty((0,))
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), d_mask.contiguous()


def kvcache_append(p):
    """Kernel of mmkern::kvcache_append: cache row cache_seqlens[b] + t of sequence b = k[b, t] (same for v), in
    place; row j is k_cache[b, j] (dense) or k_cache[block_table[b, j // page], j % page] (paged)."""
    for b, start in enumerate(p.cache_seqlens.tolist()):
        for t in range(p.k.shape[1]):
            j = start + t
            page, slot = (b, j) if p.block_table is None else (int(p.block_table[b, j // p.k_cache.shape[1]]),
                                                               j % p.k_cache.shape[1])
            p.k_cache[page, slot] = p.k[b, t]
            p.v_cache[page, slot] = p.v[b, t]


def _cache_view(p):
    """The serving layouts as plain dense k/v: (k, v) (B, max valid keys, H_kv, D) holding each sequence's
    keys leftpad_k[b] .. seqused_k[b] - 1 (read through block_table when paged) from row 0, and the valid
    key counts (B,) — what the dense path below takes (oracle code: one row at a time)."""
    B, page = p.batch, p.page_size
    ends = p.seqused_k.tolist() if p.seqused_k is not None else [p.seqlen_k] * B
    starts = p.leftpad_k.tolist() if p.leftpad_k is not None else [0] * B
    lens = [e - s for s, e in zip(starts, ends)]
    k = p.k.new_zeros((B, max(lens, default=0), p.kv_heads, p.head_dim))
    v = p.v.new_zeros(k.shape)
    for b in range(B):
        for j in range(starts[b], ends[b]):
            src = (b, j) if not p.paged else (int(p.block_table[b, j // page]), j % page)
            k[b, j - starts[b]] = p.k[src]
            v[b, j - starts[b]] = p.v[src]
    return k, v, torch.tensor(lens, dtype=torch.int32, device=p.q.device)


def default_softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
