"""Triton split-KV attention forward (flash-decoding) for short queries against long keys.

A decode step has Lq = 1..16 query rows per sequence: the normal forward's grid
(cdiv(Lq, BLOCK_M), batch * heads) then holds a handful of programs, each walking the whole cache,
and most of the GPU idles. Here the keys are cut into `num_splits` contiguous ranges and

- `attention_decode_split_kernel`, grid (num_splits, batch * kv_heads, row_chunks): a program owns
  one (sequence, kv head, key range) and BLOCK_M query rows of the GQA group packed together,
  row r = qi * GROUP + g (query position qi, head kv_head * GROUP + g): each K/V tile is read once
  for the whole group. It runs the forward's online softmax (base 2, see attention_scores) over
  its key range and writes a partial output and log-sum-exp:
      OutPart[split, row, head, :] = softmax over the range @ V  (float32, 0 if the range is empty)
      LsePart[split, row, head]    = log-sum-exp over the range    (-inf if empty)
- `merge_attention_splits_kernel`, grid (cdiv(rows * heads, BLOCK_R),): per (row, head)
      lse = log sum_s exp(LsePart_s),   out = sum_s exp(LsePart_s - lse) OutPart_s
  (a row whose every range is empty: out 0, lse -inf, as the normal forward).
Paged caches (PAGED: K/V (num_blocks, page_size, H_kv, D), BlockTable (B, max_blocks) int32) are read in place:
each tile's rows are found through the table, one int32 per key, so pages of any size and order cost the
same loads as a dense cache (no gathered copy). HAS_LEFTPAD: sequence b's keys start at cache row
LeftpadK[b] (flash-attn's cache_leftpad); its positions count from there.
Memory traffic: K, V once per kv head (the group shares them), plus the partials:
num_splits * rows * heads * (head_dim + 1) float32 written and read once; O(L) in every length.
"""
import triton
import triton.language as tl

from mmkern.triton.attention_scores import LOG2E, cast, dot, max_nan, row_max, score_tile, sequence_bounds


