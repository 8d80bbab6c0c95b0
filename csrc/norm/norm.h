// Residual + LayerNorm / RMSNorm: the op schemas (norm.cpp), shared by the CPU (norm_cpu.cpp) and
// CUDA (norm_cuda.cu) kernels. Semantics: mmkern/reference/norm.py; on rows of width N:
//     pre  = dropout(x) + residual            stored in the residual-stream dtype
//     xhat = (pre - mean) * rstd              RMSNorm: mean = 0, rstd = 1 / sqrt(mean(pre^2) + eps)
//     out  = (xhat * weight + bias) * (1 + scale[sample]) + shift[sample]
// All arithmetic in float32; the statistics read the float32 pre, before it is rounded to the stream dtype.
// weight, bias, shift and scale arrive as float32 (the Python adapter casts them: N or batch * N elements).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace mmkern::norm {

constexpr int64_t kMaxN = 65536;   // widest row the kernels take (as the Triton kernels)

// Checks shared by both devices; returns rows_per_sample (row r belongs to sample r / rows_per_sample).
int64_t check_forward(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
                      double dropout_p, bool residual_in_fp32);
int64_t check_backward(const char* op, const at::Tensor& dout, const c10::optional<at::Tensor>& dpre,
                       const at::Tensor& pre, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                       double dropout_p, bool has_shift, int64_t batch, at::ScalarType x_dtype);

// The residual-stream dtype: residual's, else float32 with residual_in_fp32, else x's.
at::ScalarType stream_dtype(const at::Tensor& x, const c10::optional<at::Tensor>& residual, bool residual_in_fp32);

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;   // out, pre, mean, rstd
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// dx, d_residual, dweight, dbias, dshift, dscale (float32 for the last four; empty when absent)

// Number of backward chunks per sample: each chunk (a run of consecutive rows of one sample) writes one
// float32 partial row per reduced gradient; the partials are then summed in a fixed order. The
// partition depends only on the shape (not on the thread count), so the result is bitwise reproducible.
inline int64_t chunks_per_sample(int64_t rows_per_sample, int64_t batch, int64_t target) {
  int64_t want = (target + batch - 1) / batch;
  if (want < 1) want = 1;
  return rows_per_sample < want ? rows_per_sample : want;
}

// dweight = sum over chunks, dbias likewise; dshift/dscale summed per sample. parts: (chunks, N) or undefined.
BackwardResult reduce_partials(at::Tensor dx, at::Tensor d_residual, const at::Tensor& dweight_part,
                               const at::Tensor& dbias_part, const at::Tensor& dshift_part,
                               const at::Tensor& dscale_part, int64_t batch, const at::Tensor& like);

}  // namespace mmkern::norm
