// Argument checks shared by the CPU and CUDA entry points of the diffusion ops (private to csrc/diffusion/:
// csrc/common/ had no checks helpers when these were written). Every message names the op and the argument.
#pragma once

#include <string>

#include <ATen/ATen.h>

#include "diffusion/diffusion_math.h"

// Dispatch on the samples' dtype: one instantiation per sample dtype, Float, Half, BFloat16 (float64 is the
// reference backend's).
#define MMKERN_DISPATCH_SAMPLES(TYPE, OP, ...)                                                          \
  [&] {                                                                                                 \
    switch (TYPE) {                                                                                     \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                                \
      case at::kHalf: { using scalar_t = at::Half; return __VA_ARGS__(); }                              \
      case at::kBFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); }                      \
      default: TORCH_CHECK(false, OP, ": unsupported sample dtype ", TYPE);                             \
    }                                                                                                   \
  }()

namespace mmkern_diffusion {

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the samples, got ", t.device());
}

// A sample-like tensor: float32 / float16 / bfloat16, contiguous, on `device`.
inline void check_samples(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  check_device(op, name, t, device);
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must have dtype float32, float16 or bfloat16 (float64 runs on the reference backend), got ", s);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                       const at::Tensor& like) {
  check_samples(op, name, t, like.device());
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), op, ": ", name,
              " must have the shape and dtype of ", like_name, " (", like.sizes(), ", ", like.scalar_type(),
              "), got ", t.sizes(), ", ", t.scalar_type());
}

// A 0-d or (batch,) int32/int64 index tensor -> IndexRef.
inline IndexRef check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& samples) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  check_device(op, name, t, samples.device());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must have dtype int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(samples.dim() >= 1 || t.dim() == 0, op, ": ", name, " must be 0-d for 0-d samples");
  TORCH_CHECK(t.dim() == 0 || (t.dim() == 1 && t.size(0) == samples.size(0)), op, ": ", name,
              " must be 0-d or (batch,) with batch = ", samples.dim() ? samples.size(0) : 0, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  return IndexRef{t.data_ptr(), t.scalar_type() == at::kLong, t.dim() == 1 ? 1 : 0};
}

// A 1-D float32/float64 table of at least `min_size` entries -> TableRef.
inline TableRef check_table(const char* op, const char* name, const at::Tensor& t, const at::Tensor& samples,
                            int64_t min_size = 1) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  check_device(op, name, t, samples.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must have dtype float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) >= min_size, op, ": ", name, " must be 1-D with at least ", min_size,
              " entries, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  return TableRef{t.data_ptr(), t.scalar_type() == at::kDouble, t.size(0)};
}

inline int parse_prediction(const char* op, const std::string& p, bool euler = false) {
  if (p == "epsilon") return kEpsilon;
  if (p == "v_prediction") return kVPrediction;
  if (p == "sample" || (euler && p == "original_sample")) return kSample;
  TORCH_CHECK(false, op, ": prediction_type must be one of epsilon, v_prediction, sample",
              euler ? ", original_sample" : "", "; got '", p, "'");
}

inline int parse_variance(const char* op, const std::string& v) {
  static const char* names[] = {"fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                                "learned_range"};
  for (int i = 0; i < 6; ++i)
    if (v == names[i]) return i;
  TORCH_CHECK(false, op, ": variance_type must be one of fixed_small, fixed_small_log, fixed_large, "
              "fixed_large_log, learned, learned_range; got '", v, "'");
}

// Elements per sample when indices are per sample ((B,) index), else all elements share one index.
inline int64_t per_sample_of(const at::Tensor& samples, const IndexRef& index) {
  const int64_t numel = samples.numel();
  if (index.stride == 0 || samples.dim() == 0 || samples.size(0) == 0) return numel > 0 ? numel : 1;
  return numel / samples.size(0) > 0 ? numel / samples.size(0) : 1;
}

// The step ops' model_output: like sample, or (B, 2C, ...) when `learned` (prediction, then the variance).
inline void check_step_model_output(const char* op, const at::Tensor& mo, const at::Tensor& sample, bool learned) {
  check_samples(op, "model_output", mo, sample.device());
  TORCH_CHECK(sample.dim() >= 1, op, ": sample must have a batch dimension, got shape ", sample.sizes());
  TORCH_CHECK(mo.scalar_type() == sample.scalar_type(), op, ": model_output must have the dtype of sample (",
              sample.scalar_type(), "), got ", mo.scalar_type());
  if (learned) {
    TORCH_CHECK(sample.dim() >= 2 && mo.dim() == sample.dim() && mo.size(0) == sample.size(0) &&
                    mo.size(1) == 2 * sample.size(1) && mo.sizes().slice(2) == sample.sizes().slice(2),
                op, ": a learned variance needs model_output of shape (B, 2C, ...) for sample ", sample.sizes(),
                ", got ", mo.sizes());
  } else {
    TORCH_CHECK(mo.sizes() == sample.sizes(), op, ": model_output must have the shape of sample (",
                sample.sizes(), "), got ", mo.sizes());
  }
}

}  // namespace mmkern_diffusion
