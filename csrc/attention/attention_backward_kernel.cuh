// Device side of the CUDA flash attention backward (csrc/attention/attention_backward.cu is the host side).
//
// Three kernels, no atomics (every run gives the same bits, deterministic or not):
//   attention_bwd_delta_kernel  delta = rowsum(dO * O) - dlse, float32, laid out like lse. One warp per (row, head).
//   attention_bwd_dkdv_kernel   one block per (key tile of Tiles<D>::kDkdvN = 64 keys, batch, kv head). Warp w owns
//                               key rows [16w, 16w + 16) of the tile and keeps their dK, dV (16 x D, fp32) in
//                               registers; the block walks the query tiles (kDkdvM rows) that can see the key tile,
//                               for every query head of the GQA group (the group sum needs no atomics):
//                                 S^T  = K Q^T             (16 x kDkdvM per warp)
//                                 P^T  = exp2(S^T scale log2e - lse log2e)      (0 where masked or lse = -inf)
//                                 dP^T = V dO^T
//                                 dV  += P^T dO
//                                 dS^T = P^T (dP^T - delta)
//                                 dK  += dS^T Q            (times scale at the end)
//   attention_bwd_dq_kernel     one block per (query tile of kDqM = 64 rows, batch, head); warp w owns query rows
//                               [16w, 16w + 16) and keeps dQ (16 x D) in registers; walks the key tiles (kDqN
//                               keys) it sees: S = Q K^T, P, dP = dO V^T, dS = P (dP - delta), dQ += dS K (x scale)
// Causal (bottom-right: query i sees key j iff j <= i + k_len - q_len) skips the tiles nobody sees: the dK/dV
// kernel starts at the first query tile that sees its key tile, the dQ kernel stops after the last key tile its
// queries see; the mask is applied elementwise inside the tiles (with the sequence bounds).
// Memory traffic: K, V read once per key tile and Q, dO, lse, delta once per visiting (query tile, key tile) pair in
// the dK/dV kernel; the converse in the dQ kernel. No L x L intermediate, nothing but dq/dk/dv written.
//
// Matrix products: mma.sync.aligned.m16n8k16 (fp16 / bf16 in, fp32 accumulate), operands from shared memory by
// ldmatrix (.trans where the stored tile is the transpose of the operand), P^T and dS^T fed from the accumulator
// registers (the C fragments of two adjacent n8 tiles, rounded to 16 bits, are the A fragment of one k16 step).
// The fragment layouts and the ldmatrix lane/register mapping are stated in mma_primitives.cuh (PTX ISA).
// Shared tiles are row-major (rows, D) with each row padded by 16 bytes (mma_primitives.cuh's XOR swizzle needs
// rows of a multiple of 64 elements; padding serves D = 96 too): the 8 row addresses of one ldmatrix matrix then
// fall in 8 different 16-byte bank groups (row strides 36, 52, 68 words for D = 64, 96, 128: 4r, 20r, 4r mod 32
// distinct for r < 8), so the reads have no bank conflicts. Tiles are filled with cp.async (16-byte copies,
// zero-filled past the sequence end) into two buffers: the next tile streams in while the current one is multiplied.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/mma_primitives.cuh"

