// Shared by the C++ CPU kernels (diffusion_cpu.cpp) and the CUDA kernels (diffusion_cuda.cu) of the
// diffusion ops: reading the per-sample index and the schedule table, and the fp32 coefficient math.
//
// Numerics contract (the Triton kernels' one, mmkern/triton/diffusion*.py): indices are clamped into the
// table (GPU indices are never range-checked on the host: no sync), the table entry is read as fp32
// (a float64 table is rounded to fp32 on load), and every coefficient and every element is computed in
// fp32 whatever the samples' dtype; results are rounded once to the output dtype.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define MMKERN_HD __host__ __device__ __forceinline__
#else
#define MMKERN_HD inline
#endif

namespace mmkern_diffusion {

// a / b. On the GPU the fast division (__fdividef: <= 2 ulp for |b| < 2^126; the table's denominators are far
// inside that range): IEEE division's slow-path subroutine, next to sqrt's, makes ptxas save registers around
// the calls (reported as spills). The per-element divisions are multiplications by per-sample reciprocals.
MMKERN_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

// Prediction types of the ops (strings in the op schemas, ints inside the kernels).
enum Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };
// DDPM variance types, in mmkern/triton/diffusion_samplers.py's VARIANCE order.
enum Variance : int { kFixedSmall = 0, kFixedSmallLog = 1, kFixedLarge = 2, kFixedLargeLog = 3, kLearned = 4,
                      kLearnedRange = 5 };

// A 0-d or (B,) int32/int64 index tensor: stride 0 (one index for all samples) or 1.
struct IndexRef {
  const void* data;
  bool is64;
  int64_t stride;
  MMKERN_HD int64_t operator()(int64_t b) const {
    const int64_t i = b * stride;
    return is64 ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
  }
};

// A 1-D float32/float64 table (alphas_cumprod, sigmas) of n entries, read as fp32.
struct TableRef {
  const void* data;
  bool is_double;
  int64_t n;
  MMKERN_HD int64_t clamp(int64_t i, int64_t hi) const { return i < 0 ? 0 : (i > hi ? hi : i); }
  MMKERN_HD float raw(int64_t i) const {
    return is_double ? static_cast<float>(static_cast<const double*>(data)[i]) : static_cast<const float*>(data)[i];
  }
  // entry at i clamped into [0, n - 1]
  MMKERN_HD float at(int64_t i) const { return raw(clamp(i, n - 1)); }
};

// ---- add_noise / get_velocity: out = ca * x + cb * noise
struct MixCoef { float ca, cb; };
MMKERN_HD MixCoef mix_coefficients(float a, bool velocity) {
  const float sqrt_a = sqrtf(a), sqrt_b = sqrtf(1.0f - a);
  // add_noise: sqrt(a) x + sqrt(1 - a) n; get_velocity: sqrt(a) n - sqrt(1 - a) x
  return velocity ? MixCoef{-sqrt_b, sqrt_a} : MixCoef{sqrt_a, sqrt_b};
}

// ---- the loss: target = tx0 * x0 + tn * noise, weight w (Min-SNR-gamma, snr_gamma <= 0: none)
struct LossCoef { float w, tx0, tn; };
MMKERN_HD LossCoef loss_coefficients(float a, int prediction, float snr_gamma) {
  LossCoef c;
  // the min-SNR forms without divisions that give inf / NaN at a = 0 or 1 (denominators >= 1e-30)
  if (snr_gamma > 0.0f) {
    if (prediction == kEpsilon) c.w = fminf(fdiv(snr_gamma * (1.0f - a), fmaxf(a, 1e-30f)), 1.0f);
    else if (prediction == kVPrediction) c.w = fminf(a, snr_gamma * (1.0f - a));
    else c.w = fminf(fdiv(a, fmaxf(1.0f - a, 1e-30f)), snr_gamma);
  } else {
    c.w = 1.0f;
  }
  if (prediction == kEpsilon) { c.tx0 = 0.0f; c.tn = 1.0f; }
  else if (prediction == kVPrediction) { c.tx0 = -sqrtf(1.0f - a); c.tn = sqrtf(a); }
  else { c.tx0 = 1.0f; c.tn = 0.0f; }
  return c;
}

