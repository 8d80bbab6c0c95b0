// Counter-based random numbers: Philox-4x32-10, the same stream as Triton's tl.rand(seed, offset).
//
// tl.rand(seed, offset) runs Philox on the counter (offset_lo, offset_hi, 0, 0) with the key
// (seed_lo, seed_hi), keeps the first of the four output words and maps it to [0, 1) as
//     x = int32(bits); x = x < 0 ? -x - 1 : x; u = float(x) * 4.6566127342e-10f.
// Doing exactly that here makes a dropout mask depend only on (seed, element index) and be the
// same bit for bit on the CPU, on the GPU and in the Triton kernels: the backward regenerates the
// forward's mask, and masks agree across backends.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MMKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMKERN_HOST_DEVICE inline
#endif

namespace mmkern {

MMKERN_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox-4x32-10 at counter `offset` (a non-negative element index) under key `seed`.
MMKERN_HOST_DEVICE uint32_t philox_bits(uint64_t seed, uint64_t offset) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(kRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, a0) ^ c3 ^ k1;
    c1 = kRoundB * a2;
    c3 = kRoundA * a0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// tl.rand's map from 32 random bits to a float in [0, 1).
MMKERN_HOST_DEVICE float uniform_from_bits(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;                   // -x - 1 without the overflow at INT32_MIN
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// True where element `offset` survives dropout with probability 1 - p.
MMKERN_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, float p) {
  return uniform_from_bits(philox_bits(seed, offset)) >= p;
}

}  // namespace mmkern
