// CUDA kernels of residual + LayerNorm / RMSNorm (torch.ops.mmkern_C.norm_forward / norm_backward, CUDA key).
//
// Layout: each row of N columns is read as packs of K elements (16-byte vector accesses, K = 16 /
// sizeof(x dtype)) when N % K == 0 and every row start is 16-byte aligned, else one element at a
// time (K = 1). A row belongs to a group of `tpr` threads: one warp (4 rows per block) for narrow
// rows, a whole block (up to kMaxThreads) for wide ones; row sums go through warp shuffles (and
// shared memory across the warps of a block), in a fixed order.
//
// Forward, per row: pre = dropout(x) + residual (Philox, csrc/common/philox.h: the mask of Triton's
// tl.rand), stored; mean and rstd by two passes over float32 values (no sum-of-squares cancellation);
// out = (xhat * weight + bias) * (1 + scale) + shift. Rows up to tpr * kCache packs stay in
// registers: x and residual read once, pre and out written once. Wider rows recompute pre from x and
// residual in each pass (re-reads hit L2).
//
// Backward: one block per chunk of consecutive rows of one sample (norm.h); per row the statistics are
// recomputed from the stored pre, then
//     dxhat = dout * weight * (1 + scale);  dpre = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) + dpre_in
//     d_residual = dpre;  dx = dpre * keep / (1 - p)
// and each thread accumulates sum(dout * xhat) and sum(dout) for the columns it owns (registers when the
// row fits kCacheB packs per thread, else a float32 scratch row of the block's own, no atomics). A block
// writes one partial row per reduced gradient; the host sums the partials in a fixed order.
#include "norm/norm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/philox.h"

namespace mmkern::norm {
namespace {

using namespace mmkern::cuda;

constexpr int kMaxThreads = 512;    // threads per row group (forward and backward)
constexpr int kCache = 4;           // forward: packs per thread held in registers
constexpr int kCacheB = 2;          // backward: packs per thread held in registers (pre, dout, two sums each)

struct ForwardParams {
  const void* x; const void* residual;
  const float* weight; const float* bias; const float* shift; const float* scale;
  void* out; void* pre; float* mean; float* rstd;
  int64_t rows, N, rows_per_sample, x_stride, residual_stride;      // strides in elements
  float eps, dropout_p, dropout_scale;
  uint64_t seed;
  bool dropout, is_rms_norm;
};

// pre of pack i of one row: dropout(x) + residual, float32.
template <typename T, typename S, int K>
__device__ __forceinline__ void load_pre(const ForwardParams& p, const T* x, const S* residual, int64_t row,
                                         int64_t i, float (&v)[K]) {
  load_floats<T, K>(x + i * K, v);
  if (p.dropout) {
    const uint64_t base = static_cast<uint64_t>(row * p.N + i * K);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] = dropout_keep(p.seed, base + j, p.dropout_p) ? v[j] * p.dropout_scale : 0.f;
  }
  if (residual != nullptr) {
    float r[K];
    load_floats<S, K>(residual + i * K, r);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] += r[j];
  }
}

// out of pack i from pre values: (xhat * weight + bias) * (1 + scale) + shift.
template <typename T, int K>
__device__ __forceinline__ void store_out(const ForwardParams& p, T* out, int64_t sample, int64_t i, float mean,
                                          float rstd, float (&v)[K]) {
  float a[K];
#pragma unroll
  for (int j = 0; j < K; ++j) v[j] = (v[j] - mean) * rstd;
  if (p.weight) {
    load_floats<float, K>(p.weight + i * K, a);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] *= a[j];
  }
  if (p.bias) {
    load_floats<float, K>(p.bias + i * K, a);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] += a[j];
  }
  if (p.scale) {
    load_floats<float, K>(p.scale + sample * p.N + i * K, a);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] *= 1.f + a[j];
  }
  if (p.shift) {
    load_floats<float, K>(p.shift + sample * p.N + i * K, a);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] += a[j];
  }
  store_floats<T, K>(out + i * K, v);
}

