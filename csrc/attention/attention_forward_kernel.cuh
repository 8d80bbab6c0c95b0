// Flash attention forward on tensor cores (sm_80+: mma.sync m16n8k16, ldmatrix, cp.async). The kernel;
// attention_forward.cu holds the host code (checks, launch) and its registration.
//
// One CTA per (query tile of kBlockM = 64 rows, head, batch); 4 warps, warp w owns query rows 16w..16w+15 of
// the tile. Per CTA:
//   Q tile (64 x D) -> shared memory once (cp.async);
//   for each key block j of kBlockN = 64 keys (only the blocks some row of the tile may see: causal tiles stop
//   at the diagonal):
//       K_j, V_j -> shared memory, double-buffered (kStages = 2): block j+1 is in flight while j is computed;
//       S = Q K_j^T                  (16 x 64 per warp, fp32 in registers: 8 n-blocks x 4 floats per lane)
//       S *= scale * log2(e); masked entries (key >= Lk, or above the causal diagonal) = -inf
//       online softmax in base 2:    m' = max(m, rowmax S);  P = 2^(S - m');  l = l * 2^(m - m') + rowsum P;
//                                    O *= 2^(m - m')
//       O += P V_j                   (P rounded to the input dtype straight from the S accumulators: the C
//                                    fragments of two n-blocks are the A fragment of one k-step, see
//                                    mma_primitives.cuh; V_j read with ldmatrix.trans)
//   out = O / l (0 when l = 0: a row that sees no key);  lse = (m + log2 l) * ln 2: see row_lse for the rows
//   whose l is 0 or NaN (the numerics contract of mmkern/ops/attention_problem.py).
// Global memory traffic per CTA: Q and out once (64 x D each), K and V once per visited key block: the S x S
// score matrix never leaves registers.
//
// Head dims 64, 96, 128: the MMA runs D / 16 k-steps of 16 (96: 6 steps, no padding in the arithmetic); the
// shared-memory rows are padded to a multiple of 64 elements (96 -> 128) so that the XOR swizzle (which
// permutes 16-byte chunks within groups of 8) stays inside the row. Registers per lane: O accumulators D / 2
// floats, S 32 floats; Q fragments are re-read from shared memory each key block (ldmatrix, cheap) rather
// than held, which keeps D = 128 well under the 255-register limit without spills.
//
// Sequences: dense (B, Lq, H, D) / (B, Lk, H_kv, D) with free batch/row/head strides (last dim contiguous),
// or varlen packed (total, H, D) with cu_seqlens offsets; seqused_k caps the keys of sequence b (KV cache).
// GQA/MQA: query head h reads key/value head h / (H / H_kv). Causal is bottom-right aligned: query i sees key
// j iff j <= i + Lk - Lq.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/mma_primitives.cuh"

namespace mmkern::attention {

// lse of a row from its running max m (base-2 scaled scores) and sum l, per the numerics contract:
//   l > 0    a normal row:                        (m + log2 l) * ln 2
//   l == 0   the row saw no key:                  -inf (its out is 0)
//   l NaN    a NaN score (fmaxf skips NaN, so m stays finite; 2^(NaN - m) = NaN)  -> NaN;
//            or a +inf score (m = +inf, 2^(inf - inf) = NaN)                     -> +inf.
//            (A row with both gives +inf; its out is NaN either way: O * (1 / l) with l NaN.)
__device__ __forceinline__ float row_lse(float m, float l) {
  if (l > 0.f) return m * 0.69314718055994531f + logf(l);
  if (l == 0.f) return -INFINITY;
  return m == INFINITY ? INFINITY : __int_as_float(0x7fffffff);
}

namespace mma = mmkern::cuda::mma;

struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* cu_seqlens_q;   // (B + 1,) or nullptr (dense)
  const int32_t* cu_seqlens_k;
  const int32_t* seqused_k;      // (B,) or nullptr
  // strides in elements; varlen tensors have batch stride 0 (rows are found through cu_seqlens)
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;   // lse[b, h, row]: dense (H Lq, Lq), varlen (0, total_q)
  int seqlen_q, seqlen_k;                      // dense lengths (varlen: unused)
  int group;                                   // H / H_kv
  float scale_log2;                            // softmax_scale * log2(e)
  bool causal;
};

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 2;

// Shared-memory row length (elements) of a head dim: padded to whole 128-byte swizzle groups.
constexpr int row_elems(int head_dim) { return (head_dim + 63) / 64 * 64; }

// Dynamic shared memory of one CTA: Q tile + kStages K tiles + kStages V tiles, 16-bit elements.
constexpr int forward_smem_bytes(int head_dim) { return (1 + 2 * kStages) * kBlockN * row_elems(head_dim) * 2; }