namespace mmkern::attention::bwd {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------ primitives
// mma.sync, ldmatrix, cp.async and packing come from mma_primitives.cuh (shared with the forward); the lane-address
// patterns are restated here for the padded tiles.

using mmkern::cuda::mma::Bf16;
using mmkern::cuda::mma::Fp16;
using mmkern::cuda::mma::cp_async_16;
using mmkern::cuda::mma::cp_async_commit;
using mmkern::cuda::mma::cp_async_wait;
using mmkern::cuda::mma::fast_exp2;
using mmkern::cuda::mma::ldmatrix_x4;
using mmkern::cuda::mma::ldmatrix_x4_trans;
using mmkern::cuda::mma::mma_m16n8k16;
using mmkern::cuda::mma::pack_floats;
using mmkern::cuda::mma::smem_u32;
using mmkern::cuda::mma::unpack_floats;

// 4 bytes global -> shared (one float of lse / delta); invalid -> the destination gets 0 and nothing is read.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

// Lane offsets (elements) into a padded row-major tile [rows][kStride] for ldmatrix x4 (mma_primitives.cuh):
//   A fragment of the 16x16 block at (r0, c0); also the .trans B fragments of two n8 tiles at (k0, n0) of a
//   [k][n] tile:                          row r0 + lane % 16,                col c0 + 8 (lane / 16)
//   B fragments of two n8 tiles n0..n0+15 at k-step k0 of an [n][k] tile (no .trans):
//                                         row n0 + lane % 8 + 8 (lane / 16),  col k0 + 8 ((lane / 8) % 2)
// (__host__ too: tests/test_native_attention_backward.py compiles them into a host program for its lane model)
template <int kStride>
__host__ __device__ __forceinline__ int a_offset(int r0, int c0, int lane) {
  return (r0 + (lane & 15)) * kStride + c0 + ((lane >> 4) << 3);
}
template <int kStride>
__host__ __device__ __forceinline__ int b_offset(int n0, int k0, int lane) {
  return (n0 + (lane & 7) + ((lane >> 4) << 3)) * kStride + k0 + (((lane >> 3) & 1) << 3);
}

// ------------------------------------------------------------------ parameters

struct BackwardParams {
  const uint16_t* q; const uint16_t* k; const uint16_t* v; const uint16_t* dout; const uint16_t* out;
  const float* lse; const float* dlse;         // lse layout; dlse may be null
  float* delta;                                 // lse layout (contiguous)
  uint16_t* dq; uint16_t* dk; uint16_t* dv;     // contiguous, shapes of q, k, v
  const int* cu_seqlens_q; const int* cu_seqlens_k; const int* seqused_k;   // null when absent
  // strides in elements (batch stride 0 for varlen); dq/dk/dv strides are those of contiguous q/k/v
  int64_t q_b, q_m, q_h, k_b, k_n, k_h, v_b, v_n, v_h, do_b, do_m, do_h, o_b, o_m, o_h;
  int64_t dq_b, dq_m, dq_h, dk_b, dk_n, dk_h;   // dv strides = dk strides
  int64_t lse_b, lse_h;                         // lse / dlse / delta: batch and head strides, row stride 1
  int batch, heads, kv_heads, group;            // group = heads / kv_heads
  int seqlen_q, seqlen_k;                       // dense lengths (varlen: total_q, total_k)
  int rows_per_batch;                           // delta kernel: dense seqlen_q, varlen total_q
  float scale, scale_log2;                      // softmax_scale, softmax_scale * log2(e)
  bool causal;
};

struct SeqBounds {
  int q_start, q_len, k_start, k_len;
};

// Where sequence b lies: packed offsets for varlen, else 0 and the dense lengths; seqused_k caps the keys.
__device__ __forceinline__ SeqBounds sequence_bounds(const BackwardParams& p, int b) {
  SeqBounds s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.q_len = p.cu_seqlens_q[b + 1] - s.q_start;
    s.k_start = p.cu_seqlens_k[b];
    s.k_len = p.cu_seqlens_k[b + 1] - s.k_start;
  } else {
    s.q_start = 0;
    s.q_len = p.seqlen_q;
    s.k_start = 0;
    s.k_len = p.seqlen_k;
  }
  if (p.seqused_k != nullptr) s.k_len = max(0, min(s.k_len, p.seqused_k[b]));
  return s;
}

// ------------------------------------------------------------------ tile traits

template <int D>
struct Tiles {
  static_assert(D == 64 || D == 96 || D == 128, "head dims 64, 96, 128");
  static constexpr int kStride = D + 8;                 // padded shared row, elements
  static constexpr int kChunks = D / 8;                 // 16-byte chunks per row
  // dK/dV kernel: 16 keys per warp; query tiles small enough that dK, dV, S^T, dP^T fit in registers
  static constexpr int kDkdvN = 16 * kWarps;            // 64 keys
  static constexpr int kDkdvM = D <= 64 ? 64 : 32;      // queries per step
  // dQ kernel: 16 queries per warp
  static constexpr int kDqM = 16 * kWarps;              // 64 queries
  static constexpr int kDqN = D <= 64 ? 64 : 32;        // keys per step
  // shared memory (bytes): K, V once + two buffers of Q, dO, lse, delta
  static constexpr int kDkdvSmem = 2 * kDkdvN * kStride * 2 + 2 * (2 * kDkdvM * kStride * 2 + 2 * kDkdvM * 4);
  // Q, dO once + two buffers of K, V
  static constexpr int kDqSmem = 2 * kDqM * kStride * 2 + 2 * (2 * kDqN * kStride * 2);
};

