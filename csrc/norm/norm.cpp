// The op schemas of residual + LayerNorm/RMSNorm (torch.ops.mmkern_C.*) and the checks both devices share.
// Kernels: norm_cpu.cpp (CPU key), norm_cuda.cu (CUDA key).
#include "norm/norm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"

namespace mmkern::norm {

at::ScalarType stream_dtype(const at::Tensor& x, const c10::optional<at::Tensor>& residual, bool residual_in_fp32) {
  if (residual.has_value()) return residual->scalar_type();
  return residual_in_fp32 ? at::kFloat : x.scalar_type();
}

static void check_stream_pair(const char* op, at::ScalarType x_dtype, at::ScalarType stream) {
  // (x, stream) pairs the kernels take: the stream in x's dtype, or float32.
  TORCH_CHECK_TYPE(stream == x_dtype || stream == at::kFloat, op, ": the residual stream (residual / pre) must have ",
                   "x's dtype (", x_dtype, ") or float32; got ", stream);
}

static int64_t check_modulation(const char* op, const c10::optional<at::Tensor>& shift,
                                const c10::optional<at::Tensor>& scale, int64_t rows, int64_t N,
                                const at::Device& device) {
  int64_t batch = 1;
  for (const auto* t : {&shift, &scale}) {
    if (t->has_value()) batch = (*t)->dim() == 2 ? (*t)->size(0) : -1;
  }
  TORCH_CHECK_VALUE(batch >= 0, op, ": shift and scale must be 2-D (batch, ", N, ")");
  const char* names[] = {"shift", "scale"};
  int i = 0;
  for (const auto* t : {&shift, &scale}) {
    check_param(op, names[i++], *t, {batch, N}, device);
  }
  TORCH_CHECK_VALUE((batch == 0 && rows == 0) || (batch > 0 && rows % batch == 0), op, ": shift/scale have ", batch,
                    " samples, which must divide the ", rows, " rows of x");
  return batch;
}

int64_t check_forward(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
                      double dropout_p, bool residual_in_fp32) {
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (rows, N); got shape ", x.sizes());
  const int64_t rows = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 1 && N <= kMaxN, op, ": x must have 1 to ", kMaxN, " columns; got ", N);
  check_rows(op, "x", x, rows, N);
  const auto device = x.device();
  if (residual.has_value()) {
    check_device(op, "residual", *residual, device);
    check_dtype(op, "residual", *residual, {at::kFloat, at::kHalf, at::kBFloat16});
    check_rows(op, "residual", *residual, rows, N);
  }
  check_stream_pair(op, x.scalar_type(), stream_dtype(x, residual, residual_in_fp32));
  check_param(op, "weight", weight, {N}, device);
  check_param(op, "bias", bias, {N}, device);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); got ", dropout_p);
  const int64_t batch = check_modulation(op, shift, scale, rows, N, device);
  return batch > 0 ? rows / batch : rows;
}

int64_t check_backward(const char* op, const at::Tensor& dout, const c10::optional<at::Tensor>& dpre,
                       const at::Tensor& pre, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                       double dropout_p, bool has_shift, int64_t batch, at::ScalarType x_dtype) {
  TORCH_CHECK_TYPE(x_dtype == at::kFloat || x_dtype == at::kHalf || x_dtype == at::kBFloat16, op,
                   ": x_dtype must be float32, float16 or bfloat16; got ", x_dtype);
  check_dtype(op, "pre", pre, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(pre.dim() == 2, op, ": pre must be 2-D (rows, N); got shape ", pre.sizes());
  const int64_t rows = pre.size(0), N = pre.size(1);
  TORCH_CHECK_VALUE(N >= 1 && N <= kMaxN, op, ": pre must have 1 to ", kMaxN, " columns; got ", N);
  check_contiguous(op, "pre", pre);
  check_stream_pair(op, x_dtype, pre.scalar_type());
  const auto device = pre.device();
  check_device(op, "dout", dout, device);
  TORCH_CHECK_TYPE(dout.scalar_type() == x_dtype, op, ": dout must have x's dtype ", x_dtype, "; got ",
                   dout.scalar_type());
  check_rows(op, "dout", dout, rows, N);
  if (dpre.has_value()) {
    check_device(op, "dpre", *dpre, device);
    TORCH_CHECK_TYPE(dpre->scalar_type() == pre.scalar_type(), op, ": dpre must have pre's dtype ", pre.scalar_type(),
                     "; got ", dpre->scalar_type());
    check_rows(op, "dpre", *dpre, rows, N);
  }
  check_param(op, "weight", weight, {N}, device);
  check_param(op, "bias", bias, {N}, device);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); got ", dropout_p);
  TORCH_CHECK_VALUE(batch >= 0, op, ": batch must be >= 0; got ", batch);
  if (scale.has_value() || has_shift) {
    TORCH_CHECK_VALUE((batch == 0 && rows == 0) || (batch > 0 && rows % batch == 0), op, ": ", batch,
                      " modulation samples must divide the ", rows, " rows");
  } else {
    TORCH_CHECK_VALUE(batch == 1, op, ": batch must be 1 without modulation; got ", batch);
  }
  check_param(op, "scale", scale, {batch, N}, device);
  return batch > 0 ? rows / batch : rows;
}

BackwardResult reduce_partials(at::Tensor dx, at::Tensor d_residual, const at::Tensor& dweight_part,
                               const at::Tensor& dbias_part, const at::Tensor& dshift_part,
                               const at::Tensor& dscale_part, int64_t batch, const at::Tensor& like) {
  // torch's sum over dim 0 of a (chunks, N) contiguous float32 matrix: a fixed order per column.
  auto total = [&](const at::Tensor& part) {
    return part.defined() ? part.sum(0) : like.new_empty({0}, like.options().dtype(at::kFloat));
  };
  auto per_sample = [&](const at::Tensor& part) {
    if (!part.defined()) return like.new_empty({0}, like.options().dtype(at::kFloat));
    return part.view({batch, -1, part.size(1)}).sum(1);
  };
  return {std::move(dx), std::move(d_residual), total(dweight_part), total(dbias_part), per_sample(dshift_part),
          per_sample(dscale_part)};
}

}  // namespace mmkern::norm

TORCH_LIBRARY_FRAGMENT(mmkern_C, m) {
  // x (rows, N) with a free row stride; residual like x or None; weight/bias (N,) float32; shift/scale
  // (batch, N) float32. Returns out (like x), pre (stream dtype), mean (rows,) (empty for RMSNorm), rstd (rows,).
  m.def("norm_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, "
        "float eps, float dropout_p, int seed, bool residual_in_fp32, bool is_rms_norm) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // From the stored stream pre: (dx, d_residual, dweight, dbias, dshift, dscale), the last four float32;
  // each empty when its input was absent. batch: modulation samples (1 without modulation).
  m.def("norm_backward(Tensor dout, Tensor? dpre, Tensor pre, Tensor? weight, Tensor? bias, Tensor? scale, "
        "float eps, float dropout_p, int seed, bool is_rms_norm, bool has_residual, bool has_shift, int batch, "
        "ScalarType x_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // For tests: the bool keep mask (shape of `like`, row-major element index) the kernels draw on like's device.
  m.def("dropout_keep_mask(Tensor like, float dropout_p, int seed) -> Tensor");
}
