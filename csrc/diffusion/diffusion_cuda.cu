// CUDA kernels of the diffusion ops (schemas: register.cpp; math shared with the CPU kernels: diffusion_math.h).
//
// Elementwise, grid-stride: each thread handles groups of V = 16 / sizeof(T) consecutive elements of the flat
// (B, ...) samples (4 fp32 or 8 fp16/bf16: one 16-byte vector load per input when every pointer is 16-byte
// aligned, scalar loads for the tail group). Element i belongs to sample b = i / per_sample; a thread walks
// b across its group and gathers that sample's index and table entry (cached loads), recomputing the fp32
// coefficients only when b changes. Nothing is read on the host: indices are clamped into the table.
// Traffic per element: one read of each input, one write of each output (the Triton kernels' traffic).
// The loss: fixed grid (depends on numel only) of per-block fp32 partial sums (warp shuffles, then the
// warps in order), then one block sums the partials in a fixed order: the same bits on every run.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "diffusion/diffusion_checks.h"
#include "diffusion/diffusion_math.h"

namespace mmkern_diffusion {
namespace {

constexpr int kThreads = 256;
constexpr int kLossMaxBlocks = 1024;

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

// N elements from `start` as fp32 (zeros past numel)
template <int N, typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ p, int64_t start, int64_t numel, bool vec,
                                           float (&out)[N]) {
  if (vec && start + N <= numel) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p + start);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<float>(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = start + j < numel ? static_cast<float>(p[start + j]) : 0.0f;
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_group(T* __restrict__ p, int64_t start, int64_t numel, bool vec,
                                            const float (&in)[N]) {
  if (vec && start + N <= numel) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Pack<T, N>*>(p + start) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (start + j < numel) p[start + j] = static_cast<T>(in[j]);
  }
}

// Division by the elements per sample without a 64-bit integer division (a called subroutine in SASS, whose
// register saving ptxas reports as spills): m = floor((2^64 - 1) / d) from the host, q = mulhi(n, m) is at
// most 2 below n / d for n < 2^63, then corrected.
struct Divider {
  uint64_t d, m;
  explicit Divider(int64_t divisor)
      : d(static_cast<uint64_t>(divisor)), m(UINT64_MAX / static_cast<uint64_t>(divisor)) {}
  __device__ __forceinline__ void divmod(int64_t n, int64_t& q, int64_t& r) const {
    uint64_t qq = __umul64hi(static_cast<uint64_t>(n), m);
    uint64_t rr = static_cast<uint64_t>(n) - qq * d;
    while (rr >= d) { rr -= d; ++qq; }
    q = static_cast<int64_t>(qq);
    r = static_cast<int64_t>(rr);
  }
};

// Sample index of each element of a group: b and the position r inside the sample, advanced element by element.
struct Cursor {
  int64_t b, r, per_sample;
  __device__ __forceinline__ Cursor(int64_t start, const Divider& ps) : per_sample(static_cast<int64_t>(ps.d)) {
    ps.divmod(start, b, r);
  }
  __device__ __forceinline__ void next() {
    if (++r == per_sample) { r = 0; ++b; }
  }
};

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int blocks_for(int64_t groups) {
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < (int64_t{1} << 30) ? (blocks > 0 ? blocks : 1) : (int64_t{1} << 30));
}

#define MMKERN_GRID_STRIDE(g, groups) \
  for (int64_t g = blockIdx.x * int64_t{kThreads} + threadIdx.x; g < (groups); g += int64_t{gridDim.x} * kThreads)

// --------------------------------------------------------------------------- add_noise / get_velocity

template <typename T>
__global__ void __launch_bounds__(kThreads) noise_mix_kernel(const T* __restrict__ x, const T* __restrict__ noise,
                                                             T* __restrict__ out, IndexRef t, TableRef table,
                                                             int64_t numel, Divider per_sample, bool velocity,
                                                             bool vec) {
  constexpr int N = 16 / sizeof(T);
  const int64_t groups = (numel + N - 1) / N;
  MMKERN_GRID_STRIDE(g, groups) {
    const int64_t start = g * N;
    float xv[N], nv[N], ov[N];
    load_group<N>(x, start, numel, vec, xv);
    load_group<N>(noise, start, numel, vec, nv);
    Cursor cur(start, per_sample);
    int64_t cached = -1;
    MixCoef c{0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (start + j < numel && cur.b != cached) { cached = cur.b; c = mix_coefficients(table.at(t(cur.b)), velocity); }
      ov[j] = c.ca * xv[j] + c.cb * nv[j];
      cur.next();
    }
    store_group<N>(out, start, numel, vec, ov);
  }
}