template <typename T, typename S, int K>
__global__ void __launch_bounds__(kMaxThreads) norm_forward_kernel(const ForwardParams p) {
  __shared__ float smem[2 * kWarp];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.rows) return;         // only with several rows per block (warp reductions, no barriers)
  const int tid = threadIdx.x, tpr = blockDim.x;
  const int64_t nvec = p.N / K;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const S* residual = p.residual ? static_cast<const S*>(p.residual) + row * p.residual_stride : nullptr;
  S* pre = static_cast<S*>(p.pre) + row * p.N;
  T* out = static_cast<T*>(p.out) + row * p.N;
  const int64_t sample = row / p.rows_per_sample;
  const float inv_n = 1.f / static_cast<float>(p.N);
  float mean = 0.f, var = 0.f;
  if (nvec <= static_cast<int64_t>(tpr) * kCache) {
    // the row in registers: kCache packs per thread
    float c[kCache][K];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t i = tid + static_cast<int64_t>(k) * tpr;
      if (i < nvec) {
        load_pre<T, S, K>(p, x, residual, row, i, c[k]);
        store_floats<S, K>(pre + i * K, c[k]);
#pragma unroll
        for (int j = 0; j < K; ++j) sum += c[k][j];
      }
    }
    if (!p.is_rms_norm) mean = row_sum(sum, smem) * inv_n;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t i = tid + static_cast<int64_t>(k) * tpr;
      if (i < nvec) {
#pragma unroll
        for (int j = 0; j < K; ++j) sq += (c[k][j] - mean) * (c[k][j] - mean);
      }
    }
    var = row_sum(sq, smem) * inv_n;
    const float rstd = 1.f / sqrtf(var + p.eps);
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t i = tid + static_cast<int64_t>(k) * tpr;
      if (i < nvec) store_out<T, K>(p, out, sample, i, mean, rstd, c[k]);
    }
    if (tid == 0) {
      if (!p.is_rms_norm) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    return;
  }
  // wide rows: three passes, pre recomputed from x and residual (not from the rounded stored pre)
  float sum = 0.f;
  for (int64_t i = tid; i < nvec; i += tpr) {
    float v[K];
    load_pre<T, S, K>(p, x, residual, row, i, v);
    store_floats<S, K>(pre + i * K, v);
#pragma unroll
    for (int j = 0; j < K; ++j) sum += v[j];
  }
  if (!p.is_rms_norm) mean = row_sum(sum, smem) * inv_n;
  float sq = 0.f;
  for (int64_t i = tid; i < nvec; i += tpr) {
    float v[K];
    load_pre<T, S, K>(p, x, residual, row, i, v);
#pragma unroll
    for (int j = 0; j < K; ++j) sq += (v[j] - mean) * (v[j] - mean);
  }
  var = row_sum(sq, smem) * inv_n;
  const float rstd = 1.f / sqrtf(var + p.eps);
  for (int64_t i = tid; i < nvec; i += tpr) {
    float v[K];
    load_pre<T, S, K>(p, x, residual, row, i, v);
    store_out<T, K>(p, out, sample, i, mean, rstd, v);
  }
  if (tid == 0) {
    if (!p.is_rms_norm) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

struct BackwardParams {
  const void* dout; const void* dpre; const void* pre;
  const float* weight; const float* bias; const float* scale;
  void* dx; void* d_residual;
  float* dweight_part; float* dbias_part; float* dshift_part; float* dscale_part;   // (chunks, N) or null
  float* sums;                                       // wide rows: (chunks, 2, N) scratch, else null
  int64_t N, rows_per_sample, chunks_per_sample, rows_per_chunk, dout_stride, dpre_stride;
  float eps, dropout_p, dropout_scale;
  uint64_t seed;
  bool dropout, is_rms_norm;
};

// weight * (1 + scale[sample]) on pack i: dxhat = dout * gain.
template <int K>
__device__ __forceinline__ void load_gain(const BackwardParams& p, const float* scale_row, int64_t i, float (&g)[K]) {
  if (p.weight) {
    load_floats<float, K>(p.weight + i * K, g);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) g[j] = 1.f;
  }
  if (scale_row) {
    float s[K];
    load_floats<float, K>(scale_row + i * K, s);
#pragma unroll
    for (int j = 0; j < K; ++j) g[j] *= 1.f + s[j];
  }
}

