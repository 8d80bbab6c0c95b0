// Row-major GEMM for the C++ CPU kernels: C (M x N, float32) = alpha * op(A) op(B) + beta * C, with A and B
// each in float32, bfloat16 or float16, and float32 accumulation.
//
// Which GEMM runs, decided at run time (never assumed at build time):
// - "mkl": the BLAS torch itself calls for float32 CPU matmuls. torch's x86 wheels link Intel MKL statically
//   into libtorch_cpu.so and export its Fortran entry point SGEMM; it is declared here as a weak symbol, so a
//   torch without it (an ARM or macOS build) loads this library with a null pointer instead of failing to
//   load, and the portable path runs. MKL picks its own kernel for the CPU it finds (AVX2, AVX-512); called
//   from inside at::parallel_for it runs on the calling thread (MKL does not nest into an active OpenMP
//   region). (torch's bf16 matmuls go through oneDNN, which it does not export: see gemm() below.)
// - "portable": the loops below, vectorised with at::vec (float32 math; half operands converted per row).
//   MMKERN_CPU_GEMM=portable forces it (tests compare both paths).
// Results are deterministic for a given (M, N, K) on either path: single-threaded, fixed blocking.
//
// MKL is column-major: a row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, so A and B swap.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

extern "C" {
void SGEMM(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
           const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
           const int* ldc) __attribute__((weak));
}

namespace mmkern::cpu_gemm {

enum class Trans : bool { N = false, T = true };

inline bool portable_forced() {
  const char* choice = std::getenv("MMKERN_CPU_GEMM");
  return choice != nullptr && std::strcmp(choice, "portable") == 0;
}

// The GEMM the kernels run: "mkl" or "portable".
inline const char* gemm_name() { return (SGEMM != nullptr && !portable_forced()) ? "mkl" : "portable"; }

namespace detail {

using Vec = at::vec::Vectorized<float>;

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// dst[0..n) = float(src[0..n * stride) by stride)
template <typename T>
inline void load_strided(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    if constexpr (std::is_same_v<T, float>) std::memcpy(dst, src, n * sizeof(float));
    else at::vec::convert(src, dst, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i * stride]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()), Vec::loadu(b + i + Vec::size()), acc1);
  }
  for (; i + Vec::size() <= n; i += Vec::size()) acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  float s = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// The portable GEMM: row-major; op(A) (M x K) is A[m * lda + k] (N) or A[k * lda + m] (T); likewise op(B)
// (K x N) is B[k * ldb + n] (N) or B[n * ldb + k] (T). B^T (the scores' q k^T) runs as dot products over
// contiguous rows; B (p v, ds k) as row updates; A^T (p^T do, ds^T q) reads a column of A per output row.
template <typename TA, typename TB>
void gemm_portable(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const TA* A, int64_t lda,
                   const TB* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  std::vector<float> a_row(K), b_rows;
  auto scale_c = [&](float* c) {
    if (beta == 0.f) std::memset(c, 0, N * sizeof(float));
    else if (beta != 1.f) for (int64_t n = 0; n < N; ++n) c[n] *= beta;
  };
  if (tb == Trans::T) {            // C[m, n] = alpha * a_m . B[n, :]
    b_rows.resize(N * K);
    for (int64_t n = 0; n < N; ++n) load_strided(B + n * ldb, 1, K, b_rows.data() + n * K);
    for (int64_t m = 0; m < M; ++m) {
      if (ta == Trans::N) load_strided(A + m * lda, 1, K, a_row.data());
      else load_strided(A + m, lda, K, a_row.data());
      float* c = C + m * ldc;
      scale_c(c);
      for (int64_t n = 0; n < N; ++n) c[n] += alpha * dot(a_row.data(), b_rows.data() + n * K, K);
    }
    return;
  }
  b_rows.resize(K * N);            // C[m, :] = alpha * sum_k a_mk B[k, :]
  for (int64_t k = 0; k < K; ++k) load_strided(B + k * ldb, 1, N, b_rows.data() + k * N);
  for (int64_t m = 0; m < M; ++m) {
    if (ta == Trans::N) load_strided(A + m * lda, 1, K, a_row.data());
    else load_strided(A + m, lda, K, a_row.data());
    float* c = C + m * ldc;
    scale_c(c);
    // no skipping of zero a_mk: 0 * inf and 0 * NaN must give NaN, as in MKL and the float64 oracle
    for (int64_t k = 0; k < K; ++k) axpy(alpha * a_row[k], b_rows.data() + k * N, c, N);
  }
}

}  // namespace detail

namespace detail {

// op(X)'s stored region (rows x cols at stride ld) in float32: X itself when it is float32, else a contiguous
// converted copy in `buffer` (ld becomes cols).
template <typename T>
const float* as_float(const T* x, int64_t rows, int64_t cols, int64_t& ld, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    buffer.resize(rows * cols);
    for (int64_t r = 0; r < rows; ++r) load_strided(x + r * ld, 1, cols, buffer.data() + r * cols);
    ld = cols;
    return buffer.data();
  }
}

}  // namespace detail

// C (M x N, row stride ldc) = alpha * op(A) op(B) + beta * C, float32 accumulation; TA and TB are float,
// c10::BFloat16 or c10::Half. op(A) is M x K, op(B) is K x N (see detail::gemm_portable for the layouts).
// M, N or K may be 0.
// Half operands go through MKL's SGEMM after a conversion to float32 (thread-local buffers, O(MK + KN) next
// to the O(MNK) product), not through MKL's GEMM_BF16BF16F32 / GEMM_F16F16F32: measured on this machine's
// AMD EPYC (AVX-512 BF16, no AMX), the bf16 one runs at the float32 rate and the fp16 one at 0.6x of it.
template <typename TA, typename TB>
void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const TA* A, int64_t lda, const TB* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      float* c = C + m * ldc;
      for (int64_t n = 0; n < N; ++n) c[n] = beta == 0.f ? 0.f : beta * c[n];
    }
    return;
  }
  if (SGEMM != nullptr && !portable_forced()) {
    thread_local std::vector<float> a_buffer, b_buffer;
    const float* a = ta == Trans::N ? detail::as_float(A, M, K, lda, a_buffer) : detail::as_float(A, K, M, lda, a_buffer);
    const float* b = tb == Trans::N ? detail::as_float(B, K, N, ldb, b_buffer) : detail::as_float(B, N, K, ldb, b_buffer);
    // column-major call: C^T (N x M) = op(B)^T (N x K) op(A)^T (K x M)
    const char tb_c = tb == Trans::T ? 'T' : 'N', ta_c = ta == Trans::T ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int lb = static_cast<int>(ldb), la = static_cast<int>(lda), lc = static_cast<int>(ldc);
    SGEMM(&tb_c, &ta_c, &m, &n, &k, &alpha, b, &lb, a, &la, &beta, C, &lc);
    return;
  }
  detail::gemm_portable(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace mmkern::cpu_gemm