// rows [row0, row0 + rows) of a (seq, D) operand -> shared tile (rows, kStride); rows >= len are zero-filled.
// base points at row 0 of the sequence for this head; row_stride in elements.
template <int D, int kRows>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* base, int64_t row_stride, int row0,
                                          int len) {
  using Tr = Tiles<D>;
#pragma unroll
  for (int i = threadIdx.x; i < kRows * Tr::kChunks; i += kThreads) {
    const int r = i / Tr::kChunks, c = i % Tr::kChunks;
    const bool valid = row0 + r < len;
    const uint16_t* src = valid ? base + static_cast<int64_t>(row0 + r) * row_stride + c * 8 : base;
    cp_async_16(smem_u32(smem + r * Tr::kStride + c * 8), src, valid);
  }
}

// ------------------------------------------------------------------ delta = rowsum(dO * O) - dlse

// One warp per (row, head) pair, 8 warps per block; idx = row * heads + head over rows = B * Lq (dense) or total_q.
template <typename T, int D>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const BackwardParams p, int64_t pairs) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (idx >= pairs) return;
  const int64_t row = idx / p.heads;
  const int head = static_cast<int>(idx % p.heads);
  const int64_t b = row / p.rows_per_batch, pos = row % p.rows_per_batch;
  const uint16_t* dout = p.dout + b * p.do_b + pos * p.do_m + head * p.do_h;
  const uint16_t* out = p.out + b * p.o_b + pos * p.o_m + head * p.o_h;
  float sum = 0.f;
#pragma unroll
  for (int d = 2 * lane; d < D; d += 64) {
    const float2 x = unpack_floats<T>(*reinterpret_cast<const uint32_t*>(dout + d));
    const float2 y = unpack_floats<T>(*reinterpret_cast<const uint32_t*>(out + d));
    sum += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) {
    const int64_t at = b * p.lse_b + head * p.lse_h + pos;
    p.delta[at] = p.dlse != nullptr ? sum - p.dlse[at] : sum;
  }
}

// ------------------------------------------------------------------ dK, dV