// dpre of pack i from xhat and dxhat; stores d_residual and dx (dx takes the forward's dropout mask).
template <typename T, typename S, int K>
__device__ __forceinline__ void store_input_grads(const BackwardParams& p, int64_t row, int64_t i, float rstd,
                                                  float mean_dxhat, float projection, const float (&xhat)[K],
                                                  const float (&dxhat)[K]) {
  float g[K];
  bool one_column = false;
  if constexpr (K == 1) one_column = p.is_rms_norm && p.N == 1;   // N = 1 has packs of K = 1 only
  if (one_column) {
    // xhat^2 = pre^2 / (pre^2 + eps), so dxhat - xhat * projection = dxhat eps rstd^2 exactly; the general form
    // cancels there (as in norm_cpu.cpp, where the fuzz suite found 2.5x eager's error). Compiled for K = 1
    // only: the branch cost the K = 4 fp32 kernel 12 bytes of spills at its 64-register bound.
    g[0] = rstd * dxhat[0] * (p.eps * rstd * rstd);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) g[j] = rstd * (dxhat[j] - mean_dxhat - xhat[j] * projection);
  }
  if (p.dpre) {
    float d[K];
    load_floats<S, K>(static_cast<const S*>(p.dpre) + row * p.dpre_stride + i * K, d);
#pragma unroll
    for (int j = 0; j < K; ++j) g[j] += d[j];
  }
  if (p.d_residual) store_floats<S, K>(static_cast<S*>(p.d_residual) + row * p.N + i * K, g);
  if (p.dropout) {
    const uint64_t base = static_cast<uint64_t>(row * p.N + i * K);
#pragma unroll
    for (int j = 0; j < K; ++j) g[j] = dropout_keep(p.seed, base + j, p.dropout_p) ? g[j] * p.dropout_scale : 0.f;
  }
  store_floats<T, K>(static_cast<T*>(p.dx) + row * p.N + i * K, g);
}

// The chunk's rows share one sample's scale, so two sums give the four partial gradients:
//   dweight = (1 + scale) * sum(dout * xhat)   dbias = (1 + scale) * sum(dout)
//   dshift  = sum(dout)                        dscale = weight * sum(dout * xhat) + bias * sum(dout)
template <int K>
__device__ __forceinline__ void store_partials(const BackwardParams& p, const float* scale_row, int64_t chunk,
                                               int64_t i, const float (&sum_dout_xhat)[K],
                                               const float (&sum_dout)[K]) {
  const int64_t at = chunk * p.N + i * K;
  float factor[K], out[K], a[K];
#pragma unroll
  for (int j = 0; j < K; ++j) factor[j] = 1.f;
  if (scale_row) {
    load_floats<float, K>(scale_row + i * K, a);
#pragma unroll
    for (int j = 0; j < K; ++j) factor[j] += a[j];
  }
  if (p.dweight_part) {
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = factor[j] * sum_dout_xhat[j];
    store_floats<float, K>(p.dweight_part + at, out);
  }
  if (p.dbias_part) {
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = factor[j] * sum_dout[j];
    store_floats<float, K>(p.dbias_part + at, out);
  }
  if (p.dshift_part) store_floats<float, K>(p.dshift_part + at, sum_dout);
  if (p.dscale_part) {
#pragma unroll
    for (int j = 0; j < K; ++j) out[j] = sum_dout_xhat[j];
    if (p.weight) {
      load_floats<float, K>(p.weight + i * K, a);
#pragma unroll
      for (int j = 0; j < K; ++j) out[j] *= a[j];
    }
    if (p.bias) {
      load_floats<float, K>(p.bias + i * K, a);
#pragma unroll
      for (int j = 0; j < K; ++j) out[j] += sum_dout[j] * a[j];
    }
    store_floats<float, K>(p.dscale_part + at, out);
  }
}

