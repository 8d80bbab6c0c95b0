// CPU kernels of residual + LayerNorm / RMSNorm (torch.ops.mmkern_C.norm_forward / norm_backward, CPU key).
//
// Rows run in parallel (at::parallel_for); half-precision rows are converted once into float32 scratch
// rows (thread-local, N floats each, in L1/L2; vector conversions of common/cpu_vec_io.h; all-float32 rows are
// read and written in place) and the math runs
// with at::vec::Vectorized<float>, so one non-templated kernel serves every (x, stream) dtype pair:
// only the load/store conversions switch on the dtype.
// Traffic per row (forward): read x and residual once, write pre and out once.
// Row sums are cascaded (float vector partials over blocks of 1024, blocks added in double): at
// N = 65536 their error stays at float32 rounding of the result, not N times it.
//
// Backward: the rows of each sample are cut into a fixed number of chunks (norm.h, independent of the
// thread count); a chunk accumulates sum(dout * xhat) and sum(dout) over its rows in float32 and writes
// one partial row per reduced gradient; the partials are summed in a fixed order (reduce_partials).
//
// No FMA contraction in this file (an AVX2 + FMA build would fuse a * b + c): the kernels round as the eager
// fp32 math they are compared with. Before the includes, so that every inline function agrees.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "norm/norm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/cpu_output.h"
#include "common/cpu_vec_io.h"
#include "common/philox.h"
#include "common/philox_cpu.h"

namespace mmkern::norm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// ----------------------------------------------------------------------------- conversions

void load_row(const void* src, at::ScalarType dtype, float* dst, int64_t n) {
  switch (dtype) {
    case at::kFloat: std::memcpy(dst, src, n * sizeof(float)); break;
    case at::kHalf: cpu_vec::load_row(static_cast<const c10::Half*>(src), dst, n); break;
    case at::kBFloat16: cpu_vec::load_row(static_cast<const c10::BFloat16*>(src), dst, n); break;
    default: TORCH_CHECK(false, "mmkern norm: unexpected dtype ", dtype);
  }
}

// float32 -> dtype, rounding to nearest even (as torch's .to()).
void store_row(const float* src, at::ScalarType dtype, void* dst, int64_t n) {
  switch (dtype) {
    case at::kFloat: std::memcpy(dst, src, n * sizeof(float)); break;
    case at::kHalf: cpu_vec::store_row(src, static_cast<c10::Half*>(dst), n); break;
    case at::kBFloat16: cpu_vec::store_row(src, static_cast<c10::BFloat16*>(dst), n); break;
    default: TORCH_CHECK(false, "mmkern norm: unexpected dtype ", dtype);
  }
}

// ----------------------------------------------------------------------------- row reductions

// sum over j < n of term(j), where vec_term(j) gives kW terms at once. Cascaded: four vector partials per
// block of kBlock elements, block sums added in double.
template <typename VecTerm, typename ScalarTerm>
float cascade_sum(int64_t n, const VecTerm& vec_term, const ScalarTerm& scalar_term) {
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    int64_t j = start;
    for (; j + 4 * kW <= end; j += 4 * kW) {
      a0 += vec_term(j);
      a1 += vec_term(j + kW);
      a2 += vec_term(j + 2 * kW);
      a3 += vec_term(j + 3 * kW);
    }
    for (; j + kW <= end; j += kW) a0 += vec_term(j);
    float block = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, (a0 + a1) + (a2 + a3));
    for (; j < end; ++j) block += scalar_term(j);
    total += block;
  }
  return static_cast<float>(total);
}

float row_sum(const float* a, int64_t n) {
  return cascade_sum(n, [&](int64_t j) { return Vec::loadu(a + j); }, [&](int64_t j) { return a[j]; });
}

float row_dot(const float* a, const float* b, int64_t n) {
  return cascade_sum(n, [&](int64_t j) { return Vec::loadu(a + j) * Vec::loadu(b + j); },
                     [&](int64_t j) { return a[j] * b[j]; });
}

float row_centered_square_sum(const float* a, float mean, int64_t n) {
  const Vec m(mean);
  return cascade_sum(n, [&](int64_t j) { Vec d = Vec::loadu(a + j) - m; return d * d; },
                     [&](int64_t j) { float d = a[j] - mean; return d * d; });
}

