// C++ CPU kernels of the diffusion ops (schemas: register.cpp; math: diffusion_math.h).
//
// Layout: samples (B, ...) are viewed flat; element i belongs to sample b = i / per_sample. The flat range is
// split by at::parallel_for; each thread walks the samples its chunk touches, computes that sample's fp32
// coefficients once (a few sqrt / div, from the gathered table entries) and streams the sample's segment with
// at::vec::Vectorized<float> (half types are converted to fp32 on load and rounded once on store).
// Traffic = the Triton kernels' (one read of each input, one write of each output); no temporaries.
// The loss is deterministic: fixed 16384-element chunks, each summed in a fixed order, then the chunk sums
// are added in chunk order (independent of the number of threads).
// One template instantiation per sample dtype (float, Half, BFloat16) per op.
// No FMA contraction in this file (an AVX2 + FMA build would contract a * b + c): the kernels round as the
// eager fp32 math they are compared with does (x0 = (s - sqrt(1 - a) mo) / sqrt(a) amplifies the rounding of
// the product by 1 / sqrt(a) ~ 150 at t = T - 1). Before the includes, so that every inline function agrees.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "common/cpu_output.h"
#include "common/cpu_vec_io.h"
#include "diffusion/diffusion_checks.h"
#include "diffusion/diffusion_math.h"

namespace mmkern_diffusion {
namespace {

using mmkern::cpu_vec::kV;
using mmkern::cpu_vec::Vec;
using mmkern::cpu_vec::vload;
using mmkern::cpu_vec::vstore;
constexpr int64_t kGrain = 32768;          // elements per parallel task (at::internal::GRAIN_SIZE)
constexpr int64_t kLossChunk = 16384;      // fixed reduction chunk of the loss (determinism)

// f(i, n) on [begin, end) in steps of kV (the last one partial)
template <typename F>
inline void vec_loop(int64_t begin, int64_t end, const F& f) {
  int64_t i = begin;
  for (; i + kV <= end; i += kV) f(i, kV);
  if (i < end) f(i, end - i);
}

// f(b, begin, end) for every sample segment of [0, numel), in parallel
template <typename F>
inline void for_each_segment(int64_t numel, int64_t per_sample, const F& f) {
  if (numel == 0) return;
  at::parallel_for(0, numel, kGrain, [&](int64_t lo, int64_t hi) {
    int64_t b = lo / per_sample;
    while (lo < hi) {
      const int64_t end = std::min(hi, (b + 1) * per_sample);
      f(b, lo, end);
      lo = end;
      ++b;
    }
  });
}

inline Vec clamp(const Vec& x, float lo, float hi) {
  return at::vec::minimum(at::vec::maximum(x, Vec(lo)), Vec(hi));
}


void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

// --------------------------------------------------------------------------- add_noise / get_velocity

at::Tensor noise_mix(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& noise,
                     const at::Tensor& timesteps, const at::Tensor& alphas_cumprod, bool velocity) {
  check_cpu(op, x, x_name);
  check_samples(op, x_name, x, x.device());
  check_like(op, "noise", noise, x_name, x);
  const IndexRef t = check_index(op, "timesteps", timesteps, x);
  const TableRef table = check_table(op, "alphas_cumprod", alphas_cumprod, x);
  auto out = mmkern::empty_output(x.sizes(), x.options());
  const int64_t numel = x.numel(), per_sample = per_sample_of(x, t);
  MMKERN_DISPATCH_SAMPLES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    for_each_segment(numel, per_sample, [&](int64_t b, int64_t begin, int64_t end) {
      const MixCoef c = mix_coefficients(table.at(t(b)), velocity);
      const Vec ca(c.ca), cb(c.cb);
      vec_loop(begin, end, [&](int64_t i, int64_t n) {
        vstore(op_ + i, ca * vload(xp + i, n) + cb * vload(np + i, n), n);
      });
    });
  });
  return out;
}

at::Tensor add_noise_cpu(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& ac) {
  return noise_mix("mmkern_C::diffusion_add_noise", "original_samples", x, noise, t, ac, false);
}
at::Tensor get_velocity_cpu(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& t, const at::Tensor& ac) {
  return noise_mix("mmkern_C::diffusion_get_velocity", "sample", x, noise, t, ac, true);
}