// out = x + sigma_b * noise (euler_add_noise), or x / sqrt(sigma_b^2 + 1) (noise == nullptr: scale_model_input)
template <typename T>
__global__ void __launch_bounds__(kThreads) sigma_mix_kernel(const T* __restrict__ x, const T* __restrict__ noise,
                                                             T* __restrict__ out, IndexRef idx, TableRef table,
                                                             int64_t numel, Divider per_sample, bool vec) {
  constexpr int N = 16 / sizeof(T);
  const int64_t groups = (numel + N - 1) / N;
  MMKERN_GRID_STRIDE(g, groups) {
    const int64_t start = g * N;
    float xv[N], nv[N], ov[N];
    load_group<N>(x, start, numel, vec, xv);
    if (noise != nullptr) load_group<N>(noise, start, numel, vec, nv);
    Cursor cur(start, per_sample);
    int64_t cached = -1;
    float sigma = 0.0f, inv_denom = 1.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (start + j < numel && cur.b != cached) {
        cached = cur.b;
        sigma = table.at(idx(cur.b));
        inv_denom = fdiv(1.0f, sqrtf(sigma * sigma + 1.0f));
      }
      ov[j] = noise != nullptr ? xv[j] + sigma * nv[j] : xv[j] * inv_denom;
      cur.next();
    }
    store_group<N>(out, start, numel, vec, ov);
  }
}

// --------------------------------------------------------------------------- loss

template <typename T>
__device__ __forceinline__ void loss_terms(const T* __restrict__ mo, const T* __restrict__ x0,
                                           const T* __restrict__ noise, const IndexRef& t, const TableRef& table,
                                           int64_t start, int64_t numel, Divider per_sample, int prediction,
                                           float snr_gamma, bool vec, float (&w)[16 / sizeof(T)],
                                           float (&diff)[16 / sizeof(T)]) {
  constexpr int N = 16 / sizeof(T);
  float xv[N], nv[N];
  load_group<N>(mo, start, numel, vec, diff);
  if (prediction != kEpsilon) load_group<N>(x0, start, numel, vec, xv);
  if (prediction != kSample) load_group<N>(noise, start, numel, vec, nv);
  // one sample segment of the group at a time: the coefficient code is emitted once (see alpha_step_kernel)
#pragma unroll
  for (int j = 0; j < N; ++j) w[j] = 0.0f;
  Cursor cur(start, per_sample);
  for (int j0 = 0; j0 < N && start + j0 < numel;) {
    const int len = static_cast<int>(cur.per_sample - cur.r < N - j0 ? cur.per_sample - cur.r : N - j0);
    const LossCoef c = loss_coefficients(table.at(t(cur.b)), prediction, snr_gamma);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (j < j0 || j >= j0 + len) continue;
      float target = 0.0f;
      if (prediction != kEpsilon) target = c.tx0 * xv[j];
      if (prediction != kSample) target += c.tn * nv[j];
      diff[j] -= target;
      w[j] = start + j < numel ? c.w : 0.0f;
    }
    j0 += len;
    cur.r += len;
    if (cur.r == cur.per_sample) { cur.r = 0; ++cur.b; }
  }
}