template <typename T, typename S, int K>
__global__ void __launch_bounds__(kMaxThreads) norm_backward_kernel(const BackwardParams p) {
  __shared__ float smem[2 * kWarp];
  const int64_t chunk = blockIdx.x;
  const int64_t sample = chunk / p.chunks_per_sample;
  const int64_t first = sample * p.rows_per_sample + (chunk % p.chunks_per_sample) * p.rows_per_chunk;
  const int64_t end = min(first + p.rows_per_chunk, (sample + 1) * p.rows_per_sample);
  const float* scale_row = p.scale ? p.scale + sample * p.N : nullptr;
  const int tid = threadIdx.x, tpr = blockDim.x;
  const int64_t nvec = p.N / K;
  const float inv_n = 1.f / static_cast<float>(p.N);
  const float centre = p.is_rms_norm ? 0.f : 1.f;     // LayerNorm subtracts the means; RMSNorm does not
  if (nvec <= static_cast<int64_t>(tpr) * kCacheB) {
    float sum_dout_xhat[kCacheB][K], sum_dout[kCacheB][K];
#pragma unroll
    for (int k = 0; k < kCacheB; ++k) {
#pragma unroll
      for (int j = 0; j < K; ++j) sum_dout_xhat[k][j] = sum_dout[k][j] = 0.f;
    }
    for (int64_t row = first; row < end; ++row) {
      const S* pre = static_cast<const S*>(p.pre) + row * p.N;
      const T* dout = static_cast<const T*>(p.dout) + row * p.dout_stride;
      float xhat[kCacheB][K], dxhat[kCacheB][K];
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < kCacheB; ++k) {
        const int64_t i = tid + static_cast<int64_t>(k) * tpr;
        if (i < nvec) {
          load_floats<S, K>(pre + i * K, xhat[k]);
#pragma unroll
          for (int j = 0; j < K; ++j) sum += xhat[k][j];
        }
      }
      const float mean = row_sum(sum, smem) * inv_n * centre;
      float sq = 0.f;
#pragma unroll
      for (int k = 0; k < kCacheB; ++k) {
        const int64_t i = tid + static_cast<int64_t>(k) * tpr;
        if (i < nvec) {
#pragma unroll
          for (int j = 0; j < K; ++j) sq += (xhat[k][j] - mean) * (xhat[k][j] - mean);
        }
      }
      const float rstd = 1.f / sqrtf(row_sum(sq, smem) * inv_n + p.eps);
      float s_dxhat_xhat = 0.f, s_dxhat = 0.f;
#pragma unroll
      for (int k = 0; k < kCacheB; ++k) {
        const int64_t i = tid + static_cast<int64_t>(k) * tpr;
        if (i < nvec) {
          float g[K];
          load_gain<K>(p, scale_row, i, g);
          load_floats<T, K>(dout + i * K, dxhat[k]);
#pragma unroll
          for (int j = 0; j < K; ++j) {
            xhat[k][j] = (xhat[k][j] - mean) * rstd;
            sum_dout_xhat[k][j] += dxhat[k][j] * xhat[k][j];
            sum_dout[k][j] += dxhat[k][j];
            dxhat[k][j] *= g[j];
            s_dxhat_xhat += dxhat[k][j] * xhat[k][j];
            s_dxhat += dxhat[k][j];
          }
        }
      }
      const float2 sums = row_sum2(s_dxhat_xhat, s_dxhat, smem);
      const float projection = sums.x * inv_n, mean_dxhat = sums.y * inv_n * centre;
#pragma unroll
      for (int k = 0; k < kCacheB; ++k) {
        const int64_t i = tid + static_cast<int64_t>(k) * tpr;
        if (i < nvec) store_input_grads<T, S, K>(p, row, i, rstd, mean_dxhat, projection, xhat[k], dxhat[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kCacheB; ++k) {
      const int64_t i = tid + static_cast<int64_t>(k) * tpr;
      if (i < nvec) store_partials<K>(p, scale_row, chunk, i, sum_dout_xhat[k], sum_dout[k]);
    }
    return;
  }
  // wide rows: the column sums live in the block's own scratch rows (each thread owns the same packs
  // in every row, so no other thread touches them); pre and dout are re-read per pass (L2)
  float* s_dout_xhat = p.sums + chunk * 2 * p.N;
  float* s_dout = s_dout_xhat + p.N;
  for (int64_t i = tid; i < nvec; i += tpr) {
    const float zero[K] = {};
    store_floats<float, K>(s_dout_xhat + i * K, zero);
    store_floats<float, K>(s_dout + i * K, zero);
  }
  for (int64_t row = first; row < end; ++row) {
    const S* pre = static_cast<const S*>(p.pre) + row * p.N;
    const T* dout = static_cast<const T*>(p.dout) + row * p.dout_stride;
    float sum = 0.f;
    for (int64_t i = tid; i < nvec; i += tpr) {
      float v[K];
      load_floats<S, K>(pre + i * K, v);
#pragma unroll
      for (int j = 0; j < K; ++j) sum += v[j];
    }
    const float mean = row_sum(sum, smem) * inv_n * centre;
    float sq = 0.f;
    for (int64_t i = tid; i < nvec; i += tpr) {
      float v[K];
      load_floats<S, K>(pre + i * K, v);
#pragma unroll
      for (int j = 0; j < K; ++j) sq += (v[j] - mean) * (v[j] - mean);
    }
    const float rstd = 1.f / sqrtf(row_sum(sq, smem) * inv_n + p.eps);
    float s_dxhat_xhat = 0.f, s_dxhat = 0.f;
    for (int64_t i = tid; i < nvec; i += tpr) {
      float v[K], d[K], g[K];
      load_floats<S, K>(pre + i * K, v);
      load_floats<T, K>(dout + i * K, d);
      load_gain<K>(p, scale_row, i, g);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float xh = (v[j] - mean) * rstd, dxh = d[j] * g[j];
        s_dxhat_xhat += dxh * xh;
        s_dxhat += dxh;
      }
    }
    const float2 sums = row_sum2(s_dxhat_xhat, s_dxhat, smem);
    const float projection = sums.x * inv_n, mean_dxhat = sums.y * inv_n * centre;
    for (int64_t i = tid; i < nvec; i += tpr) {
      float xh[K], dxh[K], g[K], a[K], b[K];
      load_floats<S, K>(pre + i * K, xh);
      load_floats<T, K>(dout + i * K, dxh);
      load_gain<K>(p, scale_row, i, g);
      load_floats<float, K>(s_dout_xhat + i * K, a);
      load_floats<float, K>(s_dout + i * K, b);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        xh[j] = (xh[j] - mean) * rstd;
        a[j] += dxh[j] * xh[j];
        b[j] += dxh[j];
        dxh[j] *= g[j];
      }
      store_floats<float, K>(s_dout_xhat + i * K, a);
      store_floats<float, K>(s_dout + i * K, b);
      store_input_grads<T, S, K>(p, row, i, rstd, mean_dxhat, projection, xh, dxh);
    }
  }
  for (int64_t i = tid; i < nvec; i += tpr) {
    float a[K], b[K];
    load_floats<float, K>(s_dout_xhat + i * K, a);
    load_floats<float, K>(s_dout + i * K, b);
    store_partials<K>(p, scale_row, chunk, i, a, b);
  }
}