// Copies a rows x kD tile starting at global row `row0` (rows >= `rows` are zero-filled) into a swizzled
// shared tile, 16 bytes per cp.async; all kThreads threads take part.
template <typename E, int kD, int kRows>
__device__ __forceinline__ void load_tile(E* smem, const E* base, int64_t row_stride, int row0, int rows) {
  constexpr int kChunks = kD / 8;                       // 16-byte chunks per row
  constexpr int kRowElems = row_elems(kD);
  static_assert(kRows * kChunks % kThreads == 0, "whole rounds of 16-byte copies");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int c = i * kThreads + static_cast<int>(threadIdx.x);
    const int r = c / kChunks, ch = c % kChunks;
    const bool valid = row0 + r < rows;
    const E* src = valid ? base + static_cast<int64_t>(row0 + r) * row_stride + ch * 8 : base;
    mma::cp_async_16(mma::smem_u32(smem + mma::swizzle<kRowElems>(r, ch * 8)), src, valid);
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const ForwardParams p) {
  using E = typename T::Element;
  constexpr int kRowElems = row_elems(kD);
  constexpr int kSteps = kD / 16;          // k-steps of S = Q K^T; also 16-wide d blocks of O
  constexpr int kNBlocks = kBlockN / 8;    // 8-key n-blocks of S per warp
  constexpr int kDBlocks = kD / 8;         // 8-wide d blocks of O per warp
  static_assert(kD % 16 == 0 && kBlockM == kWarps * 16 && kBlockM == kBlockN, "tile shape");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  E* sQ = reinterpret_cast<E*>(smem_raw);
  E* sK = sQ + kBlockM * kRowElems;                     // [kStages][kBlockN][kRowElems]
  E* sV = sK + kStages * kBlockN * kRowElems;

  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  // ---- this sequence's rows
  int q_start = 0, q_len = p.seqlen_q, k_start = 0, k_len = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    q_start = p.cu_seqlens_q[batch];
    q_len = p.cu_seqlens_q[batch + 1] - q_start;
    k_start = p.cu_seqlens_k[batch];
    k_len = p.cu_seqlens_k[batch + 1] - k_start;
  }
  if (p.seqused_k != nullptr) k_len = max(0, min(k_len, p.seqused_k[batch]));
  const int m0 = m_block * kBlockM;
  if (m0 >= q_len) return;                 // varlen: a tile past this sequence's end
  const int diagonal = k_len - q_len;      // causal: query i sees keys j <= i + diagonal

  const int kv_head = head / p.group;
  const E* q_base = static_cast<const E*>(p.q) + batch * p.q_batch_stride +
                    static_cast<int64_t>(q_start) * p.q_row_stride + head * p.q_head_stride;
  const E* k_base = static_cast<const E*>(p.k) + batch * p.k_batch_stride +
                    static_cast<int64_t>(k_start) * p.k_row_stride + kv_head * p.k_head_stride;
  const E* v_base = static_cast<const E*>(p.v) + batch * p.v_batch_stride +
                    static_cast<int64_t>(k_start) * p.v_row_stride + kv_head * p.v_head_stride;

  // ---- key blocks this tile may see: all of them, or (causal) up to the last row's diagonal
  int n_blocks = (k_len + kBlockN - 1) / kBlockN;
  if (p.causal) {
    const int last_key = m0 + kBlockM - 1 + diagonal;
    n_blocks = min(n_blocks, last_key < 0 ? 0 : last_key / kBlockN + 1);
  }

  float o[kDBlocks][4];