// grid (batch * kv_heads, cdiv(max_seqlen_k, kDkdvN)), kThreads threads, Tiles<D>::kDkdvSmem dynamic shared bytes.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const BackwardParams p) {
  using Tr = Tiles<D>;
  constexpr int BN = Tr::kDkdvN, BM = Tr::kDkdvM, S = Tr::kStride;
  constexpr int kQT = BM / 8;      // n8 query tiles of S^T per warp
  constexpr int kDT = D / 8;       // n8 head-dim tiles of dK, dV
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + BN * S;
  uint16_t* sQ = sV + BN * S;             // [2][BM * S]
  uint16_t* sdO = sQ + 2 * BM * S;        // [2][BM * S]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * S);   // [2][BM]
  float* sDelta = sLse + 2 * BM;                              // [2][BM]

  const int b = blockIdx.x / p.kv_heads, kv_head = blockIdx.x % p.kv_heads;
  const SeqBounds sb = sequence_bounds(p, b);
  const int n0 = blockIdx.y * BN;
  if (n0 >= sb.k_len) return;                 // whole block: no barrier is skipped by part of it
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int align = sb.k_len - sb.q_len;      // causal: query i sees key j iff j <= i + align

  // query rows that can see a key of this tile: i >= n0 - align (causal), from a multiple of BM
  int m_lo = 0;
  if (p.causal) m_lo = max(0, n0 - align) / BM * BM;
  const int m_tiles = sb.q_len > m_lo ? (sb.q_len - m_lo + BM - 1) / BM : 0;
  const int steps = m_tiles * p.group;        // (query head of the group, query tile) pairs

  const uint16_t* k_base = p.k + b * p.k_b + static_cast<int64_t>(sb.k_start) * p.k_n + kv_head * p.k_h;
  const uint16_t* v_base = p.v + b * p.v_b + static_cast<int64_t>(sb.k_start) * p.v_n + kv_head * p.v_h;
  load_tile<D, BN>(sK, k_base, p.k_n, n0, sb.k_len);
  load_tile<D, BN>(sV, v_base, p.v_n, n0, sb.k_len);

  // step s -> (head, m0) and its Q, dO, lse, delta into buffer s % 2
  auto load_step = [&](int s) {
    const int head = kv_head * p.group + s / m_tiles;
    const int m0 = m_lo + (s % m_tiles) * BM;
    const int buf = s % 2;
    const uint16_t* q_base = p.q + b * p.q_b + static_cast<int64_t>(sb.q_start) * p.q_m + head * p.q_h;
    const uint16_t* do_base = p.dout + b * p.do_b + static_cast<int64_t>(sb.q_start) * p.do_m + head * p.do_h;
    load_tile<D, BM>(sQ + buf * BM * S, q_base, p.q_m, m0, sb.q_len);
    load_tile<D, BM>(sdO + buf * BM * S, do_base, p.do_m, m0, sb.q_len);
    const int64_t stat = b * p.lse_b + head * p.lse_h + sb.q_start;
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const bool valid = m0 + r < sb.q_len;
      cp_async_4(smem_u32(sLse + buf * BM + r), valid ? p.lse + stat + m0 + r : p.lse, valid);
      cp_async_4(smem_u32(sDelta + buf * BM + r), valid ? p.delta + stat + m0 + r : p.delta, valid);
    }
  };
  if (steps > 0) load_step(0);
  cp_async_commit();

  float dk[kDT][4], dv[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) dk[i][j] = dv[i][j] = 0.f;
  }
  // this thread's key rows (c0/c1 and c2/c3 of every C fragment), sequence positions
  const int key0 = n0 + warp * 16 + g, key1 = key0 + 8;
  // shared byte addresses of this lane's ldmatrix rows; the loops below add compile-time offsets
  const uint32_t k_frag = smem_u32(sK) + 2 * a_offset<S>(warp * 16, 0, lane);
  const uint32_t v_frag = smem_u32(sV) + 2 * a_offset<S>(warp * 16, 0, lane);
  const uint32_t q_frag_b = smem_u32(sQ) + 2 * b_offset<S>(0, 0, lane);     // S^T: Q as the B operand
  const uint32_t do_frag_b = smem_u32(sdO) + 2 * b_offset<S>(0, 0, lane);
  const uint32_t q_frag_t = smem_u32(sQ) + 2 * a_offset<S>(0, 0, lane);     // dK: Q as the .trans B operand
  const uint32_t do_frag_t = smem_u32(sdO) + 2 * a_offset<S>(0, 0, lane);

  for (int s = 0; s < steps; ++s) {
    cp_async_wait<0>();
    __syncthreads();                          // step s landed; every warp is done with buffer (s + 1) % 2
    if (s + 1 < steps) load_step(s + 1);
    cp_async_commit();
    const int buf = s % 2;
    const int m0 = m_lo + (s % m_tiles) * BM;
    const uint32_t buf_bytes = buf * BM * S * 2;
    const float* lse_t = sLse + buf * BM;
    const float* delta_t = sDelta + buf * BM;

    // S^T = K Q^T and dP^T = V dO^T: (16 keys) x (BM queries) per warp
    float st[kQT][4], dpt[kQT][4];
#pragma unroll
    for (int i = 0; i < kQT; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) st[i][j] = dpt[i][j] = 0.f;
    }
#pragma unroll 1   // rolled: leaves registers for dK, dV (D = 128: 128 of them) without spills
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldmatrix_x4(ak, k_frag + kk * 32);
      ldmatrix_x4(av, v_frag + kk * 32);