// (mean, rstd) of a float32 row; mean = 0 for RMSNorm.
std::pair<float, float> row_stats(const float* pre, int64_t n, float eps, bool is_rms_norm) {
  const float mean = is_rms_norm ? 0.f : row_sum(pre, n) / static_cast<float>(n);
  const float var = row_centered_square_sum(pre, mean, n) / static_cast<float>(n);
  return {mean, 1.f / std::sqrt(var + eps)};
}

// a[j] = keep(seed, base + j) ? a[j] * scale : 0   (Philox: the same mask as the CUDA and Triton kernels;
// eight counters per AVX2 vector, common/philox_cpu.h; tested bit for bit against the scalar function).
void apply_dropout(float* a, int64_t n, uint64_t seed, int64_t base, float p, float scale) {
  dropout_scale(a, n, seed, static_cast<uint64_t>(base), p, scale);
}

// ----------------------------------------------------------------------------- forward

// dst = ((src - mean) * rstd * weight + bias) * (1 + scale) + shift in one pass (absent vectors skipped;
// dst may be src), rounded to T on the store (float: none).
template <typename T>
void affine_row(T* dst, const float* src, int64_t n, float mean, float rstd, const float* weight,
                const float* bias, const float* scale, const float* shift) {
  const Vec vmean(mean), vrstd(rstd), one(1.f);
  const auto affine = [&](int64_t j, int64_t m) {
    const auto load = [&](const float* p) { return m == kW ? Vec::loadu(p + j) : Vec::loadu(p + j, m); };
    Vec v = (load(src) - vmean) * vrstd;
    if (weight) v = v * load(weight);
    if (bias) v = v + load(bias);
    if (scale) v = v * (one + load(scale));
    if (shift) v = v + load(shift);
    cpu_vec::vstore(dst + j, v, m);
  };
  int64_t j = 0;
  for (; j + kW <= n; j += kW) affine(j, kW);
  if (j < n) affine(j, n - j);     // the tail as a partial vector: the same operations, so the same roundings
}

// dst = a + b (b may be null: a copy), float32 rows.
void add_rows(float* dst, const float* a, const float* b, int64_t n) {
  if (b == nullptr) {
    std::memcpy(dst, a, n * sizeof(float));
    return;
  }
  at::vec::map2<float>([](Vec u, Vec v) { return u + v; }, dst, a, b, n);
}

// row = x + residual in float32 (residual may be null) and pre = row rounded to TS, in one loop over the three
// streams. (Converting x and the residual into scratch rows first, each in a loop of its own, then adding and
// storing pre in two more, ran the half-precision rows at the float32 rows' time per element: half the
// bandwidth, one stream in flight at a time.) The roundings are those of that path: one per element, on the
// store of pre.
template <typename TX, typename TS>
void add_convert_row(const TX* x, const TS* residual, float* row, TS* pre, int64_t n) {
  const auto step = [&](int64_t j, int64_t m) {
    Vec v = m == kW ? cpu_vec::vload(x + j) : cpu_vec::vload(x + j, m);
    if (residual) v = v + (m == kW ? cpu_vec::vload(residual + j) : cpu_vec::vload(residual + j, m));
    if (m == kW) v.store(row + j); else v.store(row + j, m);
    cpu_vec::vstore(pre + j, v, m);
  };
  int64_t j = 0;
  for (; j + kW <= n; j += kW) step(j, kW);
  if (j < n) step(j, n - j);
}

struct ForwardArgs {
  const char* x; const char* residual;                    // rows with byte strides
  int64_t x_stride, residual_stride;                      // in bytes
  at::ScalarType x_dtype, residual_dtype, stream_dtype;
  const float* weight; const float* bias; const float* shift; const float* scale;
  char* out; char* pre;                                   // contiguous rows
  float* mean; float* rstd;
  int64_t N, rows_per_sample;
  float eps, dropout_p, dropout_scale;
  uint64_t seed;
  bool dropout, is_rms_norm;
};

// The half-precision rows without dropout: add_convert_row for x of type TX and the stream (residual, pre) of
// type TS.
template <typename TX, typename TS>
void add_convert_row(const ForwardArgs& a, int64_t r, float* row) {
  const TS* residual = a.residual ? reinterpret_cast<const TS*>(a.residual + r * a.residual_stride) : nullptr;
  add_convert_row(reinterpret_cast<const TX*>(a.x + r * a.x_stride), residual, row,
                  reinterpret_cast<TS*>(a.pre) + r * a.N, a.N);
}