// Sum over the block, fixed order (warp shuffles, then warp 0 adds the warps' sums in order); thread 0 has it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) total += warp_sums[i];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) loss_partials_kernel(const T* __restrict__ mo, const T* __restrict__ x0,
                                                                 const T* __restrict__ noise, IndexRef t,
                                                                 TableRef table, float* __restrict__ partials,
                                                                 int64_t numel, Divider per_sample, int prediction,
                                                                 float snr_gamma, bool vec) {
  constexpr int N = 16 / sizeof(T);
  const int64_t groups = (numel + N - 1) / N;
  float acc = 0.0f;
  MMKERN_GRID_STRIDE(g, groups) {
    float w[N], diff[N];
    loss_terms<T>(mo, x0, noise, t, table, g * N, numel, per_sample, prediction, snr_gamma, vec, w, diff);
#pragma unroll
    for (int j = 0; j < N; ++j) acc += w[j] * diff[j] * diff[j];
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kThreads) loss_finish_kernel(const float* __restrict__ partials, int n,
                                                               float scale, float* __restrict__ out) {
  float acc = 0.0f;
  for (int i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  const float total = block_sum(acc);
  if (threadIdx.x == 0) *out = total * scale;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(const float* __restrict__ grad,
                                                                 const T* __restrict__ mo, const T* __restrict__ x0,
                                                                 const T* __restrict__ noise, IndexRef t,
                                                                 TableRef table, T* __restrict__ d_mo, int64_t numel,
                                                                 Divider per_sample, int prediction, float snr_gamma,
                                                                 float scale, bool vec) {
  constexpr int N = 16 / sizeof(T);
  const int64_t groups = (numel + N - 1) / N;
  const float factor = *grad * scale;
  MMKERN_GRID_STRIDE(g, groups) {
    float w[N], diff[N], out[N];
    loss_terms<T>(mo, x0, noise, t, table, g * N, numel, per_sample, prediction, snr_gamma, vec, w, diff);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = factor * w[j] * diff[j];
    store_group<N>(d_mo, g * N, numel, vec, out);
  }
}

// --------------------------------------------------------------------------- DDPM / DDIM

enum StepKind : int { kX0Only = 0, kDDPM = 1, kDDIM = 2 };

struct AlphaStepParams {
  IndexRef t, t_prev;
  TableRef table;
  int64_t numel, mo_stride;
  Divider per_sample{1};
  int kind, prediction, variance;
  float alpha_prev_if_negative, eta, clip;
  bool clipped_eps, vec, vec_mo;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) alpha_step_kernel(const T* __restrict__ mo, const T* __restrict__ sample,
                                                              const T* __restrict__ noise,
                                                              const float* __restrict__ threshold,
                                                              T* __restrict__ out, T* __restrict__ x0_out,
                                                              float* __restrict__ x0_fp32, AlphaStepParams p) {
  constexpr int N = 16 / sizeof(T);
  const int64_t groups = (p.numel + N - 1) / N;
  const bool learned = p.kind == kDDPM && p.variance >= kLearned;
  MMKERN_GRID_STRIDE(g, groups) {
    const int64_t start = g * N;
    float mv[N], sv[N], nv[N], pv[N], ov[N], xv[N];
    load_group<N>(sample, start, p.numel, p.vec, sv);
    if (p.vec_mo) {
      load_group<N>(mo, start, p.numel, p.vec, mv);
    }
    {   // model_output rows may be 2C wide (a learned variance): gather by (b, r)
      Cursor cur(start, p.per_sample);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const bool in = start + j < p.numel;
        const int64_t off = cur.b * p.mo_stride + cur.r;
        if (!p.vec_mo) mv[j] = in ? static_cast<float>(mo[off]) : 0.0f;
        pv[j] = (learned && in) ? static_cast<float>(mo[off + static_cast<int64_t>(p.per_sample.d)]) : 1.0f;
        cur.next();
      }
    }
    const bool has_noise = noise != nullptr && p.kind != kX0Only;
    if (has_noise) load_group<N>(noise, start, p.numel, p.vec, nv);
    // The group's elements, one sample segment at a time (one segment unless the group straddles samples): the
    // coefficient code is emitted once, the element code once per lane (static indices keep the arrays in
    // registers).
    Cursor cur(start, p.per_sample);
    for (int j0 = 0; j0 < N && start + j0 < p.numel;) {
      const int len = static_cast<int>(cur.per_sample - cur.r < N - j0 ? cur.per_sample - cur.r : N - j0);
      AlphaCoef c;
      const int64_t tb = p.t(cur.b);
      const float a = p.table.at(tb);
      if (p.kind == kX0Only) {
        c.sqrt_a = sqrtf(a);
        c.sqrt_b = sqrtf(1.0f - a);
        c.inv_sqrt_a = fdiv(1.0f, c.sqrt_a);
        c.inv_sqrt_b = fdiv(1.0f, c.sqrt_b);
      } else {
        const float a_prev = alpha_prev(p.table, p.t_prev(cur.b), p.alpha_prev_if_negative);
        c = p.kind == kDDIM ? ddim_coefficients(a, a_prev, p.eta) : ddpm_coefficients(a, a_prev, tb, p.variance);
      }
      float lo = -p.clip, hi = p.clip, inv_s_b = 1.0f;
      if (threshold != nullptr) {
        const float s_b = threshold[cur.b];
        lo = -s_b;
        hi = s_b;
        inv_s_b = fdiv(1.0f, s_b);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (j < j0 || j >= j0 + len) continue;
        const float m = mv[j], s = sv[j];
        float x0, eps;
        if (p.prediction == kEpsilon) { x0 = (s - c.sqrt_b * m) * c.inv_sqrt_a; eps = m; }
        else if (p.prediction == kVPrediction) { x0 = c.sqrt_a * s - c.sqrt_b * m; eps = c.sqrt_a * m + c.sqrt_b * s; }
        else { x0 = m; eps = (s - c.sqrt_a * m) * c.inv_sqrt_b; }
        if (p.kind == kX0Only) {
          xv[j] = x0;
          continue;
        }
        x0 = fminf(fmaxf(x0, lo), hi) * inv_s_b;
        float res;
        if (p.kind == kDDIM) {
          if (p.clipped_eps) eps = (s - c.sqrt_a * x0) * c.inv_sqrt_b;
          res = c.c_x0 * x0 + c.c_s * eps;
          if (has_noise) res += c.std * nv[j];
        } else {
          res = c.c_x0 * x0 + c.c_s * s;
          if (has_noise && c.add_noise) {
            float std = c.std;
            if (p.variance == kLearned) {
              std = sqrtf(pv[j]);
            } else if (p.variance == kLearnedRange) {
              const float frac = (pv[j] + 1.0f) * 0.5f;
              std = expf(0.5f * (frac * c.log_current_beta + (1.0f - frac) * c.log_variance));
            }
            res += std * nv[j];
          }
        }
        ov[j] = res;
        xv[j] = x0;
      }
      j0 += len;
      cur.r += len;
      if (cur.r == cur.per_sample) { cur.r = 0; ++cur.b; }
    }
    if (p.kind == kX0Only) {
      store_group<N>(x0_fp32, start, p.numel, p.vec, xv);
    } else {
      store_group<N>(out, start, p.numel, p.vec, ov);
      store_group<N>(x0_out, start, p.numel, p.vec, xv);
    }
  }
}

// --------------------------------------------------------------------------- Euler

struct EulerParams {
  IndexRef idx;
  TableRef table;
  int64_t numel;
  Divider per_sample{1};
  int prediction;
  float gamma, s_tmin, s_tmax, s_noise;
  bool vec;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) euler_step_kernel(const T* __restrict__ mo, const T* __restrict__ sample,
                                                              const T* __restrict__ noise, T* __restrict__ out,
                                                              float* __restrict__ x0_out, EulerParams p) {
  constexpr int N = 16 / sizeof(T);
  const int64_t groups = (p.numel + N - 1) / N;
  MMKERN_GRID_STRIDE(g, groups) {
    const int64_t start = g * N;
    float mv[N], sv[N], nv[N], ov[N], xv[N];
    load_group<N>(mo, start, p.numel, p.vec, mv);
    load_group<N>(sample, start, p.numel, p.vec, sv);
    if (noise != nullptr) load_group<N>(noise, start, p.numel, p.vec, nv);
    Cursor cur(start, p.per_sample);
    int64_t cached = -1;
    EulerCoef c{};
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (start + j < p.numel && cur.b != cached) {
        cached = cur.b;
        const int64_t i = p.table.clamp(p.idx(cur.b), p.table.n - 2);
        c = euler_coefficients(p.table.raw(i), p.table.raw(i + 1), p.gamma, p.s_tmin, p.s_tmax, p.s_noise);
      }
      float s = sv[j];
      if (noise != nullptr) s += nv[j] * c.lift;
      float x0;
      if (p.prediction == kEpsilon) x0 = s - c.sigma_hat * mv[j];
      else if (p.prediction == kVPrediction) x0 = mv[j] * c.v_mo + s * c.v_s;
      else x0 = mv[j];
      ov[j] = s + (s - x0) * c.step;
      xv[j] = x0;
      cur.next();
    }
    store_group<N>(out, start, p.numel, p.vec, ov);
    store_group<N>(x0_out, start, p.numel, p.vec, xv);
  }
}

// --------------------------------------------------------------------------- host entry points

void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

#define MMKERN_LAUNCH(kernel, blocks, ...)                                                                   \
  do {                                                                                                       \
    kernel<<<(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);                        \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                          \
  } while (0)

template <typename T>
int64_t groups_of(int64_t numel) {
  constexpr int N = 16 / sizeof(T);
  return (numel + N - 1) / N;
}

at::Tensor noise_mix_cuda(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& noise,
                          const at::Tensor& timesteps, const at::Tensor& ac, bool velocity) {
  check_cuda(op, x, x_name);
  check_samples(op, x_name, x, x.device());
  check_like(op, "noise", noise, x_name, x);
  const IndexRef t = check_index(op, "timesteps", timesteps, x);
  const TableRef table = check_table(op, "alphas_cumprod", ac, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t per_sample = per_sample_of(x, t);
  MMKERN_DISPATCH_SAMPLES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(xp) && aligned16(np) && aligned16(o);
    MMKERN_LAUNCH(noise_mix_kernel<scalar_t>, blocks_for(groups_of<scalar_t>(numel)), xp, np, o, t, table, numel,
                  Divider(per_sample), velocity, vec);
  });
  return out;
}

