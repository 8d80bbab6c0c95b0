// C++ CPU flash attention (torch.ops.mmkern_C.cpu_attention_forward / cpu_attention_backward): what the
// forward (attention_cpu_forward.cpp) and the backward (attention_cpu_backward.cpp) share.
//
// Work decomposition. A (batch b, key/value head kvh) pair owns `group` = H / H_kv query heads; their rows are
// packed as r = i * group + g (query position i, head kvh * group + g), so a tile of rows reads each K/V block
// once for the whole group (MQA/GQA without repeating k/v, and the decode step, group x Lq rows, as one
// matrix). Rows are cut into blocks of kBlockM, keys into blocks of kBlockN; a thread holds at most one
// (kBlockM x kBlockN) float32 score tile, never S x S.
//
// A score, formed exactly as the float64 oracle forms it (mmkern/reference/attention.py):
//     s = scale * q . k                       (the GEMM, float32 accumulation)
//     s = softcap * tanh(s / softcap)         softcap > 0
//     s -= slope_h * |i + align - j|          ALiBi (bottom-right aligned positions)
//     s += mask[b, h, i, j]                   float mask; a bool mask hides where False
//     s = -inf unless  i + align - left <= j <= i + align + right  and  j < k_len
// with align = k_len - q_len (flash-attn's bottom-right alignment) or 0 (torch SDPA's top-left), right = 0
// when causal, left/right = kUnbounded for no bound.
// Dropout: Philox-4x32-10 at counter ((b * H + h) * max_seqlen_q + i) * max_seqlen_k + j, kept where the
// uniform >= p: the mask of the Triton kernels (mmkern/triton/attention_scores.py:dropout_keep), bit for bit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace mmkern::attention_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kUnbounded = int64_t{1} << 40;
constexpr int64_t kBlockM = 256;          // forward: rows per tile (packed group rows)
constexpr int64_t kBackwardBlockM = 128;  // backward: rows per tile (its 2-3 tiles of P, dS: 256 x 256 measured 10% slower)
constexpr int64_t kBlockN = 256;     // keys per tile. A 256 x 256 float32 tile is 256 KiB (L2). Measured on 2 cores, fp32 fwd
// L2048: 256 x 256 beat 128 x 256 by 0-7% (most at D128: each K/V tile is packed by the GEMM half as often) and
// 256 x 512 was within noise
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Sequence {
  int64_t q_start, q_len, k_start, k_len, align;   // offsets into the packed rows (varlen) or 0 (dense)
};

// One call, as the kernels read it. Strides are in elements; the batch stride is 0 for varlen (packed) inputs.
struct Call {
  at::ScalarType dtype;
  int64_t batch, heads, kv_heads, group, head_dim;
  int64_t q_sb, q_sr, q_sh, k_sb, k_sr, k_sh, v_sb, v_sr, v_sh;
  std::vector<Sequence> seqs;                       // one per batch entry
  float scale, softcap;                             // softcap 0 = off
  int64_t left, right;                              // window bounds, kUnbounded when none (causal: right 0)
  const float* alibi = nullptr;                     // slopes (H,) or (B, H): alibi[b * alibi_sb + h]
  int64_t alibi_sb = 0;
  int mask_kind = 0;                                // 0 none, 1 bool (True = attend), 2 float (added)
  const void* mask = nullptr;
  at::ScalarType mask_dtype = at::kFloat;
  int64_t m_sb = 0, m_sh = 0, m_sr = 0, m_sc = 0;
  float dropout_p = 0.f;
  uint64_t seed = 0;
  int64_t max_seqlen_q = 1, max_seqlen_k = 1;       // the dropout counters' row and column counts (>= 1)
  // lse (B, H, Lq) dense or (H, total_q) varlen: lse[b * lse_sb + h * lse_sh + (q_start + i) * lse_sr]
  int64_t lse_sb = 0, lse_sh = 0, lse_sr = 0;
  // Paged k/v (num_blocks, page, H_kv, D): cache row j of sequence b is row j % page of page
  // table[b * table_cols + j / page] (the block table read on the host once, checked in range). page 0 = dense.
  std::vector<int64_t> table;
  int64_t table_cols = 0, page = 0;