template <typename TX>
void add_convert_row_stream(const ForwardArgs& a, int64_t r, float* row) {
  switch (a.stream_dtype) {            // the residual stream is x's dtype or float32 (norm.cpp: check_stream_pair)
    case at::kFloat: add_convert_row<TX, float>(a, r, row); break;
    case at::kHalf: add_convert_row<TX, c10::Half>(a, r, row); break;
    case at::kBFloat16: add_convert_row<TX, c10::BFloat16>(a, r, row); break;
    default: TORCH_CHECK(false, "mmkern norm: unexpected stream dtype ", a.stream_dtype);
  }
}

// out row r = affine(pre) in x's dtype
void affine_out_row(const ForwardArgs& a, int64_t r, const float* pre, float mean, float rstd, const float* scale,
                    const float* shift) {
  const int64_t offset = r * a.N;
  switch (a.x_dtype) {
    case at::kFloat:
      affine_row(reinterpret_cast<float*>(a.out) + offset, pre, a.N, mean, rstd, a.weight, a.bias, scale, shift);
      break;
    case at::kHalf:
      affine_row(reinterpret_cast<c10::Half*>(a.out) + offset, pre, a.N, mean, rstd, a.weight, a.bias, scale, shift);
      break;
    case at::kBFloat16:
      affine_row(reinterpret_cast<c10::BFloat16*>(a.out) + offset, pre, a.N, mean, rstd, a.weight, a.bias, scale,
                 shift);
      break;
    default: TORCH_CHECK(false, "mmkern norm: unexpected dtype ", a.x_dtype);
  }
}

void forward_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  std::vector<float> scratch(2 * N);
  float* row = scratch.data();            // pre (float32)
  float* tmp = row + N;                   // residual (half-precision rows with dropout)
  const int64_t stream_elt = c10::elementSize(a.stream_dtype);
  // All float32: read x and residual, write pre and out in place (no conversion copies).
  const bool float_rows = a.x_dtype == at::kFloat && a.stream_dtype == at::kFloat &&
                          (a.residual == nullptr || a.residual_dtype == at::kFloat);
  for (int64_t r = begin; r < end; ++r) {
    const float* pre;                     // the float32 pre the statistics read
    if (float_rows) {
      const float* x = reinterpret_cast<const float*>(a.x + r * a.x_stride);
      if (a.dropout) {
        std::memcpy(row, x, N * sizeof(float));
        apply_dropout(row, N, a.seed, r * N, a.dropout_p, a.dropout_scale);
        x = row;
      }
      float* pre_out = reinterpret_cast<float*>(a.pre) + r * N;
      add_rows(pre_out, x, a.residual ? reinterpret_cast<const float*>(a.residual + r * a.residual_stride) : nullptr,
               N);
      pre = pre_out;
    } else if (!a.dropout) {
      switch (a.x_dtype) {
        case at::kFloat: add_convert_row_stream<float>(a, r, row); break;
        case at::kHalf: add_convert_row_stream<c10::Half>(a, r, row); break;
        case at::kBFloat16: add_convert_row_stream<c10::BFloat16>(a, r, row); break;
        default: TORCH_CHECK(false, "mmkern norm: unexpected dtype ", a.x_dtype);
      }
      pre = row;
    } else {
      load_row(a.x + r * a.x_stride, a.x_dtype, row, N);
      apply_dropout(row, N, a.seed, r * N, a.dropout_p, a.dropout_scale);
      if (a.residual != nullptr) {
        load_row(a.residual + r * a.residual_stride, a.residual_dtype, tmp, N);
        at::vec::map2<float>([](Vec u, Vec v) { return u + v; }, row, row, tmp, N);
      }
      store_row(row, a.stream_dtype, a.pre + r * N * stream_elt, N);
      pre = row;
    }
    const auto [mean, rstd] = row_stats(pre, N, a.eps, a.is_rms_norm);
    if (!a.is_rms_norm) a.mean[r] = mean;
    a.rstd[r] = rstd;
    const int64_t sample = r / a.rows_per_sample;
    affine_out_row(a, r, pre, mean, rstd, a.scale ? a.scale + sample * N : nullptr,
                   a.shift ? a.shift + sample * N : nullptr);
  }
}

template <typename T>
const T* maybe_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

