"""Triton building blocks shared by the attention forward and backward kernels.

One tile of scores is recomputed in four places (forward, split-KV decode, dK/dV, dQ); `score_tile`
is the single definition of what a score is, so they can never disagree:

    s = scale * q k^T                                 (BLOCK_M, BLOCK_N), float32 accumulation
    s = softcap * tanh(s / softcap)                   if SOFTCAP
    s -= slope * |row + align - col|                  if ALIBI (bottom-right aligned positions)
    s += mask (MASK_KIND 2, float) / hide where mask is False (MASK_KIND 1, bool)
    s = -inf where the key is not visible: col >= k_len, row >= q_len, or outside the window
        [row + align - window_left, row + align + window_right]   (causal: window_right = 0)

Scores are in natural units everywhere, formed exactly as the float64 oracle forms them (scale
times the dot, then softcap, ALiBi, mask), so the forward's lse and the backward's recomputed
p = exp(s - lse) describe the same numbers. The online softmax still exponentiates with exp2 (one
MUFU instruction): exp(s - m) = exp2((s - m) log2(e)), a subtraction and a multiply per score; the max and
the lse stay natural (lse = m + ln l, as torch.logsumexp). Not FlashAttention's single fused multiply-add
s log2(e) - m log2(e): scores near -FLT_MAX are finite (the float masks of transformers 4.x add
torch.finfo(float32).min to every hidden key, and a query that sees no real key has only such scores), and
m log2(e) overflows to -inf there, so that row gave -inf - (-inf) = NaN where torch's SDPA gives the
uniform average; s - m is exact for such a row (Sterbenz) and never overflows when m is finite. Folding
log2(e) into the scale instead (base-2 scores) rounded scale log2(e) once for all scores of a row:
a shared relative error that the backward's conversion of lse back to base 2 did not cancel, and
that dV, dK and dQ summed coherently (fp32 errors above 2x eager's: issue 3, part C).

`align` is k_len - q_len for flash-attn's bottom-right alignment, 0 for torch SDPA's top-left.
Unbounded windows arrive as a large number (UNBOUNDED), so the window test needs no branches.
"""
import triton
import triton.language as tl

from mmkern.triton._common import INTERPRETING

UNBOUNDED = 1 << 30
LOG2E = tl.constexpr(1.4426950408889634)    # exp(x) = exp2(x log2(e))


# Triton's interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest even (DESIGN.md): under it
# (only) `cast` rounds the bits first, so CPU tests see the GPU's bf16 operands and outputs.
ROUND_BF16 = tl.constexpr(INTERPRETING)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """float32 x in `dtype` (an operand of a 16-bit dot, or what a kernel stores), rounded to nearest even."""
    if ROUND_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with float32 accumulation. FP32_DOT: multiply in IEEE float32 (float32 inputs, and
    bfloat16 under the interpreter, whose bf16 tl.dot is wrong: triton-lang/triton#11584)."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def tanh_and_slope(x):
    """(tanh x, 1 - tanh^2 x), float32, both to a few ulps for every x (NaN stays NaN), with tl
    arithmetic only (no libdevice: the same code on every Triton version and the interpreter).

    |x| < 0.55: tanh x = x + x^3 P(x^2), P a degree-4 fit (relative error 1e-9 < float32's 6e-8), so
    tiny x keeps full precision (2 sigmoid(2x) - 1 or (e^2x - 1)/(e^2x + 1) cancel: ~6e-8/|x|).
    |x| >= 0.55: e = exp(-2|x|) <= 0.33, tanh |x| = (1 - e)/(1 + e) without cancellation, and
    1 - tanh^2 = 4e/(1 + e)^2, accurate where 1 - t*t would cancel (|x| large, the saturated slope)."""
    y = x * x
    p = -0.0062824757769703865
    p = p * y + 0.021077759563922882
    p = p * y - 0.05385385826230049
    p = p * y + 0.13332602381706238
    p = p * y - 0.33333319425582886
    small = x + x * y * p
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)        # exp(-2|x|), 2 log2(e) folded
    r = 1.0 / (1.0 + e)
    big = (1.0 - e) * r
    big = tl.where(x < 0, -big, big)
    is_small = tl.abs(x) < 0.55
    t = tl.where(is_small, small, big)
    slope = tl.where(is_small, 1.0 - small * small, 4.0 * e * r * r)
    return t, slope


@triton.jit
def max_nan(a, b):
    """max that propagates NaN (max.NaN.f32, as cheap as max.f32): tl.maximum's default drops NaN on a GPU
    (maxnum) but keeps it under the interpreter (numpy), and NaN rows must behave the same on both."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_max(s):
    """(BLOCK_M,) row maximum of a score tile, NaN if any score of the row is NaN (see max_nan)."""
    return tl.reduce(s, 1, max_nan)


@triton.jit
def score_tile(q, k, rows, cols, q_len, k_len, align, scale, softcap, slope, window_left, window_right, mask_ptrs,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, FP32_DOT: tl.constexpr):
    """q (BLOCK_M, BLOCK_D), k (BLOCK_N, BLOCK_D), rows (BLOCK_M,), cols (BLOCK_N,); slope a scalar, or
    (BLOCK_M, 1) per row. Returns (s, cap_slope): masked float32 scores (natural units), and the
    softcap's derivative d(capped)/d(raw) = 1 - tanh^2(raw / softcap) for the backward (s itself
    without SOFTCAP; unused)."""
    s = dot(q, tl.trans(k), FP32_DOT) * scale
    cap_slope = s
    if SOFTCAP:
        tanh_s, cap_slope = tanh_and_slope(s / softcap)
        s = softcap * tanh_s
    aligned = rows[:, None] + align                       # the key position each query row lines up with
    if ALIBI:
        s -= slope * tl.abs(aligned - cols[None, :]).to(tl.float32)
    in_bounds = (rows[:, None] < q_len) & (cols[None, :] < k_len)
    visible = in_bounds & (cols[None, :] <= aligned + window_right) & (cols[None, :] >= aligned - window_left)
    if MASK_KIND == 1:
        visible &= tl.load(mask_ptrs, mask=in_bounds, other=0) != 0
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    s = tl.where(visible, s, float("-inf"))
    return s, cap_slope


@triton.jit
def dropout_keep(seed, batch_head, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p):
    """(BLOCK_M, BLOCK_N) bool keep mask from Philox (tl.rand) at 64-bit counters
    ((batch * H + head) * max_seqlen_q + row) * max_seqlen_k + col: the same numbers in the
    forward, both backward kernels and `dropout_mask` (the test path)."""
    offsets = (batch_head.to(tl.int64) * max_seqlen_q + rows[:, None].to(tl.int64)) * max_seqlen_k \
        + cols[None, :].to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def sequence_bounds(batch, cu_seqlens_q, cu_seqlens_k, seqused_k, seqlen_q, seqlen_k,
                    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence `batch`: packed offsets for varlen, else 0 and
    the dense lengths (k_len from seqused_k for the KV cache)."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + batch)
        q_len = tl.load(cu_seqlens_q + batch + 1) - q_start
        k_start = tl.load(cu_seqlens_k + batch)
        k_len = tl.load(cu_seqlens_k + batch + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
        if HAS_SEQUSED:
            k_len = tl.load(seqused_k + batch)
    return q_start, q_len, k_start, k_len