#pragma unroll
  for (int i = 0; i < kDBlocks; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};   // rows g and g + 8 of the warp, base-2 scaled scores
  float row_sum[2] = {0.f, 0.f};               // this lane's partial sums (its 2 columns of each n-block)

  if (n_blocks > 0) {
    load_tile<E, kD, kBlockM>(sQ, q_base, p.q_row_stride, m0, q_len);
    load_tile<E, kD, kBlockN>(sK, k_base, p.k_row_stride, 0, k_len);
    load_tile<E, kD, kBlockN>(sV, v_base, p.v_row_stride, 0, k_len);
    mma::cp_async_commit();
  }

  const int row_lo = m0 + warp * 16 + g;       // sequence index of this lane's first row (second: + 8)

  for (int j = 0; j < n_blocks; ++j) {
    // prefetch block j + 1 into the other stage (its previous contents were consumed in iteration j - 1,
    // which ended with a barrier), then wait for block j (the older group)
    if (j + 1 < n_blocks) {
      const int stage = (j + 1) % kStages;
      load_tile<E, kD, kBlockN>(sK + stage * kBlockN * kRowElems, k_base, p.k_row_stride, (j + 1) * kBlockN, k_len);
      load_tile<E, kD, kBlockN>(sV + stage * kBlockN * kRowElems, v_base, p.v_row_stride, (j + 1) * kBlockN, k_len);
    }
    mma::cp_async_commit();                    // (possibly empty group: keeps the count uniform)
    mma::cp_async_wait<1>();
    __syncthreads();

    const E* sKj = sK + (j % kStages) * kBlockN * kRowElems;
    const E* sVj = sV + (j % kStages) * kBlockN * kRowElems;

    // ---- S = Q K_j^T: 16 x 64 per warp
    float s[kNBlocks][4];
#pragma unroll
    for (int i = 0; i < kNBlocks; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t a[4];
      mma::ldmatrix_x4(a, mma::smem_u32(sQ + mma::ldmatrix_a_offset<kRowElems>(warp * 16, ks * 16, lane)));
#pragma unroll
      for (int np = 0; np < kNBlocks / 2; ++np) {
        uint32_t b[4];
        mma::ldmatrix_x4(b, mma::smem_u32(sKj + mma::ldmatrix_b_offset<kRowElems>(np * 16, ks * 16, lane)));
        mma::mma_m16n8k16<T>(s[2 * np], a, b[0], b[1]);
        mma::mma_m16n8k16<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }

    // ---- scale to base 2, mask (only blocks that straddle Lk or the diagonal need it)
    const int n0 = j * kBlockN;
    const bool needs_mask = n0 + kBlockN > k_len || (p.causal && n0 + kBlockN - 1 > m0 + diagonal);
#pragma unroll
    for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float x = s[nb][c] * p.scale_log2;
        if (needs_mask) {
          const int key = n0 + nb * 8 + 2 * t + (c & 1);
          const int row = row_lo + (c >> 1) * 8;
          if (key >= k_len || (p.causal && key > row + diagonal)) x = -INFINITY;
        }
        s[nb][c] = x;
      }
    }

    // ---- online softmax (base 2), rows g (c = 0, 1) and g + 8 (c = 2, 3)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = row_max[rr];
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * rr], s[nb][2 * rr + 1]));
      mx = mma::quad_max(mx);
      // a row that has seen only masked keys keeps max -inf: subtract 0 instead (2^-inf = 0, never NaN)
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = mma::fast_exp2(row_max[rr] - base);
      row_max[rr] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kNBlocks; ++nb) {
        s[nb][2 * rr] = mma::fast_exp2(s[nb][2 * rr] - base);
        s[nb][2 * rr + 1] = mma::fast_exp2(s[nb][2 * rr + 1] - base);
        sum += s[nb][2 * rr] + s[nb][2 * rr + 1];
      }
      row_sum[rr] = row_sum[rr] * alpha + sum;
#pragma unroll
      for (int db = 0; db < kDBlocks; ++db) {
        o[db][2 * rr] *= alpha;
        o[db][2 * rr + 1] *= alpha;
      }
    }

    // ---- O += P V_j: P's k-step kk is n-blocks 2kk, 2kk + 1 of S
#pragma unroll
    for (int kk = 0; kk < kNBlocks / 2; ++kk) {
      const uint32_t a[4] = {mma::pack_floats<T>(s[2 * kk][0], s[2 * kk][1]),
                             mma::pack_floats<T>(s[2 * kk][2], s[2 * kk][3]),
                             mma::pack_floats<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             mma::pack_floats<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kSteps; ++dp) {
        uint32_t b[4];
        mma::ldmatrix_x4_trans(b, mma::smem_u32(sVj + mma::ldmatrix_bt_offset<kRowElems>(kk * 16, dp * 16, lane)));
        mma::mma_m16n8k16<T>(o[2 * dp], a, b[0], b[1]);
        mma::mma_m16n8k16<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();                           // stage j % kStages is refilled by iteration j + 1's prefetch
  }
  mma::cp_async_wait<0>();                     // no copy may still target shared memory when the CTA exits

  // ---- epilogue: out = O / l in the input dtype (pairs of columns per lane), lse per row
  E* out_base = static_cast<E*>(p.out) + batch * p.o_batch_stride + static_cast<int64_t>(q_start) * p.o_row_stride +
                head * p.o_head_stride;
  float* lse_base = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + q_start;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float l = mma::quad_sum(row_sum[rr]);
    const int row = row_lo + rr * 8;
    if (row >= q_len) continue;
    const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : l);   // 0: no key seen; l NaN: out NaN (row_lse)
    E* out_row = out_base + static_cast<int64_t>(row) * p.o_row_stride + 2 * t;
#pragma unroll
    for (int db = 0; db < kDBlocks; ++db) {
      *reinterpret_cast<uint32_t*>(out_row + db * 8) =
          mma::pack_floats<T>(o[db][2 * rr] * inv, o[db][2 * rr + 1] * inv);
    }
    if (t == 0) lse_base[row] = row_lse(row_max[rr], l);
  }
}

}  // namespace mmkern::attention