ForwardResult norm_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                               const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale,
                               double eps, double dropout_p, int64_t seed, bool residual_in_fp32, bool is_rms_norm) {
  const char* op = "mmkern_C::norm_forward";
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor for the CPU kernel; got ", x.device());
  const int64_t rows_per_sample = check_forward(op, x, residual, weight, bias, shift, scale, dropout_p,
                                                residual_in_fp32);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0; got ", eps);
  const int64_t rows = x.size(0), N = x.size(1);
  const auto stream = stream_dtype(x, residual, residual_in_fp32);
  auto out = empty_output({rows, N}, x.options());
  auto pre = empty_output({rows, N}, x.options().dtype(stream));
  auto mean = at::empty({is_rms_norm ? 0 : rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, pre, mean, rstd};
  ForwardArgs a{};
  a.x = static_cast<const char*>(x.data_ptr());
  a.x_stride = x.stride(0) * x.element_size();
  a.x_dtype = x.scalar_type();
  a.residual = residual ? static_cast<const char*>(residual->data_ptr()) : nullptr;
  a.residual_stride = residual ? residual->stride(0) * residual->element_size() : 0;
  a.residual_dtype = residual ? residual->scalar_type() : stream;
  a.stream_dtype = stream;
  a.weight = maybe_ptr<float>(weight);
  a.bias = maybe_ptr<float>(bias);
  a.shift = maybe_ptr<float>(shift);
  a.scale = maybe_ptr<float>(scale);
  a.out = static_cast<char*>(out.data_ptr());
  a.pre = static_cast<char*>(pre.data_ptr());
  a.mean = is_rms_norm ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.N = N;
  a.rows_per_sample = std::max<int64_t>(rows_per_sample, 1);
  a.eps = static_cast<float>(eps);
  a.dropout = dropout_p > 0;
  a.dropout_p = static_cast<float>(dropout_p);
  a.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  a.seed = static_cast<uint64_t>(seed);
  a.is_rms_norm = is_rms_norm;
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { forward_rows(a, begin, end); });
  return {out, pre, mean, rstd};
}

// ----------------------------------------------------------------------------- backward

struct BackwardArgs {
  const char* dout; const char* dpre; const char* pre;
  int64_t dout_stride, dpre_stride;                        // bytes
  at::ScalarType x_dtype, stream_dtype;
  const float* weight; const float* bias; const float* scale;
  char* dx; char* d_residual;
  float* dweight_part; float* dbias_part; float* dshift_part; float* dscale_part;   // (chunks, N) or null
  int64_t N, rows_per_sample, chunks_per_sample, rows_per_chunk;
  float eps, dropout_p, dropout_scale;
  uint64_t seed;
  bool dropout, is_rms_norm;
};