// ---- DDPM / DDIM: everything that depends on the sample's (t, t_prev) only
struct AlphaCoef {
  float sqrt_a, sqrt_b;        // sqrt(a_t), sqrt(1 - a_t)
  float inv_sqrt_a, inv_sqrt_b;   // their reciprocals (the GPU kernels multiply by them)
  float c_x0, c_s;             // DDPM posterior mean: c_x0 * x0 + c_s * sample; DDIM: sqrt(a_prev) x0 + c_s eps
  float std;                   // fixed DDPM std, or DDIM's eta * sigma_t (0 where no noise is added)
  float log_current_beta, log_variance;   // learned_range's two log variances
  bool add_noise;              // DDPM: t > 0
};

MMKERN_HD float alpha_prev(const TableRef& table, int64_t t_prev, float if_negative) {
  return t_prev >= 0 ? table.at(t_prev) : if_negative;
}

MMKERN_HD AlphaCoef ddpm_coefficients(float a, float a_prev, int64_t t, int variance_type) {
  AlphaCoef c;
  c.sqrt_a = sqrtf(a);
  const float beta = 1.0f - a, beta_prev = 1.0f - a_prev;
  c.sqrt_b = sqrtf(beta);
  c.inv_sqrt_a = fdiv(1.0f, c.sqrt_a);
  c.inv_sqrt_b = fdiv(1.0f, c.sqrt_b);
  const float current_alpha = fdiv(a, a_prev), current_beta = 1.0f - current_alpha;
  c.c_x0 = fdiv(sqrtf(a_prev) * current_beta, beta);
  c.c_s = fdiv(sqrtf(current_alpha) * beta_prev, beta);
  const float variance = fmaxf(fdiv(beta_prev, beta) * current_beta, 1e-20f);
  c.std = variance_type <= kFixedSmallLog ? sqrtf(variance) : sqrtf(current_beta);   // learned*: per element
  c.log_current_beta = logf(current_beta);
  c.log_variance = logf(variance);
  c.add_noise = t > 0;
  return c;
}

MMKERN_HD AlphaCoef ddim_coefficients(float a, float a_prev, float eta) {
  AlphaCoef c;
  c.sqrt_a = sqrtf(a);
  const float beta = 1.0f - a, beta_prev = 1.0f - a_prev;
  c.sqrt_b = sqrtf(beta);
  c.inv_sqrt_a = fdiv(1.0f, c.sqrt_a);
  c.inv_sqrt_b = fdiv(1.0f, c.sqrt_b);
  // sigma_t^2 / eta^2; the direction's coefficient from it, not from std * std: at eta = 1 and a = 0 (zero
  // terminal SNR) 1 - a_prev - std^2 is 0 in exact arithmetic, and sqrt(std)^2 rounds to +-1 ulp of it,
  // whose square root (2.4e-4) was the whole error; beta_prev - eta^2 var is exactly 0 there
  const float var = fdiv(beta_prev, beta) * (1.0f - fdiv(a, a_prev));
  c.std = eta * sqrtf(var);
  c.c_x0 = sqrtf(a_prev);
  c.c_s = sqrtf(fmaxf(beta_prev - eta * eta * var, 0.0f));
  c.log_current_beta = c.log_variance = 0.0f;
  c.add_noise = true;
  return c;
}

// ---- Euler
struct EulerCoef {
  float sigma, sigma_hat, lift;     // lift = s_noise * sqrt(sigma_hat^2 - sigma^2) (churn noise scale)
  float v_mo, v_s;                  // v_prediction: x0 = v_mo * mo + v_s * s
  float step;                       // (sigma_next - sigma_hat) / sigma_hat
};
MMKERN_HD EulerCoef euler_coefficients(float sigma, float sigma_next, float gamma, float s_tmin, float s_tmax,
                                       float s_noise) {
  EulerCoef c;
  const float churn = (s_tmin <= sigma && sigma <= s_tmax) ? gamma : 0.0f;
  c.sigma = sigma;
  c.sigma_hat = sigma * (churn + 1.0f);
  // sqrt(sigma_hat^2 - sigma^2) = sigma sqrt(churn (2 + churn)): exactly 0 without churn (the difference of
  // squares is +-1 ulp of sigma^2 once a compiler contracts it into an FMA)
  c.lift = s_noise * sigma * sqrtf(churn * (2.0f + churn));
  c.v_mo = fdiv(-sigma, sqrtf(sigma * sigma + 1.0f));
  c.v_s = fdiv(1.0f, sigma * sigma + 1.0f);
  c.step = fdiv(sigma_next - c.sigma_hat, c.sigma_hat);
  return c;
}

}  // namespace mmkern_diffusion