  bool paged() const { return page > 0; }
  // Element offset of cache row j of sequence b, head kvh, in a paged k (strides sb, sr, sh: page, row, head).
  int64_t paged_row(int64_t b, int64_t j, int64_t kvh, int64_t sb, int64_t sr, int64_t sh) const {
    return table[b * table_cols + j / page] * sb + (j % page) * sr + kvh * sh;
  }

  int64_t rows(const Sequence& s) const { return s.q_len * group; }
  // the keys [lo, hi) query position i may see (before a mask), possibly empty
  int64_t key_lo(const Sequence& s, int64_t i) const { return std::max<int64_t>(i + s.align - left, 0); }
  int64_t key_hi(const Sequence& s, int64_t i) const { return std::min<int64_t>(i + s.align + right + 1, s.k_len); }
  int64_t lse_index(int64_t b, int64_t h, const Sequence& s, int64_t i) const {
    return b * lse_sb + h * lse_sh + (s.q_start + i) * lse_sr;
  }
};

// Call from the op's arguments: checks what the op layer cannot have checked (devices, layouts, the
// cu_seqlens values against the packed lengths), reads cu_seqlens and seqused_k on the host; for a KV cache also
// block_table (paged k/v, checked within num_blocks) and leftpad_k (sequence b's keys start at cache row
// leftpad_k[b]: Sequence::k_start, and its positions count from there).
// out_like: the tensor whose layout lse follows (q).
Call make_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
               const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
               double softmax_scale, bool causal, bool bottom_right, int64_t window_left, int64_t window_right,
               double softcap, const c10::optional<at::Tensor>& alibi_slopes,
               const c10::optional<at::Tensor>& attn_mask, double dropout_p, int64_t seed,
               const c10::optional<at::Tensor>& block_table = c10::nullopt,
               const c10::optional<at::Tensor>& leftpad_k = c10::nullopt);

// A block of packed rows [r0, r1) of one (b, kvh): rows [r0, r1) hold query positions [i_first, i_last].
struct RowBlock {
  int64_t b, kvh, r0, r1;
};

// The keys any row of the block may see: [lo, hi) (empty when lo >= hi).
inline std::pair<int64_t, int64_t> block_keys(const Call& c, const Sequence& s, const RowBlock& rb) {
  const int64_t i_first = rb.r0 / c.group, i_last = (rb.r1 - 1) / c.group;
  return {c.key_lo(s, i_first), c.key_hi(s, i_last)};
}

// True when every row of the block sees every key of [j0, j1) (no per-element visibility test needed).
inline bool tile_fully_visible(const Call& c, const Sequence& s, const RowBlock& rb, int64_t j0, int64_t j1) {
  const int64_t i_first = rb.r0 / c.group, i_last = (rb.r1 - 1) / c.group;
  return c.mask_kind != 1 && j0 >= c.key_lo(s, i_last) && j1 <= c.key_hi(s, i_first);
}

// Row maximum that propagates NaN (a NaN score makes the row NaN, as in the oracle).
inline float row_max_nan(const float* s, int64_t n) {
  Vec vmax(kNegInf);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));   // propagates NaN
  float m = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) m = (std::isnan(s[j]) || std::isnan(m)) ? std::numeric_limits<float>::quiet_NaN()
                                                              : std::max(m, s[j]);
  return m;
}

// s[0..n) = e^(s - m) in place; returns the row sum (attention_cpu_exp.cpp: under 1 ulp, NaN kept, e^-inf = 0;
// AVX-512 or AVX2, chosen once per process at run time, or MMKERN_CPU_ISA=avx2).
float exp_and_sum(float* s, int64_t n, float m);

inline void scale_row(float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

inline float mask_value(const Call& c, const void* base, int64_t idx) {
  switch (c.mask_dtype) {
    case at::kFloat: return static_cast<const float*>(base)[idx];
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(base)[idx]);
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[idx]);
    case at::kDouble: return static_cast<float>(static_cast<const double*>(base)[idx]);
    default: return static_cast<const bool*>(base)[idx] ? 0.f : kNegInf;
  }
}