// One chunk: rows [first, end) of one sample.
void backward_chunk(const BackwardArgs& a, int64_t chunk, float* scratch) {
  const int64_t N = a.N;
  const int64_t sample = chunk / a.chunks_per_sample;
  const int64_t first = sample * a.rows_per_sample + (chunk % a.chunks_per_sample) * a.rows_per_chunk;
  const int64_t end = std::min(first + a.rows_per_chunk, (sample + 1) * a.rows_per_sample);
  float* xhat = scratch;            // the row's xhat
  float* dout = scratch + N;        // the row's dout
  float* g = scratch + 2 * N;       // dxhat, then dpre, then dx
  float* gain = scratch + 3 * N;    // weight * (1 + scale[sample])
  float* sum_dout_xhat = scratch + 4 * N;
  float* sum_dout = scratch + 5 * N;
  float* tmp = scratch + 6 * N;
  std::fill(gain, gain + N, 1.f);
  if (a.weight) std::copy(a.weight, a.weight + N, gain);
  const float* scale_row = a.scale ? a.scale + sample * N : nullptr;
  if (scale_row) at::vec::map2<float>([](Vec w, Vec s) { return w * (Vec(1.f) + s); }, gain, gain, scale_row, N);
  std::fill(sum_dout_xhat, sum_dout_xhat + N, 0.f);
  std::fill(sum_dout, sum_dout + N, 0.f);
  const int64_t x_elt = c10::elementSize(a.x_dtype), stream_elt = c10::elementSize(a.stream_dtype);
  const float inv_n = 1.f / static_cast<float>(N);
  const bool float_rows = a.x_dtype == at::kFloat && a.stream_dtype == at::kFloat;
  for (int64_t r = first; r < end; ++r) {
    // statistics recomputed from the stored (rounded) pre, as the reference does; float32 rows are read in place
    const float* pre = xhat;
    const float* d = dout;
    if (float_rows) {
      pre = reinterpret_cast<const float*>(a.pre) + r * N;
      d = reinterpret_cast<const float*>(a.dout + r * a.dout_stride);
    } else {
      load_row(a.pre + r * N * stream_elt, a.stream_dtype, xhat, N);
      load_row(a.dout + r * a.dout_stride, a.x_dtype, dout, N);
    }
    const auto [mean, rstd] = row_stats(pre, N, a.eps, a.is_rms_norm);
    // one pass: xhat, dxhat = dout * gain, the row sums of dxhat * xhat and dxhat, the column sums
    const Vec vmean(mean), vrstd(rstd);
    double dot_total = 0.0, sum_total = 0.0;
    constexpr int64_t kBlock = 1024;            // cascaded as in cascade_sum
    for (int64_t start = 0; start < N; start += kBlock) {
      const int64_t stop = std::min(N, start + kBlock);
      Vec dot(0.f), sum(0.f);
      int64_t j = start;
      for (; j + kW <= stop; j += kW) {
        const Vec xh = (Vec::loadu(pre + j) - vmean) * vrstd;
        const Vec dv = Vec::loadu(d + j);
        const Vec gx = dv * Vec::loadu(gain + j);
        xh.store(xhat + j);
        gx.store(g + j);
        dot = dot + gx * xh;
        sum = sum + gx;
        (Vec::loadu(sum_dout_xhat + j) + dv * xh).store(sum_dout_xhat + j);
        (Vec::loadu(sum_dout + j) + dv).store(sum_dout + j);
      }
      float block_dot = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, dot);
      float block_sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
      for (; j < stop; ++j) {
        const float xh = (pre[j] - mean) * rstd, dv = d[j], gx = dv * gain[j];
        xhat[j] = xh;
        g[j] = gx;
        block_dot += gx * xh;
        block_sum += gx;
        sum_dout_xhat[j] += dv * xh;
        sum_dout[j] += dv;
      }
      dot_total += block_dot;
      sum_total += block_sum;
    }
    const float projection = static_cast<float>(dot_total) * inv_n;
    const float mean_dxhat = a.is_rms_norm ? 0.f : static_cast<float>(sum_total) * inv_n;
    const Vec vproj(projection), vmdx(mean_dxhat);
    if (a.is_rms_norm && N == 1) {
      // One column: xhat^2 = pre^2 / (pre^2 + eps) = 1 - eps rstd^2, so dxhat - xhat * projection =
      // dxhat (1 - xhat^2) = dxhat eps rstd^2 exactly. The general form cancels there (1 - xhat^2 ~ eps / pre^2
      // turns half an ulp of rstd into many ulps of dx: 2.5x the eager error on ~1% of rows, found by the fuzz).
      g[0] = rstd * g[0] * (a.eps * rstd * rstd);
    } else {
      at::vec::map2<float>([&](Vec dxh, Vec xh) { return vrstd * (dxh - vmdx - xh * vproj); }, g, g, xhat, N);
    }
    if (a.dpre) {
      load_row(a.dpre + r * a.dpre_stride, a.stream_dtype, tmp, N);
      at::vec::map2<float>([](Vec u, Vec v) { return u + v; }, g, g, tmp, N);
    }
    if (a.d_residual) store_row(g, a.stream_dtype, a.d_residual + r * N * stream_elt, N);
    if (a.dropout) apply_dropout(g, N, a.seed, r * N, a.dropout_p, a.dropout_scale);
    store_row(g, a.x_dtype, a.dx + r * N * x_elt, N);
  }
  // The chunk's rows share one sample's scale, so two sums give all four reduced gradients:
  //   dweight = (1 + scale) * sum(dout * xhat)   dbias = (1 + scale) * sum(dout)
  //   dshift  = sum(dout)                        dscale = weight * sum(dout * xhat) + bias * sum(dout)
  const int64_t part = chunk * N;
  for (int64_t j = 0; j < N; ++j) {
    const float factor = scale_row ? 1.f + scale_row[j] : 1.f;
    if (a.dweight_part) a.dweight_part[part + j] = factor * sum_dout_xhat[j];
    if (a.dbias_part) a.dbias_part[part + j] = factor * sum_dout[j];
    if (a.dshift_part) a.dshift_part[part + j] = sum_dout[j];
    if (a.dscale_part) {
      float ds = sum_dout_xhat[j] * (a.weight ? a.weight[j] : 1.f);
      if (a.bias) ds += sum_dout[j] * a.bias[j];
      a.dscale_part[part + j] = ds;
    }
  }
}