// --------------------------------------------------------------------------- loss

struct LossArgs {
  IndexRef t;
  TableRef table;
  int prediction;
  int64_t numel, per_sample;
};

LossArgs check_loss(const char* op, const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& noise,
                    const at::Tensor& timesteps, const at::Tensor& ac, const std::string& prediction_type) {
  check_cpu(op, mo, "model_output");
  check_samples(op, "model_output", mo, mo.device());
  check_like(op, "original_samples", x0, "model_output", mo);
  check_like(op, "noise", noise, "model_output", mo);
  LossArgs args{check_index(op, "timesteps", timesteps, mo), check_table(op, "alphas_cumprod", ac, mo),
                parse_prediction(op, prediction_type), mo.numel(), 0};
  args.per_sample = per_sample_of(mo, args.t);
  return args;
}

at::Tensor loss_cpu(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps,
                    const at::Tensor& ac, c10::string_view prediction_type, double snr_gamma) {
  const char* op = "mmkern_C::diffusion_loss";
  const LossArgs a = check_loss(op, mo, x0, noise, timesteps, ac, std::string(prediction_type));
  const int64_t n_chunks = (a.numel + kLossChunk - 1) / kLossChunk;
  std::vector<double> partials(static_cast<size_t>(n_chunks), 0.0);
  MMKERN_DISPATCH_SAMPLES(mo.scalar_type(), op, [&] {
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * kLossChunk, hi = std::min(a.numel, lo + kLossChunk);
        double chunk = 0.0;
        for (int64_t b = lo / a.per_sample, begin = lo; begin < hi; ++b) {
          const int64_t end = std::min(hi, (b + 1) * a.per_sample);
          const LossCoef k = loss_coefficients(a.table.at(a.t(b)), a.prediction, static_cast<float>(snr_gamma));
          const Vec tx0(k.tx0), tn(k.tn);
          Vec acc(0.0f);
          vec_loop(begin, end, [&](int64_t i, int64_t n) {
            Vec target = Vec(0.0f);
            if (a.prediction != kEpsilon) target = tx0 * vload(xp + i, n);
            if (a.prediction != kSample) target = target + tn * vload(np + i, n);
            const Vec diff = vload(mp + i, n) - target;     // partial vectors: zero padding gives diff 0
            acc = at::vec::fmadd(diff, diff, acc);
          });
          float lanes[kV];
          acc.store(lanes);
          double segment = 0.0;
          for (int64_t j = 0; j < kV; ++j) segment += lanes[j];
          chunk += static_cast<double>(k.w) * segment;
          begin = end;
        }
        partials[static_cast<size_t>(c)] = chunk;
      }
    });
  });
  double total = 0.0;
  for (double p : partials) total += p;       // chunk order: deterministic
  const double mean = a.numel ? total / static_cast<double>(a.numel) : std::nan("");
  return at::scalar_tensor(mean, mo.options().dtype(at::kFloat));
}

at::Tensor loss_backward_cpu(const at::Tensor& grad, const at::Tensor& mo, const at::Tensor& x0,
                             const at::Tensor& noise, const at::Tensor& timesteps, const at::Tensor& ac,
                             c10::string_view prediction_type, double snr_gamma) {
  const char* op = "mmkern_C::diffusion_loss_backward";
  const LossArgs a = check_loss(op, mo, x0, noise, timesteps, ac, std::string(prediction_type));
  check_cpu(op, grad, "grad");
  TORCH_CHECK(grad.dim() == 0 && grad.scalar_type() == at::kFloat, op, ": grad must be a 0-d float32 tensor, got ",
              grad.sizes(), " ", grad.scalar_type());
  auto d_mo = mmkern::empty_output(mo.sizes(), mo.options());
  const float scale = grad.item<float>() * (a.numel ? 2.0f / static_cast<float>(a.numel) : 0.0f);
  MMKERN_DISPATCH_SAMPLES(mo.scalar_type(), op, [&] {
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* xp = x0.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    scalar_t* dp = d_mo.mutable_data_ptr<scalar_t>();
    for_each_segment(a.numel, a.per_sample, [&](int64_t b, int64_t begin, int64_t end) {
      const LossCoef k = loss_coefficients(a.table.at(a.t(b)), a.prediction, static_cast<float>(snr_gamma));
      const Vec tx0(k.tx0), tn(k.tn), factor(scale * k.w);
      vec_loop(begin, end, [&](int64_t i, int64_t n) {
        Vec target = Vec(0.0f);
        if (a.prediction != kEpsilon) target = tx0 * vload(xp + i, n);
        if (a.prediction != kSample) target = target + tn * vload(np + i, n);
        vstore(dp + i, factor * (vload(mp + i, n) - target), n);
      });
    });
  });
  return d_mo;
}