at::Tensor add_noise_cuda(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& ac) {
  return noise_mix_cuda("mmkern_C::diffusion_add_noise", "original_samples", x, noise, t, ac, false);
}
at::Tensor get_velocity_cuda(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& ac) {
  return noise_mix_cuda("mmkern_C::diffusion_get_velocity", "sample", x, noise, t, ac, true);
}

struct LossSetup {
  IndexRef t;
  TableRef table;
  int prediction;
  int64_t numel, per_sample;
};

LossSetup check_loss_cuda(const char* op, const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& noise,
                          const at::Tensor& timesteps, const at::Tensor& ac, c10::string_view prediction_type) {
  check_cuda(op, mo, "model_output");
  check_samples(op, "model_output", mo, mo.device());
  check_like(op, "original_samples", x0, "model_output", mo);
  check_like(op, "noise", noise, "model_output", mo);
  LossSetup s{check_index(op, "timesteps", timesteps, mo), check_table(op, "alphas_cumprod", ac, mo),
              parse_prediction(op, std::string(prediction_type)), mo.numel(), 0};
  s.per_sample = per_sample_of(mo, s.t);
  return s;
}

at::Tensor loss_cuda(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps,
                     const at::Tensor& ac, c10::string_view prediction_type, double snr_gamma) {
  const char* op = "mmkern_C::diffusion_loss";
  const LossSetup s = check_loss_cuda(op, mo, x0, noise, timesteps, ac, prediction_type);
  const c10::cuda::CUDAGuard guard(mo.device());
  auto out = at::empty({}, mo.options().dtype(at::kFloat));
  if (s.numel == 0) return out.fill_(std::nan(""));
  MMKERN_DISPATCH_SAMPLES(mo.scalar_type(), op, [&] {
    const int64_t groups = groups_of<scalar_t>(s.numel);
    const int blocks = static_cast<int>(std::min<int64_t>((groups + kThreads - 1) / kThreads, kLossMaxBlocks));
    auto partials = at::empty({blocks}, mo.options().dtype(at::kFloat));
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    const bool vec = aligned16(mp) && aligned16(xp) && aligned16(np);
    MMKERN_LAUNCH(loss_partials_kernel<scalar_t>, blocks, mp, xp, np, s.t, s.table,
                  partials.mutable_data_ptr<float>(), s.numel, Divider(s.per_sample), s.prediction,
                  static_cast<float>(snr_gamma), vec);
    MMKERN_LAUNCH(loss_finish_kernel, 1, partials.const_data_ptr<float>(), blocks,
                  static_cast<float>(1.0 / static_cast<double>(s.numel)), out.mutable_data_ptr<float>());
  });
  return out;
}