BackwardResult norm_backward_cpu(const at::Tensor& dout, const c10::optional<at::Tensor>& dpre, const at::Tensor& pre,
                                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& scale, double eps, double dropout_p, int64_t seed,
                                 bool is_rms_norm, bool has_residual, bool has_shift, int64_t batch,
                                 at::ScalarType x_dtype) {
  const char* op = "mmkern_C::norm_backward";
  TORCH_CHECK_VALUE(pre.device().is_cpu(), op, ": pre must be a CPU tensor for the CPU kernel; got ", pre.device());
  const int64_t rows_per_sample = check_backward(op, dout, dpre, pre, weight, bias, scale, dropout_p, has_shift, batch,
                                                 x_dtype);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0; got ", eps);
  const int64_t rows = pre.size(0), N = pre.size(1);
  auto dx = empty_output({rows, N}, pre.options().dtype(x_dtype));
  auto d_residual = has_residual ? empty_output({rows, N}, pre.options()) : pre.new_empty({0});
  auto f32 = pre.options().dtype(at::kFloat);
  if (rows == 0) {
    auto zeros = [&](bool present, at::IntArrayRef shape) { return present ? at::zeros(shape, f32) : at::empty({0}, f32); };
    return {dx, d_residual, zeros(weight.has_value(), {N}), zeros(bias.has_value(), {N}),
            zeros(has_shift, {batch, N}), zeros(scale.has_value(), {batch, N})};
  }
  const int64_t chunks_ps = chunks_per_sample(rows_per_sample, batch, 64);
  const int64_t rows_per_chunk = (rows_per_sample + chunks_ps - 1) / chunks_ps;
  const int64_t chunks_ps_used = (rows_per_sample + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t chunks = batch * chunks_ps_used;
  auto partial = [&](bool present) { return present ? at::empty({chunks, N}, f32) : at::Tensor(); };
  at::Tensor dweight_part = partial(weight.has_value()), dbias_part = partial(bias.has_value()),
             dshift_part = partial(has_shift), dscale_part = partial(scale.has_value());
  BackwardArgs a{};
  a.dout = static_cast<const char*>(dout.data_ptr());
  a.dout_stride = dout.stride(0) * dout.element_size();
  a.dpre = dpre ? static_cast<const char*>(dpre->data_ptr()) : nullptr;
  a.dpre_stride = dpre ? dpre->stride(0) * dpre->element_size() : 0;
  a.pre = static_cast<const char*>(pre.data_ptr());
  a.x_dtype = x_dtype;
  a.stream_dtype = pre.scalar_type();
  a.weight = maybe_ptr<float>(weight);
  a.bias = maybe_ptr<float>(bias);
  a.scale = maybe_ptr<float>(scale);
  a.dx = static_cast<char*>(dx.data_ptr());
  a.d_residual = has_residual ? static_cast<char*>(d_residual.data_ptr()) : nullptr;
  auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  a.dweight_part = ptr(dweight_part);
  a.dbias_part = ptr(dbias_part);
  a.dshift_part = ptr(dshift_part);
  a.dscale_part = ptr(dscale_part);
  a.N = N;
  a.rows_per_sample = rows_per_sample;
  a.chunks_per_sample = chunks_ps_used;
  a.rows_per_chunk = rows_per_chunk;
  a.eps = static_cast<float>(eps);
  a.dropout = dropout_p > 0;
  a.dropout_p = static_cast<float>(dropout_p);
  a.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  a.seed = static_cast<uint64_t>(seed);
  a.is_rms_norm = is_rms_norm;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(7 * N);
    for (int64_t c = begin; c < end; ++c) backward_chunk(a, c, scratch.data());
  });
  return reduce_partials(dx, d_residual, dweight_part, dbias_part, dshift_part, dscale_part, batch, pre);
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& like, double dropout_p, int64_t seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "mmkern_C::dropout_keep_mask: dropout_p must be in [0, 1); "
                    "got ", dropout_p);
  auto mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const float p = static_cast<float>(dropout_p);
  at::parallel_for(0, mask.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) m[i] = dropout_keep(static_cast<uint64_t>(seed), static_cast<uint64_t>(i), p);
  });
  return mask;
}

}  // namespace
}  // namespace mmkern::norm

TORCH_LIBRARY_IMPL(mmkern_C, CPU, m) {
  m.impl("norm_forward", &mmkern::norm::norm_forward_cpu);
  m.impl("norm_backward", &mmkern::norm::norm_backward_cpu);
  m.impl("dropout_keep_mask", &mmkern::norm::dropout_keep_mask_cpu);
}