#pragma unroll
      for (int nt = 0; nt < kQT; nt += 2) {
        uint32_t bq[4], bdo[4];
        ldmatrix_x4(bq, q_frag_b + buf_bytes + (nt * 8 * S + kk * 16) * 2);
        ldmatrix_x4(bdo, do_frag_b + buf_bytes + (nt * 8 * S + kk * 16) * 2);
        mma_m16n8k16<T>(st[nt], ak, bq[0], bq[1]);
        mma_m16n8k16<T>(st[nt + 1], ak, bq[2], bq[3]);
        mma_m16n8k16<T>(dpt[nt], av, bdo[0], bdo[1]);
        mma_m16n8k16<T>(dpt[nt + 1], av, bdo[2], bdo[3]);
      }
    }
    // P^T (in st) and dS^T (in dpt); element (key, query): c0/c1 key0, c2/c3 key1, query m0 + nt*8 + 2t + {0,1}
#pragma unroll
    for (int nt = 0; nt < kQT; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = nt * 8 + 2 * t + (j % 2);        // query row within the tile
        const int qi = m0 + r, kj = j < 2 ? key0 : key1;
        const float lse = lse_t[r];
        const bool seen = qi < sb.q_len && kj < sb.k_len && (!p.causal || kj <= qi + align) && lse != -INFINITY;
        const float prob = seen ? fast_exp2(st[nt][j] * p.scale_log2 - lse * kLog2e) : 0.f;
        st[nt][j] = prob;
        dpt[nt][j] = prob * (dpt[nt][j] - delta_t[r]);
      }
    }
    // dV += P^T dO and dK += dS^T Q: k-dim = the BM queries, A from registers, B = dO / Q rows via ldmatrix.trans
#pragma unroll
    for (int kc = 0; kc < BM / 16; ++kc) {
      uint32_t ap[4], ads[4];
      ap[0] = pack_floats<T>(st[2 * kc][0], st[2 * kc][1]);
      ap[1] = pack_floats<T>(st[2 * kc][2], st[2 * kc][3]);
      ap[2] = pack_floats<T>(st[2 * kc + 1][0], st[2 * kc + 1][1]);
      ap[3] = pack_floats<T>(st[2 * kc + 1][2], st[2 * kc + 1][3]);
      ads[0] = pack_floats<T>(dpt[2 * kc][0], dpt[2 * kc][1]);
      ads[1] = pack_floats<T>(dpt[2 * kc][2], dpt[2 * kc][3]);
      ads[2] = pack_floats<T>(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]);
      ads[3] = pack_floats<T>(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3]);
#pragma unroll
      for (int dt = 0; dt < kDT; dt += 2) {
        uint32_t bdo[4], bq[4];
        ldmatrix_x4_trans(bdo, do_frag_t + buf_bytes + (kc * 16 * S + dt * 8) * 2);
        ldmatrix_x4_trans(bq, q_frag_t + buf_bytes + (kc * 16 * S + dt * 8) * 2);
        mma_m16n8k16<T>(dv[dt], ap, bdo[0], bdo[1]);
        mma_m16n8k16<T>(dv[dt + 1], ap, bdo[2], bdo[3]);
        mma_m16n8k16<T>(dk[dt], ads, bq[0], bq[1]);
        mma_m16n8k16<T>(dk[dt + 1], ads, bq[2], bq[3]);
      }
    }
  }
  cp_async_wait<0>();

  // dK * scale, dV -> global in the input dtype (rows key0, key1; columns dt*8 + 2t, +1)
  uint16_t* dk_base = p.dk + b * p.dk_b + static_cast<int64_t>(sb.k_start) * p.dk_n + kv_head * p.dk_h;
  uint16_t* dv_base = p.dv + b * p.dk_b + static_cast<int64_t>(sb.k_start) * p.dk_n + kv_head * p.dk_h;
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    const int col = dt * 8 + 2 * t;
    if (key0 < sb.k_len) {
      *reinterpret_cast<uint32_t*>(dk_base + key0 * p.dk_n + col) = pack_floats<T>(dk[dt][0] * p.scale, dk[dt][1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_base + key0 * p.dk_n + col) = pack_floats<T>(dv[dt][0], dv[dt][1]);
    }
    if (key1 < sb.k_len) {
      *reinterpret_cast<uint32_t*>(dk_base + key1 * p.dk_n + col) = pack_floats<T>(dk[dt][2] * p.scale, dk[dt][3] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_base + key1 * p.dk_n + col) = pack_floats<T>(dv[dt][2], dv[dt][3]);
    }
  }
}

