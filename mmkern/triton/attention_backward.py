"""Triton flash attention backward: two kernels, no atomics, so every run gives the same bits.

Both recompute the probabilities from the forward's log-sum-exp instead of storing them:
    p = exp(s - lse)                       (natural units, as the oracle; 0 where lse = -inf)
    dV = dropout(p)^T dO                   dP = dropout(dO V^T)
    dS = p (dP - delta),  delta = rowsum(dO * O) - dlse
    dS *= 1 - tanh^2                       (softcap, from score_tile; the additive mask's gradient is dS before this)
    dQ = scale dS K                        dK = scale dS^T Q

- `attention_dkdv_kernel`, grid (cdiv(max_seqlen_k, BLOCK_N), batch * kv_heads): a program owns
  one key/value tile, keeps dK, dV in registers, and walks the query tiles that can see it for
  every query head of its GQA group (so the group sum needs no atomics). It also writes the
  mask gradient, each element exactly once.
- `attention_dq_kernel`, grid (cdiv(max_seqlen_q, BLOCK_M), batch * heads): a program owns one
  query tile and walks the key tiles it can see, like the forward.
Memory traffic: Q, dO, K, V read once per visiting tile pair; no L x L intermediate.
"""
import triton
import triton.language as tl

from mmkern.triton.attention_scores import cast, dot, dropout_keep, score_tile, sequence_bounds


@triton.jit
def _probabilities(s, lse):
    """p = exp(s - lse), s from score_tile (natural units), as the oracle forms it: the
    difference first (error ~eps |lse|, once), then exp. 0 in rows that see no key (lse = -inf); a NaN
    or +inf lse (a NaN / +inf score in the forward) gives NaN, as the oracle's."""
    seen = lse != float("-inf")
    return tl.where(seen[:, None], tl.exp(s - tl.where(seen, lse, 0.0)[:, None]), 0.0)


