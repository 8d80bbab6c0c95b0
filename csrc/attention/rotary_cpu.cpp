// C++ CPU kernel of mmkern::rotary_embedding (schema: register.cpp; semantics: mmkern/ops/rotary_problem.py).
//
// x: (B, L, H, D) or varlen (total, H, D) (+ cu_seqlens (B + 1,) int32), last dimension contiguous, other strides
// free; cos, sin: (seqlen_ro, rd / 2) contiguous, x's dtype or float32. out: a new contiguous tensor like x.
// Token t of sequence b sits at position p = offset_b + t, clamped into the table (the op layer checked CPU
// values already; the clamp keeps a bad value from reading outside the table all the same).
// Work split: at::parallel_for over the tokens (rows of x's first one or two dimensions); each token reads its
// table row once into fp32 (the sign of sin folded in), then for each head: the rotary part converted to fp32
// in an L1 row buffer (vector loads), the pairs rotated
//     NeoX (i, i + rd/2):       o_i = a_i c_i - a_{i+h} s_i,        o_{i+h} = a_i s_i + a_{i+h} c_i
//     interleaved (2i, 2i + 1): o_2i = a_2i c_i - a_2i+1 s_i,       o_2i+1 = a_2i s_i + a_2i+1 c_i
// and rounded once into out; features rd.. copied as they are. Traffic: x read once, out written once.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/cpu_output.h"
#include "common/cpu_vec_io.h"

namespace mmkern_rotary {
namespace {

using mmkern::cpu_vec::load_row;
using mmkern::cpu_vec::store_row;
constexpr int64_t kGrainElements = 32768;     // elements per parallel task

// (sequence, first row) of every sequence, and where each token's position comes from
struct Sequences {
  const int32_t* cu = nullptr;      // varlen: (B + 1,) row offsets; null: dense, sequence b = rows b*L .. b*L+L-1
  int64_t batch = 0, seqlen = 0;    // dense: B, L
  const int32_t* offsets32 = nullptr;
  const int64_t* offsets64 = nullptr;
  int64_t offset = 0;               // without per-sequence offsets

  int64_t offset_of(int64_t b) const {
    return offsets32 ? offsets32[b] : offsets64 ? offsets64[b] : offset;
  }
  // the sequence holding row r (varlen: the last b with cu[b] <= r, skipping empty sequences)
  int64_t sequence_of(int64_t r) const {
    if (!cu) return r / seqlen;
    return static_cast<int64_t>(std::upper_bound(cu + 1, cu + batch + 1, static_cast<int32_t>(r)) - (cu + 1));
  }
  int64_t start_of(int64_t b) const { return cu ? cu[b] : b * seqlen; }
};

template <typename T, typename TableT>
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out, const Sequences& seq,
            bool interleaved, bool conjugate) {
  const bool varlen = seq.cu != nullptr;
  const int64_t rows = varlen ? x.size(0) : x.size(0) * x.size(1);
  const int64_t H = x.size(-2), D = x.size(-1), half = cos.size(1), rd = 2 * half, seqlen_ro = cos.size(0);
  // row r of x: dense (b, t) = (r / L, r % L) through x's own strides; varlen row r of dim 0
  const int64_t stride_b = varlen ? 0 : x.stride(0), stride_t = varlen ? x.stride(0) : x.stride(1);
  const int64_t stride_h = x.stride(-2);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const TableT* cp = cos.const_data_ptr<TableT>();
  const TableT* sp = sin.const_data_ptr<TableT>();
  const float sign = conjugate ? -1.0f : 1.0f;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, H * D));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> c(half), s(half), a(rd), o(rd);
    int64_t b = seq.sequence_of(lo);
    for (int64_t r = lo; r < hi; ++r) {
      while (varlen && r >= seq.cu[b + 1]) ++b;     // rows are in order: the next non-empty sequence
      if (!varlen) b = r / seq.seqlen;
      const int64_t t = r - seq.start_of(b);
      const int64_t p = std::clamp<int64_t>(seq.offset_of(b) + t, 0, seqlen_ro - 1);
      for (int64_t i = 0; i < half; ++i) {
        c[i] = static_cast<float>(cp[p * half + i]);
        s[i] = sign * static_cast<float>(sp[p * half + i]);
      }
      const T* x_row = varlen ? xp + r * stride_t : xp + b * stride_b + t * stride_t;
      T* o_row = op + r * H * D;
      for (int64_t h = 0; h < H; ++h) {
        const T* xh = x_row + h * stride_h;
        T* oh = o_row + h * D;
        load_row(xh, a.data(), rd);
        if (interleaved) {
          for (int64_t i = 0; i < half; ++i) {
            const float x0 = a[2 * i], x1 = a[2 * i + 1];
            o[2 * i] = x0 * c[i] - x1 * s[i];
            o[2 * i + 1] = x0 * s[i] + x1 * c[i];
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {
            const float x0 = a[i], x1 = a[i + half];
            o[i] = x0 * c[i] - x1 * s[i];
            o[i + half] = x0 * s[i] + x1 * c[i];
          }
        }
        store_row(o.data(), oh, rd);
        if (rd < D) std::memcpy(oh + rd, xh + rd, (D - rd) * sizeof(T));
      }
    }
  });
}