// --------------------------------------------------------------------------- DDPM / DDIM

// x0 and eps from the model output (before clipping)
inline void predict(int prediction, const Vec& mo, const Vec& s, float sqrt_a, float sqrt_b, Vec& x0, Vec& eps) {
  if (prediction == kEpsilon) {
    x0 = (s - Vec(sqrt_b) * mo) / Vec(sqrt_a);
    eps = mo;
  } else if (prediction == kVPrediction) {
    x0 = Vec(sqrt_a) * s - Vec(sqrt_b) * mo;
    eps = Vec(sqrt_a) * mo + Vec(sqrt_b) * s;
  } else {
    x0 = mo;
    eps = (s - Vec(sqrt_a) * mo) / Vec(sqrt_b);
  }
}

struct StepLayout {
  int64_t numel, per_sample, mo_stride;   // mo_stride: elements per sample of model_output (2x when learned)
};

StepLayout step_layout(const at::Tensor& mo, const at::Tensor& sample) {
  const int64_t B = sample.size(0);
  const int64_t per_sample = B ? std::max<int64_t>(sample.numel() / B, 1) : 1;
  return {sample.numel(), per_sample, B ? std::max<int64_t>(mo.numel() / B, 1) : 1};
}

at::Tensor alpha_x0_cpu(const at::Tensor& mo, const at::Tensor& sample, const at::Tensor& timesteps,
                        const at::Tensor& ac, c10::string_view prediction_type) {
  const char* op = "mmkern_C::diffusion_alpha_x0";
  check_cpu(op, sample, "sample");
  check_samples(op, "sample", sample, sample.device());
  const bool learned = mo.dim() == sample.dim() && mo.dim() >= 2 && mo.sizes() != sample.sizes();
  check_step_model_output(op, mo, sample, learned);
  const IndexRef t = check_index(op, "timesteps", timesteps, sample);
  const TableRef table = check_table(op, "alphas_cumprod", ac, sample);
  const int prediction = parse_prediction(op, std::string(prediction_type));
  const StepLayout L = step_layout(mo, sample);
  auto x0 = at::empty({sample.size(0), L.per_sample}, sample.options().dtype(at::kFloat));
  MMKERN_DISPATCH_SAMPLES(sample.scalar_type(), op, [&] {
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* sp = sample.const_data_ptr<scalar_t>();
    float* xp = x0.mutable_data_ptr<float>();
    for_each_segment(L.numel, L.per_sample, [&](int64_t b, int64_t begin, int64_t end) {
      const float a = table.at(t(b));
      const float sqrt_a = std::sqrt(a), sqrt_b = std::sqrt(1.0f - a);
      const scalar_t* mo_b = mp + b * L.mo_stride - b * L.per_sample;    // mo_b[i] for flat sample index i
      vec_loop(begin, end, [&](int64_t i, int64_t n) {
        Vec x, eps;
        predict(prediction, vload(mo_b + i, n), vload(sp + i, n), sqrt_a, sqrt_b, x, eps);
        vstore(xp + i, x, n);
      });
    });
  });
  return x0;
}

