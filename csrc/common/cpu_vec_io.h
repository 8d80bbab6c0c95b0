// float32 vector loads and stores of float, Half and BFloat16 rows, shared by the C++ CPU kernels that
// stream elementwise (diffusion, norm): half-precision values are widened to fp32 in registers on load and
// rounded once (to nearest even, as torch's .to()) on store; nothing goes through an fp32 temporary array.
//   vload(p)          kV elements of p as one Vec<float>
//   vload(p, n)       n <= kV elements (the rest 0), through a local buffer
//   vstore(p, v, n)   the first n lanes of v into p
// With AVX2 (+ F16C, which every AVX2 build here enables) the half conversions are vcvtph2ps / vcvtps2ph and
// bf16 a 16-bit shift with rounding; without them fp16 goes through c10's bit-exact scalar conversion (at::vec's
// generic fp16 path is ~20x slower there).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>

namespace mmkern::cpu_vec {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kVecHasF16C = true;         // at::vec's fp16 conversions are vector instructions
#else
constexpr bool kVecHasF16C = false;
#endif

// ---- fp32 vector loads / stores of float, Half, BFloat16 (n < kV: a partial vector through a local buffer)
template <typename T>
inline Vec vload(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<T, at::Half> && !kVecHasF16C) {
    // c10's bit-exact conversion in a plain loop (at::vec's generic fp16 path is ~20x slower without F16C flags)
    float buf[kV];
    for (int64_t j = 0; j < kV; ++j) buf[j] = c10::detail::fp16_ieee_to_fp32_value(p[j].x);
    return Vec::loadu(buf);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}
template <typename T>
inline Vec vload(const T* p, int64_t n) {
  if (n == kV) return vload(p);
  T buf[kV];
  for (int64_t j = 0; j < kV; ++j) buf[j] = j < n ? p[j] : T(0.0f);
  return vload(static_cast<const T*>(buf));
}
template <typename T>
inline void vstore(T* p, const Vec& v, int64_t n) {
  // full vectors through fixed-size stores (Vectorized::store(ptr, count) is a variable-length memcpy call)
  if constexpr (std::is_same_v<T, float>) {
    if (n == kV) {
      v.store(p);
    } else {
      float buf[kV];
      v.store(buf);
      for (int64_t j = 0; j < n; ++j) p[j] = buf[j];
    }
  } else if constexpr (std::is_same_v<T, at::Half> && !kVecHasF16C) {
    float buf[kV];
    v.store(buf);
    for (int64_t j = 0; j < n; ++j) p[j].x = c10::detail::fp16_ieee_from_fp32_value(buf[j]);   // nearest even
  } else {
    // convert_from_float rounds to nearest even; its first kV lanes are v
    T buf[2 * kV];
    at::vec::convert_from_float<T>(v, v).store(buf);
    if (n == kV) {
      std::memcpy(p, buf, kV * sizeof(T));
    } else {
      for (int64_t j = 0; j < n; ++j) p[j] = buf[j];
    }
  }
}

// dst[0, n) as float32 from a row of dtype T (float32 rows are not converted).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kV <= n; j += kV) vload(src + j).store(dst + j);
  if (j < n) vload(src + j, n - j).store(dst + j, n - j);
}

// dst[0, n) of dtype T from a float32 row, rounded to nearest even.
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kV <= n; j += kV) vstore(dst + j, Vec::loadu(src + j), kV);
  if (j < n) vstore(dst + j, Vec::loadu(src + j, n - j), n - j);
}

}  // namespace mmkern::cpu_vec