at::Tensor rotary_embedding_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                const std::optional<at::Tensor>& seqlen_offsets,
                                const std::optional<at::Tensor>& cu_seqlens, int64_t seqlen_offset, bool interleaved,
                                bool conjugate) {
  const char* op = "mmkern_C::cpu_rotary_embedding";
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == (varlen ? 3 : 4) && x.stride(-1) == 1, op, ": x must be ", varlen ? 3 : 4,
              "-D with a contiguous last dimension, got ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes() && sin.is_contiguous() &&
                  sin.scalar_type() == cos.scalar_type(), op, ": cos and sin must be contiguous (seqlen_ro, rd / 2) "
              "tensors of one dtype, got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(2 * cos.size(1) <= x.size(-1) && cos.size(1) > 0, op, ": rotary_dim 2 * ", cos.size(1),
              " must be in 2..head_dim ", x.size(-1));
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() || cos.scalar_type() == at::kFloat, op,
              ": cos/sin must have x's dtype or float32");
  auto out = mmkern::empty_output(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  TORCH_CHECK(cos.size(0) > 0, op, ": the tables hold no positions");
  Sequences seq;
  seq.offset = seqlen_offset;
  if (varlen) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 && cu_seqlens->is_contiguous() &&
                    cu_seqlens->size(0) >= 1, op, ": cu_seqlens must be a contiguous (B + 1,) int32 tensor");
    seq.cu = cu_seqlens->const_data_ptr<int32_t>();
    seq.batch = cu_seqlens->size(0) - 1;
    TORCH_CHECK(seq.cu[0] == 0 && seq.cu[seq.batch] == x.size(0), op, ": cu_seqlens must run from 0 to ", x.size(0));
  } else {
    seq.batch = x.size(0);
    seq.seqlen = x.size(1);
  }
  if (seqlen_offsets.has_value()) {
    const at::Tensor& o = *seqlen_offsets;
    TORCH_CHECK(o.dim() == 1 && o.size(0) == seq.batch && o.is_contiguous() &&
                    (o.scalar_type() == at::kInt || o.scalar_type() == at::kLong), op,
                ": seqlen_offsets must be a contiguous (B,) int32/int64 tensor");
    if (o.scalar_type() == at::kInt) seq.offsets32 = o.const_data_ptr<int32_t>();
    else seq.offsets64 = o.const_data_ptr<int64_t>();
  }
  const bool float_tables = cos.scalar_type() == at::kFloat;
  switch (x.scalar_type()) {
    case at::kFloat:
      rotate<float, float>(x, cos, sin, out, seq, interleaved, conjugate);
      break;
    case at::kHalf:
      if (float_tables) rotate<at::Half, float>(x, cos, sin, out, seq, interleaved, conjugate);
      else rotate<at::Half, at::Half>(x, cos, sin, out, seq, interleaved, conjugate);
      break;
    case at::kBFloat16:
      if (float_tables) rotate<at::BFloat16, float>(x, cos, sin, out, seq, interleaved, conjugate);
      else rotate<at::BFloat16, at::BFloat16>(x, cos, sin, out, seq, interleaved, conjugate);
      break;
    default:
      TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16 (float64 is the reference backend's), got ",
                  x.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace mmkern_rotary

TORCH_LIBRARY_IMPL(mmkern_C, CPU, m) {
  m.impl("cpu_rotary_embedding", &mmkern_rotary::rotary_embedding_cpu);
}