// ------------------------------------------------------------------ dQ

// grid (batch * heads, cdiv(max_seqlen_q, kDqM)), kThreads threads, Tiles<D>::kDqSmem dynamic shared bytes.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const BackwardParams p) {
  using Tr = Tiles<D>;
  constexpr int BM = Tr::kDqM, BN = Tr::kDqN, S = Tr::kStride;
  constexpr int kKT = BN / 8;      // n8 key tiles of S per warp
  constexpr int kDT = D / 8;       // n8 head-dim tiles of dQ
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sdO = sQ + BM * S;
  uint16_t* sK = sdO + BM * S;     // [2][BN * S]
  uint16_t* sV = sK + 2 * BN * S;  // [2][BN * S]

  const int b = blockIdx.x / p.heads, head = blockIdx.x % p.heads, kv_head = head / p.group;
  const SeqBounds sb = sequence_bounds(p, b);
  const int m0 = blockIdx.y * BM;
  if (m0 >= sb.q_len) return;                 // whole block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int align = sb.k_len - sb.q_len;

  // keys this tile can see: [0, n_hi)
  int n_hi = sb.k_len;
  if (p.causal) n_hi = max(0, min(n_hi, min(m0 + BM, sb.q_len) + align));
  const int steps = (n_hi + BN - 1) / BN;

  const uint16_t* k_base = p.k + b * p.k_b + static_cast<int64_t>(sb.k_start) * p.k_n + kv_head * p.k_h;
  const uint16_t* v_base = p.v + b * p.v_b + static_cast<int64_t>(sb.k_start) * p.v_n + kv_head * p.v_h;
  const uint16_t* q_base = p.q + b * p.q_b + static_cast<int64_t>(sb.q_start) * p.q_m + head * p.q_h;
  const uint16_t* do_base = p.dout + b * p.do_b + static_cast<int64_t>(sb.q_start) * p.do_m + head * p.do_h;
  if (steps > 0) {
    load_tile<D, BM>(sQ, q_base, p.q_m, m0, sb.q_len);
    load_tile<D, BM>(sdO, do_base, p.do_m, m0, sb.q_len);
    load_tile<D, BN>(sK, k_base, p.k_n, 0, sb.k_len);
    load_tile<D, BN>(sV, v_base, p.v_n, 0, sb.k_len);
  }
  cp_async_commit();

  // this thread's query rows (c0/c1 -> row0, c2/c3 -> row1) and their statistics
  const int row0 = m0 + warp * 16 + g, row1 = row0 + 8;
  const int64_t stat = b * p.lse_b + head * p.lse_h + sb.q_start;
  const float lse0 = row0 < sb.q_len ? p.lse[stat + row0] : -INFINITY;
  const float lse1 = row1 < sb.q_len ? p.lse[stat + row1] : -INFINITY;
  const float delta0 = row0 < sb.q_len ? p.delta[stat + row0] : 0.f;
  const float delta1 = row1 < sb.q_len ? p.delta[stat + row1] : 0.f;
  const float lse0_log2 = lse0 * kLog2e, lse1_log2 = lse1 * kLog2e;

  // shared byte addresses of this lane's ldmatrix rows; the loops below add compile-time offsets
  const uint32_t q_frag = smem_u32(sQ) + 2 * a_offset<S>(warp * 16, 0, lane);
  const uint32_t do_frag = smem_u32(sdO) + 2 * a_offset<S>(warp * 16, 0, lane);
  const uint32_t k_frag_b = smem_u32(sK) + 2 * b_offset<S>(0, 0, lane);     // S: K as the B operand
  const uint32_t v_frag_b = smem_u32(sV) + 2 * b_offset<S>(0, 0, lane);
  const uint32_t k_frag_t = smem_u32(sK) + 2 * a_offset<S>(0, 0, lane);     // dQ: K as the .trans B operand
  float dq[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) dq[i][j] = 0.f;
  }

  for (int s = 0; s < steps; ++s) {
    cp_async_wait<0>();
    __syncthreads();                          // key tile s landed; every warp is done with buffer (s + 1) % 2
    if (s + 1 < steps) {
      const int nb = (s + 1) % 2;
      load_tile<D, BN>(sK + nb * BN * S, k_base, p.k_n, (s + 1) * BN, sb.k_len);
      load_tile<D, BN>(sV + nb * BN * S, v_base, p.v_n, (s + 1) * BN, sb.k_len);
    }
    cp_async_commit();
    const int n0 = s * BN;
    const uint32_t buf_bytes = (s % 2) * BN * S * 2;

    // S = Q K^T and dP = dO V^T: (16 queries) x (BN keys) per warp
    float sc[kKT][4], dp[kKT][4];
#pragma unroll
    for (int i = 0; i < kKT; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) sc[i][j] = dp[i][j] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ado[4];
      ldmatrix_x4(aq, q_frag + kk * 32);
      ldmatrix_x4(ado, do_frag + kk * 32);
#pragma unroll
      for (int nt = 0; nt < kKT; nt += 2) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, k_frag_b + buf_bytes + (nt * 8 * S + kk * 16) * 2);
        ldmatrix_x4(bv, v_frag_b + buf_bytes + (nt * 8 * S + kk * 16) * 2);
        mma_m16n8k16<T>(sc[nt], aq, bk[0], bk[1]);
        mma_m16n8k16<T>(sc[nt + 1], aq, bk[2], bk[3]);
        mma_m16n8k16<T>(dp[nt], ado, bv[0], bv[1]);
        mma_m16n8k16<T>(dp[nt + 1], ado, bv[2], bv[3]);
      }
    }
    // dS = P (dP - delta) into dp; element (query, key): c0/c1 row0, c2/c3 row1, key n0 + nt*8 + 2t + {0,1}
