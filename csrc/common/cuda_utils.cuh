// Device helpers shared by the CUDA kernels of mmkern._C: 16-byte vector packs, float conversions,
// warp-shuffle and block reductions (fixed order: deterministic), the current stream and SM count.
//
// Do not include <ATen/cuda/CUDAContext.h> in mmkern's .cu files: it pulls in cuSPARSE/cuBLAS headers,
// which a minimal CUDA toolkit (nvcc only, as on the CI machine) lacks. current_stream() and sm_count()
// below cover what the kernels need from it.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mmkern::cuda {

constexpr int kWarp = 32;

// K elements of T loaded/stored together: 16-byte vector accesses when K * sizeof(T) >= 16.
template <typename T, int K>
struct alignas(K * sizeof(T) >= 16 ? 16 : K * sizeof(T)) Pack {
  T v[K];
};

// Elements per 16-byte access.
template <typename T>
constexpr int vec_elems() { return static_cast<int>(16 / sizeof(T)); }

template <typename T, int K>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[K]) {
  const Pack<T, K> pack = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
  for (int j = 0; j < K; ++j) out[j] = static_cast<float>(pack.v[j]);
}

// float -> T rounds to nearest even (c10::Half / c10::BFloat16 constructors), as torch's .to().
template <typename T, int K>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[K]) {
  Pack<T, K> pack;
#pragma unroll
  for (int j = 0; j < K; ++j) pack.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Pack<T, K>*>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the blockDim.x threads of one row group (threadIdx.y). With blockDim.x == 32 a warp
// shuffle suffices (several rows per block); wider groups need blockDim.y == 1 and go through
// `smem` (>= 32 floats). Every thread of the group gets the total.
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  if (blockDim.x == kWarp) return v;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();                       // smem may still be read by the previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? smem[lane] : 0.f;
  return warp_sum(v);
}

// Two sums at once (one pair of barriers).
__device__ __forceinline__ float2 row_sum2(float a, float b, float* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (blockDim.x == kWarp) return make_float2(a, b);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();
  if (lane == 0) {
    smem[warp] = a;
    smem[kWarp + warp] = b;
  }
  __syncthreads();
  const bool in = lane < static_cast<int>(blockDim.x / kWarp);
  return make_float2(warp_sum(in ? smem[lane] : 0.f), warp_sum(in ? smem[kWarp + lane] : 0.f));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Streaming multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int counts[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && counts[device] > 0) return counts[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) counts[device] = count;
  return count;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace mmkern::cuda