@triton.jit
def attention_decode_split_kernel(
    Q, K, V, OutPart, LsePart, Alibi, CuSeqlensQ, CuSeqlensK, SequsedK, BlockTable, LeftpadK,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ps, stride_pr, stride_ph, stride_ls, stride_lr, stride_ab, stride_bt,
    seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, split_len, page_size, num_blocks, max_blocks,
    scale, softcap, window_left, window_right, bottom_right,
    GROUP: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, FP32_DOT: tl.constexpr, PAGED: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0)
    batch = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    q_start, q_len, k_start, k_len = sequence_bounds(batch, CuSeqlensQ, CuSeqlensK, SequsedK, seqlen_q, seqlen_k,
                                                     IS_VARLEN, HAS_SEQUSED)
    if HAS_LEFTPAD:                  # dense caches only: sequence `batch` keys are cache rows [pad, seqused_k)
        pad = tl.load(LeftpadK + batch)
        k_start = pad
        k_len = k_len - pad
    r_start = tl.program_id(2) * BLOCK_M
    if r_start >= q_len * GROUP:
        return
    align = (k_len - q_len) * bottom_right

    r = r_start + tl.arange(0, BLOCK_M)
    qi = r // GROUP                                       # query position of each packed row
    head = kv_head * GROUP + r % GROUP
    row_ok = qi < q_len
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + (q_start + qi[:, None]).to(tl.int64) * stride_qm
                + head[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < head_dim),
                other=0.0)
    if PAGED:       # rows are found per tile through the block table (below); the bases hold the head only
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
    else:
        k_base = K + batch.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kn + kv_head * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vn + kv_head * stride_vh
    slope = tl.zeros((BLOCK_M, 1), tl.float32)
    if ALIBI:
        slope = (tl.load(Alibi + batch * stride_ab + head, mask=row_ok, other=0.0))[:, None]

    # this split's keys, [split_lo, split_hi), cut to what the rows can see; split_len is a multiple
    # of BLOCK_N, so tiles never straddle two splits
    split_lo = split * split_len
    split_hi = tl.minimum(split_lo + split_len, k_len)
    qi_first = r_start // GROUP
    qi_last = tl.minimum((r_start + BLOCK_M - 1) // GROUP, q_len - 1)
    lo = tl.maximum(qi_first + align - window_left, split_lo)
    lo = split_lo + ((lo - split_lo) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(qi_last + align + window_right + 1, split_hi)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + cols0
        kv_mask = (cols[:, None] < split_hi) & (dims[None, :] < head_dim)
        if PAGED:
            # cache row k_start + j of the sequence is row (k_start + j) % page_size of page
            # BlockTable[batch, (k_start + j) // page_size]; page and table indices clamped into range (on a
            # GPU nothing checks them on the host)
            row = k_start + cols
            entry = tl.minimum(row // page_size, max_blocks - 1)
            page = tl.load(BlockTable + batch.to(tl.int64) * stride_bt + entry, mask=cols < split_hi, other=0)
            page = tl.minimum(tl.maximum(page, 0), num_blocks - 1).to(tl.int64)
            slot = (row % page_size).to(tl.int64)
            k_rows = page * stride_kb + slot * stride_kn
            v_rows = page * stride_vb + slot * stride_vn
        else:
            k_rows = cols.to(tl.int64) * stride_kn
            v_rows = cols.to(tl.int64) * stride_vn
        k = tl.load(k_base + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s, _ = score_tile(q, k, qi, cols, q_len, split_hi, align, scale, softcap, slope, window_left,
                          window_right, Q, SOFTCAP, ALIBI, 0, FP32_DOT)
        m_new = max_nan(m_i, row_max(s))           # NaN scores stay in m (see the epilogue)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)     # e^(s - m); the difference first (attention_scores)
        rescale = tl.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * rescale + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + dot(cast(p, v.dtype), v, FP32_DOT)
        m_i = m_new

    # As the oracle (torch.logsumexp, softmax): l = 0 exactly, the row saw no key: out 0, lse -inf.
    # A NaN score: m and l NaN, so out and lse NaN. A +inf score (no NaN): l = NaN (e^(inf - inf)), out
    # NaN, lse +inf. Never `l > 0`, which would turn a NaN row into an empty one.
    empty = l_i == 0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = m_i + tl.log(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), tl.where(m_i == float("inf"), float("inf"), lse))
    # flat row: batch * seqlen_q + qi (dense), q_start + qi (varlen, where q_start already counts it)
    flat = (batch * seqlen_q + q_start + qi).to(tl.int64)
    o_ptrs = OutPart + split.to(tl.int64) * stride_ps + flat[:, None] * stride_pr + head[:, None] * stride_ph \
        + dims[None, :]
    tl.store(o_ptrs, out, mask=row_ok[:, None] & (dims[None, :] < head_dim))
    tl.store(LsePart + split.to(tl.int64) * stride_ls + flat * stride_lr + head, lse, mask=row_ok)


@triton.jit
def merge_attention_splits_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ps, stride_ls, stride_lb, stride_lh, stride_lm,
    rows_per_batch, total, num_heads, head_dim, num_splits,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OutPart (splits, rows, heads, head_dim) and LsePart (splits, rows, heads) float32, contiguous
    within a split; Out (rows, heads, head_dim) contiguous; Lse at (row // rows_per_batch, head,
    row % rows_per_batch) through its strides. BLOCK_R (row, head) pairs per program, head_dim in
    chunks of BLOCK_D (one compile serves every head dim)."""
    idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)        # row * num_heads + head
    ok = idx < total
    idx64 = idx.to(tl.int64)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    lse_ptrs = LsePart + idx64                # pointers step by a split's stride (no 32-bit products)
    for _ in range(num_splits):
        lse_s = tl.load(lse_ptrs, mask=ok, other=float("-inf"))
        lse_ptrs += stride_ls
        m_new = max_nan(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.exp(lse_s - m_safe)
        m = m_new
    # as the split kernel's epilogue: l = 0, every range empty: out 0, lse -inf. A range's lse NaN: m, l,
    # lse and (through the weights) out NaN. A range's lse +inf (no NaN): lse +inf, and its partial out,
    # NaN, reaches out through the weight e^(inf - inf)
    seen = l != 0
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
    lse_safe = tl.where(seen, lse, 0.0)
    lse = tl.where(m == float("inf"), float("inf"), lse)
    row = idx // num_heads
    head = idx % num_heads
    tl.store(Lse + (row // rows_per_batch).to(tl.int64) * stride_lb + head * stride_lh
             + (row % rows_per_batch).to(tl.int64) * stride_lm, lse, mask=ok)
    dims0 = tl.arange(0, BLOCK_D)
    for d_start in range(0, head_dim, BLOCK_D):
        dims = d_start + dims0
        io_mask = ok[:, None] & (dims[None, :] < head_dim)
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        lse_ptrs = LsePart + idx64
        o_ptrs = OutPart + idx64[:, None] * head_dim + dims[None, :]
        for _ in range(num_splits):
            lse_s = tl.load(lse_ptrs, mask=ok, other=float("-inf"))
            w = tl.where(seen, tl.exp(lse_s - lse_safe), 0.0)
            acc += w[:, None] * tl.load(o_ptrs, mask=io_mask, other=0.0)
            lse_ptrs += stride_ls
            o_ptrs += stride_ps
        tl.store(Out + idx64[:, None] * head_dim + dims[None, :], cast(acc, Out.dtype.element_ty), mask=io_mask)