__global__ void dropout_keep_mask_kernel(bool* mask, int64_t numel, float p, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) mask[i] = dropout_keep(seed, static_cast<uint64_t>(i), p);
}

// ----------------------------------------------------------------------------- host side

// Calls f(T{}, S{}) for the (x, stream) dtype pair: 5 pairs (norm.cpp checks the stream is x's dtype or float32).
template <typename F>
void dispatch_pair(at::ScalarType x, at::ScalarType stream, const F& f) {
  const bool s32 = stream == at::kFloat;
  switch (x) {
    case at::kFloat: return f(float{}, float{});
    case at::kHalf: return s32 ? f(at::Half{}, float{}) : f(at::Half{}, at::Half{});
    case at::kBFloat16: return s32 ? f(at::BFloat16{}, float{}) : f(at::BFloat16{}, at::BFloat16{});
    default: TORCH_CHECK(false, "mmkern norm: unexpected dtype ", x);
  }
}

int threads_per_row(int64_t nvec, int cache) {
  int tpr = kWarp;
  while (tpr < kMaxThreads && static_cast<int64_t>(tpr) * cache < nvec) tpr *= 2;
  return tpr;
}

bool rows_aligned(const void* base, int64_t row_stride_bytes) {
  return aligned16(base) && row_stride_bytes % 16 == 0;
}

