// Argument checks shared by every C++ entry point of mmkern._C.
//
// Each message names the op, the argument, what it got and what is allowed (TORCH_CHECK raises
// c10::Error, which reaches Python as RuntimeError/ValueError/TypeError): a wrong device, dtype,
// shape or layout is an error, never a crash or a silent misread.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <string>

namespace mmkern {

inline std::string dtype_names(std::initializer_list<at::ScalarType> allowed) {
  std::string names;
  for (auto t : allowed) {
    if (!names.empty()) names += ", ";
    names += c10::toString(t);
  }
  return names;
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto a : allowed) {
    if (t.scalar_type() == a) return;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must have dtype ", dtype_names(allowed), "; got ", t.scalar_type());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (the device of the first input); got ",
              t.device());
}

// A (rows, cols) matrix whose last dimension is contiguous; its row stride is free (>= cols when
// rows > 1, so rows never overlap).
inline void check_rows(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D (rows, ", cols, "); got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must have shape (", rows, ", ", cols,
                    "); got ", t.sizes());
  TORCH_CHECK_VALUE(cols <= 1 || t.stride(1) == 1, op, ": ", name,
                    " must have a contiguous last dimension (stride 1); got strides ", t.strides());
  TORCH_CHECK_VALUE(rows <= 1 || t.stride(0) >= cols, op, ": ", name, " rows overlap (row stride ", t.stride(0),
                    " < ", cols, " columns)");
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous; got strides ", t.strides(),
                    " for shape ", t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, "; got ", t.sizes());
}

// An optional float32 parameter vector/matrix (weight, bias, shift, scale): float32, contiguous, shape, device.
inline void check_param(const char* op, const char* name, const c10::optional<at::Tensor>& t, at::IntArrayRef shape,
                        const at::Device& device) {
  if (!t.has_value()) return;
  check_device(op, name, *t, device);
  check_dtype(op, name, *t, {at::kFloat});
  check_shape(op, name, *t, shape);
  check_contiguous(op, name, *t);
}

}  // namespace mmkern