#pragma unroll
    for (int nt = 0; nt < kKT; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int kj = n0 + nt * 8 + 2 * t + (j % 2);
        const int qi = j < 2 ? row0 : row1;
        const float lse = j < 2 ? lse0 : lse1, lse_log2 = j < 2 ? lse0_log2 : lse1_log2;
        const bool seen = qi < sb.q_len && kj < sb.k_len && (!p.causal || kj <= qi + align) && lse != -INFINITY;
        const float prob = seen ? fast_exp2(sc[nt][j] * p.scale_log2 - lse_log2) : 0.f;
        dp[nt][j] = prob * (dp[nt][j] - (j < 2 ? delta0 : delta1));
      }
    }
    // dQ += dS K: k-dim = the BN keys, A = dS from registers, B = K rows via ldmatrix.trans
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      uint32_t ads[4];
      ads[0] = pack_floats<T>(dp[2 * kc][0], dp[2 * kc][1]);
      ads[1] = pack_floats<T>(dp[2 * kc][2], dp[2 * kc][3]);
      ads[2] = pack_floats<T>(dp[2 * kc + 1][0], dp[2 * kc + 1][1]);
      ads[3] = pack_floats<T>(dp[2 * kc + 1][2], dp[2 * kc + 1][3]);
#pragma unroll
      for (int dt = 0; dt < kDT; dt += 2) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, k_frag_t + buf_bytes + (kc * 16 * S + dt * 8) * 2);
        mma_m16n8k16<T>(dq[dt], ads, bk[0], bk[1]);
        mma_m16n8k16<T>(dq[dt + 1], ads, bk[2], bk[3]);
      }
    }
  }
  cp_async_wait<0>();

  uint16_t* dq_base = p.dq + b * p.dq_b + static_cast<int64_t>(sb.q_start) * p.dq_m + head * p.dq_h;
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    const int col = dt * 8 + 2 * t;
    if (row0 < sb.q_len)
      *reinterpret_cast<uint32_t*>(dq_base + row0 * p.dq_m + col) = pack_floats<T>(dq[dt][0] * p.scale, dq[dt][1] * p.scale);
    if (row1 < sb.q_len)
      *reinterpret_cast<uint32_t*>(dq_base + row1 * p.dq_m + col) = pack_floats<T>(dq[dt][2] * p.scale, dq[dt][3] * p.scale);
  }
}

}  // namespace mmkern::attention::bwd