at::Tensor loss_backward_cuda(const at::Tensor& grad, const at::Tensor& mo, const at::Tensor& x0,
                              const at::Tensor& noise, const at::Tensor& timesteps, const at::Tensor& ac,
                              c10::string_view prediction_type, double snr_gamma) {
  const char* op = "mmkern_C::diffusion_loss_backward";
  const LossSetup s = check_loss_cuda(op, mo, x0, noise, timesteps, ac, prediction_type);
  check_device(op, "grad", grad, mo.device());
  TORCH_CHECK(grad.dim() == 0 && grad.scalar_type() == at::kFloat, op, ": grad must be a 0-d float32 tensor, got ",
              grad.sizes(), " ", grad.scalar_type());
  const c10::cuda::CUDAGuard guard(mo.device());
  auto d_mo = at::empty_like(mo, at::MemoryFormat::Contiguous);
  if (s.numel == 0) return d_mo;
  MMKERN_DISPATCH_SAMPLES(mo.scalar_type(), op, [&] {
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    scalar_t* dp = d_mo.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(mp) && aligned16(xp) && aligned16(np) && aligned16(dp);
    MMKERN_LAUNCH(loss_backward_kernel<scalar_t>, blocks_for(groups_of<scalar_t>(s.numel)),
                  grad.const_data_ptr<float>(), mp, xp, np, s.t, s.table, dp, s.numel, Divider(s.per_sample),
                  s.prediction,
                  static_cast<float>(snr_gamma), static_cast<float>(2.0 / static_cast<double>(s.numel)), vec);
  });
  return d_mo;
}