@triton.jit
def attention_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, DMask, Alibi, CuSeqlensQ, CuSeqlensK, SequsedK,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dmb, stride_dmh, stride_dmm, stride_dmn, stride_ab,
    seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim,
    scale, softcap, window_left, window_right, bottom_right, dropout_p, seed,
    GROUP: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    batch = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    q_start, q_len, k_start, k_len = sequence_bounds(batch, CuSeqlensQ, CuSeqlensK, SequsedK, seqlen_q, seqlen_k,
                                                     IS_VARLEN, HAS_SEQUSED)
    n_start = pid_n * BLOCK_N
    if n_start >= k_len:
        return
    align = (k_len - q_len) * bottom_right
    cols = n_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    rows0 = tl.arange(0, BLOCK_M)
    kv_mask = (cols[:, None] < k_len) & (dims[None, :] < head_dim)
    k = tl.load(K + batch.to(tl.int64) * stride_kb + (k_start + cols[:, None]).to(tl.int64) * stride_kn
                + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + (k_start + cols[:, None]).to(tl.int64) * stride_vn
                + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)

    # query rows that can see this key tile: [lo, hi)
    lo = tl.maximum(n_start - align - window_right, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(n_start + BLOCK_N - 1 - align + window_left + 1, q_len)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        batch_head = batch * num_heads + head
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + batch * stride_ab + head)
        q_base = Q + batch.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qm + head * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dom + head * stride_doh
        stat_base = batch.to(tl.int64) * stride_lb + head * stride_lh + q_start.to(tl.int64) * stride_lm
        for m_start in range(lo, hi, BLOCK_M):
            rows = m_start + rows0
            row_mask = (rows[:, None] < q_len) & (dims[None, :] < head_dim)
            q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qm + dims[None, :], mask=row_mask, other=0.0)
            do = tl.load(do_base + rows[:, None].to(tl.int64) * stride_dom + dims[None, :], mask=row_mask, other=0.0)
            lse = tl.load(Lse + stat_base + rows * stride_lm, mask=rows < q_len, other=float("-inf"))
            delta = tl.load(Delta + stat_base + rows * stride_lm, mask=rows < q_len, other=0.0)
            mask_ptrs = Mask + batch.to(tl.int64) * stride_mb + head * stride_mh \
                + rows[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn
            s, cap_slope = score_tile(q, k, rows, cols, q_len, k_len, align, scale, softcap, slope, window_left,
                                   window_right, mask_ptrs, SOFTCAP, ALIBI, MASK_KIND, FP32_DOT)
            p = _probabilities(s, lse)
            dp = dot(do, tl.trans(v), FP32_DOT)
            if DROPOUT:
                keep = dropout_keep(seed, batch_head, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p)
                p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                p_dropped = p
            dv += dot(tl.trans(cast(p_dropped, do.dtype)), do, FP32_DOT)
            ds = p * (dp - delta[:, None])
            if MASK_GRAD:
                dm_ptrs = DMask + batch.to(tl.int64) * stride_dmb + head * stride_dmh \
                    + rows[:, None].to(tl.int64) * stride_dmm + cols[None, :] * stride_dmn
                tl.store(dm_ptrs, cast(ds, DMask.dtype.element_ty),
                         mask=(rows[:, None] < q_len) & (cols[None, :] < k_len))
            if SOFTCAP:
                ds = ds * cap_slope
            dk += dot(tl.trans(cast(ds, q.dtype)), q, FP32_DOT)

    dk_ptrs = DK + batch.to(tl.int64) * stride_dkb + (k_start + cols[:, None]).to(tl.int64) * stride_dkn \
        + kv_head * stride_dkh + dims[None, :]
    dv_ptrs = DV + batch.to(tl.int64) * stride_dvb + (k_start + cols[:, None]).to(tl.int64) * stride_dvn \
        + kv_head * stride_dvh + dims[None, :]
    tl.store(dk_ptrs, cast(dk * scale, DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, cast(dv, DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def attention_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Mask, Alibi, CuSeqlensQ, CuSeqlensK, SequsedK,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_lb, stride_lh, stride_lm, stride_dqb, stride_dqm, stride_dqh,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ab,
    seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, num_heads, head_dim,
    scale, softcap, window_left, window_right, bottom_right, dropout_p, seed,
    GROUP: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // GROUP
    q_start, q_len, k_start, k_len = sequence_bounds(batch, CuSeqlensQ, CuSeqlensK, SequsedK, seqlen_q, seqlen_k,
                                                     IS_VARLEN, HAS_SEQUSED)
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    align = (k_len - q_len) * bottom_right
    rows = m_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    row_mask = (rows[:, None] < q_len) & (dims[None, :] < head_dim)
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + (q_start + rows[:, None]).to(tl.int64) * stride_qm
                + head * stride_qh + dims[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + (q_start + rows[:, None]).to(tl.int64) * stride_dom
                 + head * stride_doh + dims[None, :], mask=row_mask, other=0.0)
    stat_ptrs = batch.to(tl.int64) * stride_lb + head * stride_lh + (q_start + rows).to(tl.int64) * stride_lm
    lse = tl.load(Lse + stat_ptrs, mask=rows < q_len, other=float("-inf"))
    delta = tl.load(Delta + stat_ptrs, mask=rows < q_len, other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + kv_head * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + kv_head * stride_vh
    mask_base = Mask + batch.to(tl.int64) * stride_mb + head * stride_mh + rows[:, None].to(tl.int64) * stride_mm
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + batch * stride_ab + head)

    lo = tl.maximum(m_start + align - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M - 1 + align + window_right + 1, k_len)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + cols0
        kv_mask = (cols[:, None] < k_len) & (dims[None, :] < head_dim)
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        s, cap_slope = score_tile(q, k, rows, cols, q_len, k_len, align, scale, softcap, slope, window_left,
                               window_right, mask_base + cols[None, :] * stride_mn, SOFTCAP, ALIBI, MASK_KIND,
                               FP32_DOT)
        p = _probabilities(s, lse)
        dp = dot(do, tl.trans(v), FP32_DOT)
        if DROPOUT:
            keep = dropout_keep(seed, batch_head, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * cap_slope
        dq += dot(cast(ds, k.dtype), k, FP32_DOT)
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + (q_start + rows[:, None]).to(tl.int64) * stride_dqm
             + head * stride_dqh + dims[None, :], cast(dq * scale, DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def dropout_mask_kernel(Keep, seed, max_seqlen_q, max_seqlen_k, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The test path: Keep (B * H, max_seqlen_q, max_seqlen_k) bool, the very mask the kernels use."""
    batch_head = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, batch_head, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p)
    ptrs = Keep + (batch_head.to(tl.int64) * max_seqlen_q + rows[:, None]) * max_seqlen_k + cols[None, :]
    tl.store(ptrs, keep, mask=(rows[:, None] < max_seqlen_q) & (cols[None, :] < max_seqlen_k))


@triton.jit
def backward_delta_kernel(
    DO, Out, DLse, Delta,
    stride_dob, stride_dom, stride_doh, stride_lb, stride_lh, stride_lm, stride_dlb, stride_dlh, stride_dlm,
    rows_per_batch, total, num_heads, head_dim,
    HAS_DLSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The backward's preprocess: Delta = rowsum(dO * O) - dLse, float32, laid out like lse.

    Grid (cdiv(rows * heads, BLOCK_R),): BLOCK_R (row, head) pairs per program, row r of the flat
    (batch * seqlen_q or total_q) rows sitting at (r // rows_per_batch, head, r % rows_per_batch) of
    lse; head_dim in chunks of BLOCK_D (one compile serves every head dim). Out is contiguous
    (rows, heads, head_dim); dO through its (batch, row, head) strides (batch stride 0 for varlen).
    Memory traffic: dO and O read once, Delta written once."""
    idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)        # row * num_heads + head
    ok = idx < total
    row = idx // num_heads
    head = idx % num_heads
    batch = (row // rows_per_batch).to(tl.int64)
    pos = (row % rows_per_batch).to(tl.int64)
    do_rows = DO + batch * stride_dob + pos * stride_dom + head * stride_doh
    o_rows = Out + idx.to(tl.int64) * head_dim
    dims0 = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for d_start in range(0, head_dim, BLOCK_D):
        dims = d_start + dims0
        io_mask = ok[:, None] & (dims[None, :] < head_dim)
        do = tl.load(do_rows[:, None] + dims[None, :], mask=io_mask, other=0.0).to(tl.float32)
        o = tl.load(o_rows[:, None] + dims[None, :], mask=io_mask, other=0.0).to(tl.float32)
        acc += do * o
    delta = tl.sum(acc, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + batch * stride_dlb + head * stride_dlh + pos * stride_dlm, mask=ok, other=0.0)
    tl.store(Delta + batch * stride_lb + head * stride_lh + pos * stride_lm, delta, mask=ok)