// Finishes a tile of raw scores s = scale * q . k in place (rows [r0, r1) of (b, kvh), keys [j0, j0 + n),
// row stride ld): softcap, ALiBi, mask, visibility, as the header says. cap_slope (same layout, or null)
// receives d(capped)/d(raw) = 1 - tanh^2(raw / softcap) for the backward.
inline void finish_scores(const Call& c, const Sequence& s, const RowBlock& rb, int64_t j0, int64_t n, float* tile,
                          int64_t ld, float* cap_slope) {
  const bool full = tile_fully_visible(c, s, rb, j0, j0 + n);
  const Vec vcap(c.softcap), vinv(c.softcap > 0 ? 1.f / c.softcap : 0.f), one(1.f);
  for (int64_t r = rb.r0; r < rb.r1; ++r) {
    float* row = tile + (r - rb.r0) * ld;
    const int64_t i = r / c.group, h = rb.kvh * c.group + r % c.group;
    if (c.softcap > 0) {
      float* slope_row = cap_slope ? cap_slope + (r - rb.r0) * ld : nullptr;
      int64_t j = 0;
      for (; j < n; j += kW) {
        const int count = static_cast<int>(std::min<int64_t>(kW, n - j));
        const Vec t = (Vec::loadu(row + j, count) * vinv).tanh();
        (t * vcap).store(row + j, count);
        if (slope_row) (one - t * t).store(slope_row + j, count);
      }
    }
    if (c.alibi != nullptr) {
      const float slope = c.alibi[rb.b * c.alibi_sb + h];
      const int64_t aligned = i + s.align;
      for (int64_t j = 0; j < n; ++j) row[j] -= slope * static_cast<float>(std::llabs(aligned - (j0 + j)));
    }
    if (c.mask_kind != 0) {
      const int64_t base = rb.b * c.m_sb + h * c.m_sh + i * c.m_sr + j0 * c.m_sc;
      if (c.mask_kind == 1) {
        const bool* m = static_cast<const bool*>(c.mask) + base;
        for (int64_t j = 0; j < n; ++j) if (!m[j * c.m_sc]) row[j] = kNegInf;
      } else if (c.mask_dtype == at::kFloat && c.m_sc == 1) {
        const float* m = static_cast<const float*>(c.mask) + base;
        int64_t j = 0;
        for (; j + kW <= n; j += kW) (Vec::loadu(row + j) + Vec::loadu(m + j)).store(row + j);
        for (; j < n; ++j) row[j] += m[j];
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] += mask_value(c, c.mask, base + j * c.m_sc);
      }
    }
    if (!full) {
      const int64_t lo = std::clamp<int64_t>(c.key_lo(s, i) - j0, 0, n);
      const int64_t hi = std::clamp<int64_t>(c.key_hi(s, i) - j0, lo, n);
      std::fill(row, row + lo, kNegInf);
      std::fill(row + hi, row + n, kNegInf);
    }
  }
}

// The dropout counter of (b, h, i, j = 0).
inline uint64_t dropout_offset(const Call& c, int64_t b, int64_t h, int64_t i) {
  return (static_cast<uint64_t>(b * c.heads + h) * c.max_seqlen_q + static_cast<uint64_t>(i)) * c.max_seqlen_k;
}

// Packed rows [r0, r1) of (b, kvh) of a (B, L, H, D) / (T, H, D) tensor `x` (dtype T) into dst (rows x D).
template <typename T>
inline void pack_rows(const Call& c, const Sequence& s, const RowBlock& rb, const T* x, int64_t sb, int64_t sr,
                      int64_t sh, T* dst) {
  for (int64_t r = rb.r0; r < rb.r1; ++r) {
    const int64_t i = r / c.group, h = rb.kvh * c.group + r % c.group;
    const T* src = x + rb.b * sb + (s.q_start + i) * sr + h * sh;
    std::copy(src, src + c.head_dim, dst + (r - rb.r0) * c.head_dim);
  }
}

// float32 -> T (round to nearest even for half types, as torch's .to()).
template <typename T>
inline void store_converted(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) std::copy(src, src + n, dst);
  else at::vec::convert(src, dst, n);
}

template <typename T>
inline void load_converted(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) std::copy(src, src + n, dst);
  else at::vec::convert(src, dst, n);
}

// Calls f.template operator()<T>() with T the C++ type of a floating dtype.
template <typename F>
inline void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, "mmkern cpu attention: q, k, v must be float32, bfloat16 or float16; got ", dtype);
  }
}

}  // namespace mmkern::attention_cpu