// ---- DDPM / DDIM / x0

struct StepSetup {
  AlphaStepParams p;
  bool has_noise, has_threshold;
};

StepSetup check_alpha(const char* op, int kind, const at::Tensor& mo, const at::Tensor& sample,
                      const at::Tensor& timesteps, const at::Tensor* prev_timesteps, const at::Tensor& ac,
                      const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& threshold,
                      bool learned) {
  check_cuda(op, sample, "sample");
  check_samples(op, "sample", sample, sample.device());
  check_step_model_output(op, mo, sample, learned);
  StepSetup s{};
  s.p.t = check_index(op, "timesteps", timesteps, sample);
  s.p.t_prev = s.p.t;
  if (prev_timesteps) {
    s.p.t_prev = check_index(op, "prev_timesteps", *prev_timesteps, sample);
    TORCH_CHECK(prev_timesteps->sizes() == timesteps.sizes(), op, ": prev_timesteps must have the shape of "
                "timesteps (", timesteps.sizes(), "), got ", prev_timesteps->sizes());
  }
  s.p.table = check_table(op, "alphas_cumprod", ac, sample);
  s.has_noise = noise.has_value() && noise->defined();
  if (s.has_noise) check_like(op, "noise", *noise, "sample", sample);
  s.has_threshold = threshold.has_value() && threshold->defined();
  if (s.has_threshold) {
    check_device(op, "threshold", *threshold, sample.device());
    TORCH_CHECK(threshold->scalar_type() == at::kFloat && threshold->dim() == 1 &&
                    threshold->size(0) == sample.size(0) && threshold->is_contiguous(),
                op, ": threshold must be a contiguous (batch,) float32 tensor, got ", threshold->sizes(), " ",
                threshold->scalar_type());
  }
  const int64_t B = sample.size(0);
  s.p.numel = sample.numel();
  s.p.per_sample = Divider(B ? std::max<int64_t>(sample.numel() / B, 1) : 1);
  s.p.mo_stride = B ? std::max<int64_t>(mo.numel() / B, 1) : 1;
  s.p.kind = kind;
  return s;
}

template <typename scalar_t>
void launch_alpha(const at::Tensor& mo, const at::Tensor& sample, const c10::optional<at::Tensor>& noise,
                  const c10::optional<at::Tensor>& threshold, at::Tensor* out, at::Tensor* x0, at::Tensor* x0_fp32,
                  StepSetup& s) {
  const scalar_t* mp = mo.const_data_ptr<scalar_t>();
  const scalar_t* sp = sample.const_data_ptr<scalar_t>();
  const scalar_t* np = s.has_noise ? noise->const_data_ptr<scalar_t>() : nullptr;
  const float* tp = s.has_threshold ? threshold->const_data_ptr<float>() : nullptr;
  scalar_t* op_ = out ? out->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* xp = x0 ? x0->mutable_data_ptr<scalar_t>() : nullptr;
  float* xf = x0_fp32 ? x0_fp32->mutable_data_ptr<float>() : nullptr;
  s.p.vec_mo = s.p.mo_stride == static_cast<int64_t>(s.p.per_sample.d) && aligned16(mp);
  s.p.vec = aligned16(sp) && aligned16(np) && aligned16(op_) && aligned16(xp) && aligned16(xf);
  s.p.vec_mo = s.p.vec_mo && s.p.vec;
  MMKERN_LAUNCH(alpha_step_kernel<scalar_t>, blocks_for(groups_of<scalar_t>(s.p.numel)), mp, sp, np, tp, op_, xp, xf,
                s.p);
}

