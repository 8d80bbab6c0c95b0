"""Triton flash attention forward: tiled online softmax; scores never leave registers.

Grid: (cdiv(max_seqlen_q, BLOCK_M), batch * heads). A program owns BLOCK_M query rows of one
(sequence, head), streams the visible key/value tiles of the matching key/value head (GQA: head
h reads kv head h // GROUP) and keeps a running max m, running sum l and the output accumulator:

    m' = max(m, rowmax(s));  l = l e^(m - m') + rowsum(e^(s - m'));  acc = acc e^(m - m') + dropout(e^(s - m')) v
    out = acc / l,  lse = m + log l         (a row that sees no key: out 0, lse -inf)

scores, m and lse in natural units, exponentiated as exp2((s - m) log2(e)) (see attention_scores).

Memory traffic per program: q once, each visible K/V tile once, out and lse once: O(L) memory,
no L x L intermediate. Dropout is applied to the probabilities that multiply V, not to l.
"""
import triton
import triton.language as tl

from mmkern.triton.attention_scores import (LOG2E, cast, dot, dropout_keep, max_nan, row_max, score_tile,
                                            sequence_bounds)


@triton.jit
def attention_forward_kernel(
    Q, K, V, Out, Lse, Mask, Alibi, CuSeqlensQ, CuSeqlensK, SequsedK,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_lm,
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
    q_ptrs = Q + batch.to(tl.int64) * stride_qb + (q_start + rows[:, None]).to(tl.int64) * stride_qm \
        + head * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=(rows[:, None] < q_len) & (dims[None, :] < head_dim), other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + kv_head * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + kv_head * stride_vh
    mask_base = Mask + batch.to(tl.int64) * stride_mb + head * stride_mh + rows[:, None].to(tl.int64) * stride_mm
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + batch * stride_ab + head)

    # keys this block of rows can see: [lo, hi)
    lo = tl.maximum(m_start + align - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M - 1 + align + window_right + 1, k_len)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + cols0
        kv_mask = (cols[:, None] < k_len) & (dims[None, :] < head_dim)
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
        s, _ = score_tile(q, k, rows, cols, q_len, k_len, align, scale, softcap, slope, window_left, window_right,
                          mask_base + cols[None, :] * stride_mn, SOFTCAP, ALIBI, MASK_KIND, FP32_DOT)
        m_new = max_nan(m_i, row_max(s))           # NaN scores stay in m (see the epilogue)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # rows that have seen nothing yet
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)     # e^(s - m); the difference first (attention_scores)
        rescale = tl.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * rescale + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, batch_head, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + dot(cast(p, v.dtype), v, FP32_DOT)
        m_i = m_new

    # As the oracle (torch.logsumexp, softmax): l = 0 exactly, the row saw no key: out 0, lse -inf.
    # A NaN score: m and l NaN, so out and lse NaN. A +inf score (no NaN): l = NaN (e^(inf - inf)), out
    # NaN, lse +inf. Never `l > 0`, which would turn a NaN row into an empty one.
    empty = l_i == 0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = m_i + tl.log(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), tl.where(m_i == float("inf"), float("inf"), lse))
    o_ptrs = Out + batch.to(tl.int64) * stride_ob + (q_start + rows[:, None]).to(tl.int64) * stride_om \
        + head * stride_oh + dims[None, :]
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty), mask=(rows[:, None] < q_len) & (dims[None, :] < head_dim))
    l_ptrs = Lse + batch.to(tl.int64) * stride_lb + head * stride_lh + (q_start + rows).to(tl.int64) * stride_lm
    tl.store(l_ptrs, lse, mask=rows < q_len)