ForwardResult norm_forward_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
                                double eps, double dropout_p, int64_t seed, bool residual_in_fp32, bool is_rms_norm) {
  const char* op = "mmkern_C::norm_forward";
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor for the CUDA kernel; got ", x.device());
  const int64_t rows_per_sample = check_forward(op, x, residual, weight, bias, shift, scale, dropout_p,
                                                residual_in_fp32);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0; got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), N = x.size(1);
  const auto stream_type = stream_dtype(x, residual, residual_in_fp32);
  auto out = at::empty({rows, N}, x.options());
  auto pre = at::empty({rows, N}, x.options().dtype(stream_type));
  auto mean = at::empty({is_rms_norm ? 0 : rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, pre, mean, rstd};
  ForwardParams p{};
  p.x = x.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  auto fptr = [](const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; };
  p.weight = fptr(weight);
  p.bias = fptr(bias);
  p.shift = fptr(shift);
  p.scale = fptr(scale);
  p.out = out.data_ptr();
  p.pre = pre.data_ptr();
  p.mean = is_rms_norm ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.N = N;
  p.rows_per_sample = std::max<int64_t>(rows_per_sample, 1);
  p.x_stride = rows > 1 ? x.stride(0) : N;
  p.residual_stride = residual ? (rows > 1 ? residual->stride(0) : N) : 0;
  p.eps = static_cast<float>(eps);
  p.dropout = dropout_p > 0;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  p.is_rms_norm = is_rms_norm;
  const cudaStream_t stream = current_stream();
  dispatch_pair(x.scalar_type(), stream_type, [&](auto t, auto s) {
    using T = decltype(t);
    using S = decltype(s);
    constexpr int KV = vec_elems<T>();
    bool vec = N % KV == 0 && rows_aligned(p.x, p.x_stride * sizeof(T)) && aligned16(p.out) && aligned16(p.pre);
    if (residual) vec = vec && rows_aligned(p.residual, p.residual_stride * sizeof(S));
    for (const float* q : {p.weight, p.bias, p.shift, p.scale}) vec = vec && (q == nullptr || aligned16(q));
    const int K = vec ? KV : 1;
    const int tpr = threads_per_row(N / K, kCache);
    const int rows_per_block = tpr == kWarp ? 4 : 1;
    const dim3 block(tpr, rows_per_block);
    const unsigned grid = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
    if (vec) {
      norm_forward_kernel<T, S, KV><<<grid, block, 0, stream>>>(p);
    } else {
      norm_forward_kernel<T, S, 1><<<grid, block, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, pre, mean, rstd};
}

BackwardResult norm_backward_cuda(const at::Tensor& dout, const c10::optional<at::Tensor>& dpre,
                                  const at::Tensor& pre, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                                  double eps, double dropout_p, int64_t seed, bool is_rms_norm, bool has_residual,
                                  bool has_shift, int64_t batch, at::ScalarType x_dtype) {
  const char* op = "mmkern_C::norm_backward";
  TORCH_CHECK_VALUE(pre.is_cuda(), op, ": pre must be a CUDA tensor for the CUDA kernel; got ", pre.device());
  const int64_t rows_per_sample = check_backward(op, dout, dpre, pre, weight, bias, scale, dropout_p, has_shift,
                                                 batch, x_dtype);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0; got ", eps);
  const c10::cuda::CUDAGuard guard(pre.device());
  const int64_t rows = pre.size(0), N = pre.size(1);
  auto dx = at::empty({rows, N}, pre.options().dtype(x_dtype));
  auto d_residual = has_residual ? at::empty({rows, N}, pre.options()) : pre.new_empty({0});
  auto f32 = pre.options().dtype(at::kFloat);
  if (rows == 0) {
    auto zeros = [&](bool present, at::IntArrayRef shape) { return present ? at::zeros(shape, f32) : at::empty({0}, f32); };
    return {dx, d_residual, zeros(weight.has_value(), {N}), zeros(bias.has_value(), {N}),
            zeros(has_shift, {batch, N}), zeros(scale.has_value(), {batch, N})};
  }
  bool vec_possible = true;
  int KV = 1;
  dispatch_pair(x_dtype, pre.scalar_type(), [&](auto t, auto) { KV = vec_elems<decltype(t)>(); });
  const int64_t dout_stride = rows > 1 ? dout.stride(0) : N;
  const int64_t dpre_stride = dpre ? (rows > 1 ? dpre->stride(0) : N) : 0;
  vec_possible = N % KV == 0 && rows_aligned(dout.data_ptr(), dout_stride * dout.element_size()) &&
                 aligned16(pre.data_ptr()) && aligned16(dx.data_ptr()) &&
                 (!has_residual || aligned16(d_residual.data_ptr())) &&
                 (!dpre || rows_aligned(dpre->data_ptr(), dpre_stride * dpre->element_size()));
  for (const auto* t : {&weight, &bias, &scale}) vec_possible = vec_possible && (!t->has_value() || aligned16((*t)->data_ptr()));
  const int K = vec_possible ? KV : 1;
  const int64_t nvec = N / K;
  const int tpr = threads_per_row(nvec, kCacheB);
  const bool wide = nvec > static_cast<int64_t>(tpr) * kCacheB;
  // blocks: about four per SM in all (more for narrow rows, whose blocks are small)
  const int sms = sm_count();
  const int64_t cps = chunks_per_sample(rows_per_sample, batch, static_cast<int64_t>(sms) * 4 * (kMaxThreads / tpr));
  const int64_t rows_per_chunk = (rows_per_sample + cps - 1) / cps;
  const int64_t cps_used = (rows_per_sample + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t chunks = batch * cps_used;
  auto partial = [&](bool present) { return present ? at::empty({chunks, N}, f32) : at::Tensor(); };
  at::Tensor dweight_part = partial(weight.has_value()), dbias_part = partial(bias.has_value()),
             dshift_part = partial(has_shift), dscale_part = partial(scale.has_value());
  at::Tensor sums = wide ? at::empty({chunks, 2, N}, f32) : at::Tensor();
  BackwardParams p{};
  p.dout = dout.data_ptr();
  p.dpre = dpre ? dpre->data_ptr() : nullptr;
  p.pre = pre.data_ptr();
  auto fptr = [](const c10::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; };
  p.weight = fptr(weight);
  p.bias = fptr(bias);
  p.scale = fptr(scale);
  p.dx = dx.data_ptr();
  p.d_residual = has_residual ? d_residual.data_ptr() : nullptr;
  auto optr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  p.dweight_part = optr(dweight_part);
  p.dbias_part = optr(dbias_part);
  p.dshift_part = optr(dshift_part);
  p.dscale_part = optr(dscale_part);
  p.sums = optr(sums);
  p.N = N;
  p.rows_per_sample = rows_per_sample;
  p.chunks_per_sample = cps_used;
  p.rows_per_chunk = rows_per_chunk;
  p.dout_stride = dout_stride;
  p.dpre_stride = dpre_stride;
  p.eps = static_cast<float>(eps);
  p.dropout = dropout_p > 0;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  p.is_rms_norm = is_rms_norm;
  const cudaStream_t stream = current_stream();
  dispatch_pair(x_dtype, pre.scalar_type(), [&](auto t, auto s) {
    using T = decltype(t);
    using S = decltype(s);
    constexpr int KVT = vec_elems<T>();
    if (vec_possible) {
      norm_backward_kernel<T, S, KVT><<<static_cast<unsigned>(chunks), tpr, 0, stream>>>(p);
    } else {
      norm_backward_kernel<T, S, 1><<<static_cast<unsigned>(chunks), tpr, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return reduce_partials(dx, d_residual, dweight_part, dbias_part, dshift_part, dscale_part, batch, pre);
}

at::Tensor dropout_keep_mask_cuda(const at::Tensor& like, double dropout_p, int64_t seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "mmkern_C::dropout_keep_mask: dropout_p must be in [0, 1); "
                    "got ", dropout_p);
  const c10::cuda::CUDAGuard guard(like.device());
  auto mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  const int64_t numel = mask.numel();
  if (numel == 0) return mask;
  const int threads = 256;
  dropout_keep_mask_kernel<<<static_cast<unsigned>((numel + threads - 1) / threads), threads, 0,
                             current_stream()>>>(mask.data_ptr<bool>(), numel,
                                                                 static_cast<float>(dropout_p),
                                                                 static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace
}  // namespace mmkern::norm

TORCH_LIBRARY_IMPL(mmkern_C, CUDA, m) {
  m.impl("norm_forward", &mmkern::norm::norm_forward_cuda);
  m.impl("norm_backward", &mmkern::norm::norm_backward_cuda);
  m.impl("dropout_keep_mask", &mmkern::norm::dropout_keep_mask_cuda);
}
