// Philox-4x32-10 on the CPU, eight counters at once: the stream of common/philox.h (and of Triton's tl.rand),
// bit for bit, for the C++ CPU kernels' dropout.
//
// Why a vector version: a dropout mask needs one full Philox (10 rounds, two 32 x 32 -> 64-bit products
// each) per element, because tl.rand keeps only the first of the four output words of the counter
// (offset, 0) and the masks must agree across backends. Written as scalar lanes, gcc vectorised it poorly:
// 14 ns per element on one core (3.6 ns now), so dropout cost 4x the rest of residual + LayerNorm. With AVX2, one
// vpmuludq gives four 64-bit products; the even and odd lanes of eight counters take two, blended back into
// the high and low words.
//
// Lanes: bits[l] = philox_bits(seed, offset + l) for l < 8; offset + l is a 64-bit counter (its high word
// carries when the low word wraps). Without AVX2 (the build's flags, mmkern/build.py) the scalar function runs.
#pragma once

#include <cstdint>

#include "common/philox.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mmkern {

constexpr int kPhiloxLanes = 8;

#if defined(__AVX2__)
namespace detail {

// hi/lo words of the eight 32 x 32 -> 64-bit products v[l] * m (m: the same constant in every lane).
inline void mul_hi_lo(__m256i v, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(v, m);                          // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(v, 32), m);   // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// First Philox words of the counters offset + 0..7, as a vector. (Two interleaved chains of eight were
// slower, 6.1 vs 3.6 ns per element: sixteen ymm registers do not hold two states, the keys and constants.)
inline __m256i philox_bits_vec(uint64_t seed, uint64_t offset) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m256i c0 = _mm256_add_epi32(base_lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // carry into the high word where the low word wrapped: c0 < base_lo as unsigned (a signed compare after
  // flipping the sign bits); the compare gives -1 there, and subtracting -1 adds the carry
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, flip), _mm256_xor_si256(c0, flip));
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32))), wrapped);
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kRoundB));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    __m256i hi_a, lo_a, hi_b, lo_b;
    mul_hi_lo(c0, round_a, hi_a, lo_a);
    mul_hi_lo(c2, round_b, hi_b, lo_b);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), key0);
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), key1);
    c1 = lo_b;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

}  // namespace detail
#endif

// bits[l] = philox_bits(seed, offset + l), l < 8.
inline void philox_bits_x8(uint64_t seed, uint64_t offset, uint32_t bits[kPhiloxLanes]) {
#if defined(__AVX2__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits), detail::philox_bits_vec(seed, offset));
#else
  for (int l = 0; l < kPhiloxLanes; ++l) bits[l] = philox_bits(seed, offset + static_cast<uint64_t>(l));
#endif
}

// a[j] = dropout_keep(seed, offset + j, p) ? a[j] * scale : 0 for j < n (the mask of common/philox.h).
inline void dropout_scale(float* a, int64_t n, uint64_t seed, uint64_t offset, float p, float scale) {
  int64_t j = 0;
#if defined(__AVX2__)
  // uniform_from_bits vectorised: x ^ (x >> 31) is x < 0 ? ~x : x; int -> float rounds to nearest as the cast
  const __m256 vp = _mm256_set1_ps(p), vscale = _mm256_set1_ps(scale), unit = _mm256_set1_ps(4.6566127342e-10f);
  for (; j + kPhiloxLanes <= n; j += kPhiloxLanes) {
    const __m256i x = detail::philox_bits_vec(seed, offset + static_cast<uint64_t>(j));
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(x, _mm256_srai_epi32(x, 31))), unit);
    const __m256 keep = _mm256_cmp_ps(u, vp, _CMP_GE_OQ);
    _mm256_storeu_ps(a + j, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), vscale), keep));
  }
#endif
  uint32_t bits[kPhiloxLanes];
  for (; j < n; j += kPhiloxLanes) {
    philox_bits_x8(seed, offset + static_cast<uint64_t>(j), bits);
    const int64_t m = n - j < kPhiloxLanes ? n - j : kPhiloxLanes;
    for (int64_t l = 0; l < m; ++l) a[j + l] = uniform_from_bits(bits[l]) >= p ? a[j + l] * scale : 0.f;
  }
}

}  // namespace mmkern