at::Tensor alpha_x0_cuda(const at::Tensor& mo, const at::Tensor& sample, const at::Tensor& timesteps,
                         const at::Tensor& ac, c10::string_view prediction_type) {
  const char* op = "mmkern_C::diffusion_alpha_x0";
  const bool learned = mo.dim() == sample.dim() && mo.dim() >= 2 && mo.sizes() != sample.sizes();
  StepSetup s = check_alpha(op, kX0Only, mo, sample, timesteps, nullptr, ac, c10::nullopt, c10::nullopt, learned);
  s.p.prediction = parse_prediction(op, std::string(prediction_type));
  s.p.clip = INFINITY;
  const c10::cuda::CUDAGuard guard(sample.device());
  auto x0 = at::empty({sample.size(0), static_cast<int64_t>(s.p.per_sample.d)}, sample.options().dtype(at::kFloat));
  if (s.p.numel == 0) return x0;
  MMKERN_DISPATCH_SAMPLES(sample.scalar_type(), op, [&] {
    launch_alpha<scalar_t>(mo, sample, c10::nullopt, c10::nullopt, nullptr, nullptr, &x0, s);
  });
  return x0;
}

std::tuple<at::Tensor, at::Tensor> alpha_step_cuda(const char* op, StepSetup& s, const at::Tensor& mo,
                                                   const at::Tensor& sample, const c10::optional<at::Tensor>& noise,
                                                   const c10::optional<at::Tensor>& threshold,
                                                   double clip_sample_range) {
  s.p.clip = clip_sample_range > 0 ? static_cast<float>(clip_sample_range) : INFINITY;
  const c10::cuda::CUDAGuard guard(sample.device());
  auto out = at::empty_like(sample, at::MemoryFormat::Contiguous);
  auto x0 = at::empty_like(sample, at::MemoryFormat::Contiguous);
  if (s.p.numel == 0) return {out, x0};
  MMKERN_DISPATCH_SAMPLES(sample.scalar_type(), op, [&] {
    launch_alpha<scalar_t>(mo, sample, noise, threshold, &out, &x0, nullptr, s);
  });
  return {out, x0};
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(const at::Tensor& mo, const at::Tensor& sample,
                                                  const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                                  const at::Tensor& ac, const c10::optional<at::Tensor>& noise,
                                                  const c10::optional<at::Tensor>& threshold,
                                                  c10::string_view prediction_type, c10::string_view variance_type,
                                                  double clip_sample_range) {
  const char* op = "mmkern_C::diffusion_ddpm_step";
  const int variance = parse_variance(op, std::string(variance_type));
  StepSetup s = check_alpha(op, kDDPM, mo, sample, timesteps, &prev_timesteps, ac, noise, threshold,
                            variance >= kLearned);
  s.p.prediction = parse_prediction(op, std::string(prediction_type));
  s.p.variance = variance;
  s.p.alpha_prev_if_negative = 1.0f;
  return alpha_step_cuda(op, s, mo, sample, noise, threshold, clip_sample_range);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& mo, const at::Tensor& sample,
                                                  const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                                  const at::Tensor& ac, double final_alpha_cumprod, double eta,
                                                  const c10::optional<at::Tensor>& noise_in,
                                                  const c10::optional<at::Tensor>& threshold,
                                                  c10::string_view prediction_type, double clip_sample_range,
                                                  bool use_clipped_model_output) {
  const char* op = "mmkern_C::diffusion_ddim_step";
  TORCH_CHECK(eta >= 0, op, ": eta must be >= 0, got ", eta);
  const c10::optional<at::Tensor> noise = eta > 0 ? noise_in : c10::nullopt;
  StepSetup s = check_alpha(op, kDDIM, mo, sample, timesteps, &prev_timesteps, ac, noise, threshold, false);
  s.p.prediction = parse_prediction(op, std::string(prediction_type));
  s.p.alpha_prev_if_negative = static_cast<float>(final_alpha_cumprod);
  s.p.eta = static_cast<float>(eta);
  s.p.clipped_eps = use_clipped_model_output;
  return alpha_step_cuda(op, s, mo, sample, noise, threshold, clip_sample_range);
}

// ---- Euler

std::tuple<at::Tensor, at::Tensor> euler_step_cuda(const at::Tensor& mo, const at::Tensor& sample,
                                                   const at::Tensor& step_index, const at::Tensor& sigmas,
                                                   const c10::optional<at::Tensor>& noise,
                                                   c10::string_view prediction_type, double gamma, double s_tmin,
                                                   double s_tmax, double s_noise) {
  const char* op = "mmkern_C::diffusion_euler_step";
  check_cuda(op, sample, "sample");
  check_samples(op, "sample", sample, sample.device());
  check_step_model_output(op, mo, sample, false);
  EulerParams p{};
  p.idx = check_index(op, "step_index", step_index, sample);
  p.table = check_table(op, "sigmas", sigmas, sample, 2);
  p.prediction = parse_prediction(op, std::string(prediction_type), true);
  const bool has_noise = noise.has_value() && noise->defined();
  if (has_noise) check_like(op, "noise", *noise, "sample", sample);
  p.numel = sample.numel();
  p.per_sample = Divider(sample.size(0) ? std::max<int64_t>(p.numel / sample.size(0), 1) : 1);
  p.gamma = static_cast<float>(gamma);
  p.s_tmin = static_cast<float>(s_tmin);
  p.s_tmax = static_cast<float>(s_tmax);
  p.s_noise = static_cast<float>(s_noise);
  const c10::cuda::CUDAGuard guard(sample.device());
  auto out = at::empty_like(sample, at::MemoryFormat::Contiguous);
  auto x0 = at::empty(sample.sizes(), sample.options().dtype(at::kFloat));
  if (p.numel == 0) return {out, x0};
  MMKERN_DISPATCH_SAMPLES(sample.scalar_type(), op, [&] {
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* sp = sample.const_data_ptr<scalar_t>();
    const scalar_t* np = has_noise ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    float* xp = x0.mutable_data_ptr<float>();
    p.vec = aligned16(mp) && aligned16(sp) && aligned16(np) && aligned16(op_) && aligned16(xp);
    MMKERN_LAUNCH(euler_step_kernel<scalar_t>, blocks_for(groups_of<scalar_t>(p.numel)), mp, sp, np, op_, xp, p);
  });
  return {out, x0};
}

at::Tensor sigma_mix_cuda(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor* noise,
                          const at::Tensor& step_index, const at::Tensor& sigmas) {
  check_cuda(op, x, x_name);
  check_samples(op, x_name, x, x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have a batch dimension, got shape ", x.sizes());
  if (noise) check_like(op, "noise", *noise, x_name, x);
  const IndexRef idx = check_index(op, "step_index", step_index, x);
  const TableRef table = check_table(op, "sigmas", sigmas, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t per_sample = per_sample_of(x, idx);
  MMKERN_DISPATCH_SAMPLES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* np = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16(xp) && aligned16(np) && aligned16(o);
    MMKERN_LAUNCH(sigma_mix_kernel<scalar_t>, blocks_for(groups_of<scalar_t>(numel)), xp, np, o, idx, table, numel,
                  Divider(per_sample), vec);
  });
  return out;
}

at::Tensor euler_scale_cuda(const at::Tensor& sample, const at::Tensor& step_index, const at::Tensor& sigmas) {
  return sigma_mix_cuda("mmkern_C::diffusion_euler_scale_model_input", "sample", sample, nullptr, step_index, sigmas);
}
at::Tensor euler_add_noise_cuda(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& step_index,
                                const at::Tensor& sigmas) {
  return sigma_mix_cuda("mmkern_C::diffusion_euler_add_noise", "original_samples", x, &noise, step_index, sigmas);
}

}  // namespace
}  // namespace mmkern_diffusion

TORCH_LIBRARY_IMPL(mmkern_C, CUDA, m) {
  using namespace mmkern_diffusion;
  m.impl("diffusion_add_noise", &add_noise_cuda);
  m.impl("diffusion_get_velocity", &get_velocity_cuda);
  m.impl("diffusion_loss", &loss_cuda);
  m.impl("diffusion_loss_backward", &loss_backward_cuda);
  m.impl("diffusion_alpha_x0", &alpha_x0_cuda);
  m.impl("diffusion_ddpm_step", &ddpm_step_cuda);
  m.impl("diffusion_ddim_step", &ddim_step_cuda);
  m.impl("diffusion_euler_step", &euler_step_cuda);
  m.impl("diffusion_euler_scale_model_input", &euler_scale_cuda);
  m.impl("diffusion_euler_add_noise", &euler_add_noise_cuda);
}
