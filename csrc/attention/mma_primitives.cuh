// Warp-level tensor-core primitives for the CUDA flash attention (forward and backward), sm_80 and newer:
// inline-PTX wrappers for mma.sync m16n8k16, ldmatrix, cp.async, a bank-conflict-free swizzled layout for
// shared-memory tiles, fp32 -> half2/bfloat162 packing and quad (4-lane) reductions.
//
// ---------------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32:   D (16x8, f32) = A (16x16) * B (16x8) + C
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). Per lane:
//     g = lane / 4  ("groupID"),   t = lane % 4  ("threadID_in_group")
//   A, 16x16 row-major, four .b32 registers a0..a3, each holding two consecutive columns (low half = lower column):
//     a0: (row g,     cols 2t, 2t+1)      a1: (row g + 8, cols 2t, 2t+1)
//     a2: (row g,     cols 2t+8, 2t+9)    a3: (row g + 8, cols 2t+8, 2t+9)
//   B, 16x8 "col" (indexed (k, n); two consecutive k per register, low half = lower k):
//     b0: (k 2t, 2t+1;   n g)             b1: (k 2t+8, 2t+9;   n g)
//   C / D, 16x8 f32, four registers:
//     c0, c1: (row g,     cols 2t, 2t+1)  c2, c3: (row g + 8, cols 2t, 2t+1)
// So the C fragments of two adjacent 16x8 tiles (n-blocks 2j, 2j+1), rounded to 16 bits, are exactly the A
// fragment of the 16x16 tile they form: a0 = (c0, c1) of 2j, a1 = (c2, c3) of 2j, a2 = (c0, c1) of 2j+1,
// a3 = (c2, c3) of 2j+1. Flash attention feeds P = softmax(S) back into the next MMA that way, never
// through shared memory.
//
// ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16: loads 1/2/4 8x8 matrices of 16-bit elements.
// Lanes 8i..8i+7 give the shared addresses of rows 0..7 of matrix i (each row 16 contiguous bytes);
// register i of every lane receives from matrix i:
//     without .trans: (row g, cols 2t, 2t+1)        with .trans: (rows 2t, 2t+1, col g)
// Hence, for a row-major [rows][cols] tile in shared memory:
//   * an A fragment at (r0, c0): x4 with lane address (r0 + lane % 16, c0 + (lane / 16) * 8)
//   * the B fragment of S = Q K^T (K stored [key][d], i.e. B(k=d, n=key) is "col"): no .trans; x4 at
//     (key n0 + lane % 8 + (lane / 16) * 8, d k0 + ((lane / 8) % 2) * 8) gives {b0, b1} of keys n0..n0+7 in
//     registers 0, 1 and of keys n0+8..n0+15 in registers 2, 3
//   * the B fragment of O = P V (V stored [key][d], B(k=key, n=d)): .trans; x4 at
//     (key k0 + lane % 16, d n0 + (lane / 16) * 8) gives {b0, b1} of d n0..n0+7 in registers 0, 1 and of
//     d n0+8..n0+15 in registers 2, 3
// The helpers below compute these lane addresses (ldmatrix_a_offset etc.), so kernels do not repeat them.
//
// Shared-memory tiles: [rows][kRowElems] 16-bit elements, kRowElems a multiple of 64 (128 bytes), stored as
// 16-byte chunks whose index within the row is XOR-swizzled with (row % 8). An ldmatrix phase reads one
// 16-byte chunk from each of 8 consecutive rows at the same logical column: after the swizzle the 8 chunks
// lie in 8 different 16-byte bank groups, so the 32 banks are each hit once (no conflicts). The XOR keeps the
// chunk inside its aligned group of 8 chunks, so rows never overflow their kRowElems.
// cp.async writes whole 16-byte chunks, so the swizzle costs nothing on the store side.
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mmkern::cuda::mma {

// ---------------------------------------------------------------- element types

// 16-bit element types the MMA takes. c10::Half / c10::BFloat16 have the same bit layout as __half /
// __nv_bfloat16; kernels are templated on these tags.
struct Fp16 {
  using Element = __half;
  using Pair = __half2;
  static constexpr bool kIsBf16 = false;
};
struct Bf16 {
  using Element = __nv_bfloat16;
  using Pair = __nv_bfloat162;
  static constexpr bool kIsBf16 = true;
};

// Two floats -> one .b32 register of two 16-bit values (round to nearest even); `lo` goes to the low half
// (the lower column / k index of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_floats<Fp16>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack_floats<Bf16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The inverse, for tests and epilogues: one .b32 register -> (low, high) floats.
template <typename T>
__device__ __forceinline__ float2 unpack_floats(uint32_t v);

template <>
__device__ __forceinline__ float2 unpack_floats<Fp16>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}

template <>
__device__ __forceinline__ float2 unpack_floats<Bf16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}

// ---------------------------------------------------------------- mma.sync m16n8k16

// d = a * b + d (fp32 accumulators in place), layouts as in the header comment.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<Fp16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<Bf16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------- ldmatrix

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// x2: lanes 0..15 give the addresses (rows of matrices 0 and 1); lanes 16..31 must still hold valid addresses.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// ---------------------------------------------------------------- swizzled shared-memory tiles

// Element offset of (row, col) in a [rows][kRowElems] tile; col a multiple of 8 (a 16-byte chunk start).
// (These index helpers are __host__ too: tests/test_native_attention.py runs them on the CPU.)
template <int kRowElems>
__host__ __device__ __forceinline__ int swizzle(int row, int col) {
  static_assert(kRowElems % 64 == 0, "swizzled rows hold whole groups of 8 chunks of 16 bytes");
  return row * kRowElems + ((((col >> 3) ^ (row & 7))) << 3);
}

// Lane offsets (elements, swizzled) of the three ldmatrix x4 patterns of the header comment.
// A fragment (or a .trans B fragment of P V) of the 16x16 block at (r0, c0):
template <int kRowElems>
__host__ __device__ __forceinline__ int ldmatrix_a_offset(int r0, int c0, int lane) {
  return swizzle<kRowElems>(r0 + (lane & 15), c0 + ((lane >> 4) << 3));
}
// B fragments of two adjacent 8-key blocks n0..n0+15 at k-step k0, from a [key][k] tile (no .trans):
template <int kRowElems>
__host__ __device__ __forceinline__ int ldmatrix_b_offset(int n0, int k0, int lane) {
  return swizzle<kRowElems>(n0 + (lane & 7) + ((lane >> 4) << 3), k0 + (((lane >> 3) & 1) << 3));
}
// B fragments of O = P V at key step k0 for d n0..n0+15, from a [key][d] tile (.trans): the A pattern.
template <int kRowElems>
__host__ __device__ __forceinline__ int ldmatrix_bt_offset(int k0, int n0, int lane) {
  return ldmatrix_a_offset<kRowElems>(k0, n0, lane);
}

// ---------------------------------------------------------------- cp.async (global -> shared, 16 bytes)

// Copies 16 bytes when `valid`, else writes 16 zero bytes to shared memory (src-size 0: nothing is read,
// but `src` must still be a valid address expression). .cg: cached in L2 only (streamed K/V tiles).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---------------------------------------------------------------- math

// 2^x with the SFU instruction (ex2.approx.ftz: ~2 ulp; 2^-inf = +0, which masked scores rely on).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Max / sum over the 4 lanes of a quad (the lanes that share a fragment row: same g).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace mmkern::cuda::mma