// Shared by DDPM (ddim = false) and DDIM: per-sample coefficients, clip / threshold, the update.
std::tuple<at::Tensor, at::Tensor> alpha_step_cpu(const char* op, bool ddim, const at::Tensor& mo,
                                                  const at::Tensor& sample, const at::Tensor& timesteps,
                                                  const at::Tensor& prev_timesteps, const at::Tensor& ac,
                                                  const c10::optional<at::Tensor>& noise_opt,
                                                  const c10::optional<at::Tensor>& threshold_opt,
                                                  int prediction, int variance, double clip_sample_range,
                                                  double alpha_prev_if_negative, double eta, bool clipped_eps) {
  check_cpu(op, sample, "sample");
  check_samples(op, "sample", sample, sample.device());
  const bool learned = !ddim && variance >= kLearned;
  check_step_model_output(op, mo, sample, learned);
  const IndexRef t = check_index(op, "timesteps", timesteps, sample);
  const IndexRef t_prev = check_index(op, "prev_timesteps", prev_timesteps, sample);
  TORCH_CHECK(prev_timesteps.sizes() == timesteps.sizes(), op, ": prev_timesteps must have the shape of timesteps (",
              timesteps.sizes(), "), got ", prev_timesteps.sizes());
  const TableRef table = check_table(op, "alphas_cumprod", ac, sample);
  const bool has_noise = noise_opt.has_value() && noise_opt->defined();
  if (has_noise) check_like(op, "noise", *noise_opt, "sample", sample);
  const bool has_threshold = threshold_opt.has_value() && threshold_opt->defined();
  if (has_threshold) {
    const at::Tensor& thr = *threshold_opt;
    check_device(op, "threshold", thr, sample.device());
    TORCH_CHECK(thr.scalar_type() == at::kFloat && thr.dim() == 1 && thr.size(0) == sample.size(0) &&
                    thr.is_contiguous(),
                op, ": threshold must be a contiguous (batch,) float32 tensor, got ", thr.sizes(), " ",
                thr.scalar_type());
  }
  const StepLayout L = step_layout(mo, sample);
  auto out = mmkern::empty_output(sample.sizes(), sample.options());
  auto x0_out = mmkern::empty_output(sample.sizes(), sample.options());
  const float clip = clip_sample_range > 0 ? static_cast<float>(clip_sample_range) : INFINITY;
  MMKERN_DISPATCH_SAMPLES(sample.scalar_type(), op, [&] {
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* sp = sample.const_data_ptr<scalar_t>();
    const scalar_t* np = has_noise ? noise_opt->const_data_ptr<scalar_t>() : nullptr;
    const float* thr = has_threshold ? threshold_opt->const_data_ptr<float>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    scalar_t* xp = x0_out.mutable_data_ptr<scalar_t>();
    for_each_segment(L.numel, L.per_sample, [&](int64_t b, int64_t begin, int64_t end) {
      const int64_t tb = t(b);
      const float a = table.at(tb);
      const float a_prev = alpha_prev(table, t_prev(b), static_cast<float>(alpha_prev_if_negative));
      const AlphaCoef c = ddim ? ddim_coefficients(a, a_prev, static_cast<float>(eta))
                               : ddpm_coefficients(a, a_prev, tb, variance);
      const float s_b = thr ? thr[b] : 1.0f;
      const float lo = thr ? -s_b : -clip, hi = thr ? s_b : clip;
      const bool noisy = np != nullptr && c.add_noise;
      const scalar_t* mo_b = mp + b * L.mo_stride - b * L.per_sample;    // mo_b[i] for flat sample index i
      const scalar_t* pv_b = mo_b + L.per_sample;                          // the learned variance half
      vec_loop(begin, end, [&](int64_t i, int64_t n) {
        const Vec s = vload(sp + i, n);
        Vec x0, eps;
        predict(prediction, vload(mo_b + i, n), s, c.sqrt_a, c.sqrt_b, x0, eps);
        x0 = clamp(x0, lo, hi);
        if (thr) x0 = x0 / Vec(s_b);
        Vec res;
        if (ddim) {
          if (clipped_eps) eps = (s - Vec(c.sqrt_a) * x0) / Vec(c.sqrt_b);
          res = Vec(c.c_x0) * x0 + Vec(c.c_s) * eps;
          if (noisy) res = res + Vec(c.std) * vload(np + i, n);
        } else {
          res = Vec(c.c_x0) * x0 + Vec(c.c_s) * s;
          if (noisy) {
            Vec std(c.std);
            if (variance == kLearned) {
              std = vload(pv_b + i, n).sqrt();
            } else if (variance == kLearnedRange) {
              const Vec frac = (vload(pv_b + i, n) + Vec(1.0f)) * Vec(0.5f);
              std = (Vec(0.5f) * (frac * Vec(c.log_current_beta) + (Vec(1.0f) - frac) * Vec(c.log_variance))).exp();
            }
            res = res + std * vload(np + i, n);
          }
        }
        vstore(op_ + i, res, n);
        vstore(xp + i, x0, n);
      });
    });
  });
  return {out, x0_out};
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(const at::Tensor& mo, const at::Tensor& sample,
                                                 const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                                 const at::Tensor& ac, const c10::optional<at::Tensor>& noise,
                                                 const c10::optional<at::Tensor>& threshold,
                                                 c10::string_view prediction_type, c10::string_view variance_type,
                                                 double clip_sample_range) {
  const char* op = "mmkern_C::diffusion_ddpm_step";
  return alpha_step_cpu(op, false, mo, sample, timesteps, prev_timesteps, ac, noise, threshold,
                        parse_prediction(op, std::string(prediction_type)),
                        parse_variance(op, std::string(variance_type)), clip_sample_range, 1.0, 0.0, false);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& mo, const at::Tensor& sample,
                                                 const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                                 const at::Tensor& ac, double final_alpha_cumprod, double eta,
                                                 const c10::optional<at::Tensor>& noise,
                                                 const c10::optional<at::Tensor>& threshold,
                                                 c10::string_view prediction_type, double clip_sample_range,
                                                 bool use_clipped_model_output) {
  const char* op = "mmkern_C::diffusion_ddim_step";
  TORCH_CHECK(eta >= 0, op, ": eta must be >= 0, got ", eta);
  return alpha_step_cpu(op, true, mo, sample, timesteps, prev_timesteps, ac, eta > 0 ? noise : c10::nullopt,
                        threshold, parse_prediction(op, std::string(prediction_type)), kFixedSmall,
                        clip_sample_range, final_alpha_cumprod, eta, use_clipped_model_output);
}

// --------------------------------------------------------------------------- Euler

std::tuple<at::Tensor, at::Tensor> euler_step_cpu(const at::Tensor& mo, const at::Tensor& sample,
                                                  const at::Tensor& step_index, const at::Tensor& sigmas,
                                                  const c10::optional<at::Tensor>& noise_opt,
                                                  c10::string_view prediction_type, double gamma, double s_tmin,
                                                  double s_tmax, double s_noise) {
  const char* op = "mmkern_C::diffusion_euler_step";
  check_cpu(op, sample, "sample");
  check_samples(op, "sample", sample, sample.device());
  check_step_model_output(op, mo, sample, false);
  const IndexRef idx = check_index(op, "step_index", step_index, sample);
  const TableRef table = check_table(op, "sigmas", sigmas, sample, 2);
  const int prediction = parse_prediction(op, std::string(prediction_type), true);
  const bool has_noise = noise_opt.has_value() && noise_opt->defined();
  if (has_noise) check_like(op, "noise", *noise_opt, "sample", sample);
  const StepLayout L = step_layout(mo, sample);
  auto out = mmkern::empty_output(sample.sizes(), sample.options());
  // diffusers upcasts: x0 in fp32
  auto x0_out = mmkern::empty_output(sample.sizes(), sample.options().dtype(at::kFloat));
  MMKERN_DISPATCH_SAMPLES(sample.scalar_type(), op, [&] {
    const scalar_t* mp = mo.const_data_ptr<scalar_t>();
    const scalar_t* sp = sample.const_data_ptr<scalar_t>();
    const scalar_t* np = has_noise ? noise_opt->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    float* xp = x0_out.mutable_data_ptr<float>();
    for_each_segment(L.numel, L.per_sample, [&](int64_t b, int64_t begin, int64_t end) {
      const int64_t i_b = table.clamp(idx(b), table.n - 2);
      const EulerCoef c = euler_coefficients(table.raw(i_b), table.raw(i_b + 1), static_cast<float>(gamma),
                                             static_cast<float>(s_tmin), static_cast<float>(s_tmax),
                                             static_cast<float>(s_noise));
      vec_loop(begin, end, [&](int64_t i, int64_t n) {
        Vec s = vload(sp + i, n);
        const Vec m = vload(mp + i, n);
        if (np) s = s + vload(np + i, n) * Vec(c.lift);
        Vec x0;
        if (prediction == kEpsilon) x0 = s - Vec(c.sigma_hat) * m;
        else if (prediction == kVPrediction) x0 = m * Vec(c.v_mo) + s * Vec(c.v_s);
        else x0 = m;
        vstore(op_ + i, s + (s - x0) * Vec(c.step), n);
        vstore(xp + i, x0, n);
      });
    });
  });
  return {out, x0_out};
}

// out = ca_b * x + cn_b * noise with (ca, cn) from sigmas[step_index[b]]: the two sigma-only Euler ops
at::Tensor sigma_mix(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor* noise,
                     const at::Tensor& step_index, const at::Tensor& sigmas) {
  check_cpu(op, x, x_name);
  check_samples(op, x_name, x, x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have a batch dimension, got shape ", x.sizes());
  if (noise) check_like(op, "noise", *noise, x_name, x);
  const IndexRef idx = check_index(op, "step_index", step_index, x);
  const TableRef table = check_table(op, "sigmas", sigmas, x);
  auto out = mmkern::empty_output(x.sizes(), x.options());
  const int64_t numel = x.numel(), per_sample = per_sample_of(x, idx);
  MMKERN_DISPATCH_SAMPLES(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* np = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    for_each_segment(numel, per_sample, [&](int64_t b, int64_t begin, int64_t end) {
      const float sigma = table.at(idx(b));
      if (np) {     // euler_add_noise: x + sigma * noise
        const Vec sv(sigma);
        vec_loop(begin, end, [&](int64_t i, int64_t n) {
          vstore(op_ + i, vload(xp + i, n) + sv * vload(np + i, n), n);
        });
      } else {      // euler_scale_model_input: x / sqrt(sigma^2 + 1)
        const Vec d(std::sqrt(sigma * sigma + 1.0f));
        vec_loop(begin, end, [&](int64_t i, int64_t n) { vstore(op_ + i, vload(xp + i, n) / d, n); });
      }
    });
  });
  return out;
}

at::Tensor euler_scale_cpu(const at::Tensor& sample, const at::Tensor& step_index, const at::Tensor& sigmas) {
  return sigma_mix("mmkern_C::diffusion_euler_scale_model_input", "sample", sample, nullptr, step_index, sigmas);
}
at::Tensor euler_add_noise_cpu(const at::Tensor& x, const at::Tensor& noise, const at::Tensor& step_index,
                               const at::Tensor& sigmas) {
  return sigma_mix("mmkern_C::diffusion_euler_add_noise", "original_samples", x, &noise, step_index, sigmas);
}

}  // namespace
}  // namespace mmkern_diffusion

TORCH_LIBRARY_IMPL(mmkern_C, CPU, m) {
  using namespace mmkern_diffusion;
  m.impl("diffusion_add_noise", &add_noise_cpu);
  m.impl("diffusion_get_velocity", &get_velocity_cpu);
  m.impl("diffusion_loss", &loss_cpu);
  m.impl("diffusion_loss_backward", &loss_backward_cpu);
  m.impl("diffusion_alpha_x0", &alpha_x0_cpu);
  m.impl("diffusion_ddpm_step", &ddpm_step_cpu);
  m.impl("diffusion_ddim_step", &ddim_step_cpu);
  m.impl("diffusion_euler_step", &euler_step_cpu);
  m.impl("diffusion_euler_scale_model_input", &euler_scale_cpu);
  m.impl("diffusion_euler_add_noise", &euler_add_noise_cpu);
}
