// C++ CPU flash attention, backward (torch.ops.mmkern_C.cpu_attention_backward, CPU key). See attention_cpu.h for
// the work decomposition and what a score is.
//
// One work item per (b, kvh): the group's query rows and every key of the sequence. For each key block j
// (kBlockN keys), over the row blocks i that can see it (kBackwardBlockM packed rows), recomputing P from the saved lse:
//     S   = finish_scores(scale * Q_i K_j^T)          P = e^(S - lse)          (0 in rows that saw nothing)
//     dV_j += dropout(P)^T dO_i                        dP = dropout(dO_i V_j^T)
//     dS  = P * (dP - delta)                           delta = rowsum(dO * O) - dlse
//     (d_mask = dS for a float mask; dS *= 1 - tanh^2 with softcap)
//     dK_j += dS^T Q_i                                 dQ_i += dS K_j
// dq = scale dQ, dk = scale dK. dK_j, dV_j (float32, kBlockN x D) are written once their key block is done;
// dQ accumulates in a float32 (rows x D) buffer of the item, written at its end. An item owns its dk/dv rows
// and its dq rows outright, and sums in a fixed order: bitwise the same results run to run and for any thread
// count, without atomics. Memory: linear in the sequence length (the item's packed Q, dO, dQ rows).
// Parallelism is B * H_kv items (dynamically scheduled, heaviest first).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "attention/attention_cpu.h"
#include "common/cpu_gemm.h"
#include "common/cpu_output.h"
#include "common/philox_cpu.h"

namespace mmkern::attention_cpu {
namespace {

using cpu_gemm::Trans;

template <typename T>
struct Scratch {
  std::vector<T> q, dout;             // the item's packed rows (rows x D)
  std::vector<float> dq, lse, delta;  // (rows x D), (rows,), (rows,)
  std::vector<float> p, dp, cap;      // tile_rows x tile_keys tiles (P, dS stay float32 into the GEMMs)
  std::vector<float> dk, dv, row;     // tile_keys x D, and one row of D
  // tiles sized for the call (<= kBackwardBlockM x kBlockN): a short call does not zero 3 x 128 KiB
  Scratch(int64_t D, bool softcap, int64_t tile_rows, int64_t tile_keys)
      : p(tile_rows * tile_keys), dp(tile_rows * tile_keys), cap(softcap ? tile_rows * tile_keys : 0),
        dk(tile_keys * D), dv(tile_keys * D), row(D) {}
};

struct Tensors {
  const void *q, *k, *v, *dout, *out;
  const float *lse, *dlse;
  void *dq, *dk, *dv, *d_mask;
  int64_t o_sb, o_sr, o_sh;        // (batch, row, head) strides of out, dout and the gradients
  int64_t do_sb, do_sr, do_sh;
  int64_t dq_sb, dq_sr, dq_sh, dk_sb, dk_sr, dk_sh, dv_sb, dv_sr, dv_sh;
  int64_t dlse_sb, dlse_sh, dlse_sr;
  at::ScalarType d_mask_dtype;
};

template <typename T>
void store_mask_grad(const Call& c, const Tensors& t, int64_t b, int64_t h, int64_t i, int64_t j0, const float* ds,
                     int64_t n, int64_t Lq, int64_t Lk) {
  const int64_t base = ((b * c.heads + h) * Lq + i) * Lk + j0;
  switch (t.d_mask_dtype) {
    case at::kFloat: std::copy(ds, ds + n, static_cast<float*>(t.d_mask) + base); break;
    case at::kHalf: at::vec::convert(ds, static_cast<c10::Half*>(t.d_mask) + base, n); break;
    case at::kBFloat16: at::vec::convert(ds, static_cast<c10::BFloat16*>(t.d_mask) + base, n); break;
    case at::kDouble: for (int64_t j = 0; j < n; ++j) static_cast<double*>(t.d_mask)[base + j] = ds[j]; break;
    default: break;
  }
}

template <typename T>
void backward_item(const Call& c, const Tensors& t, int64_t b, int64_t kvh, Scratch<T>& w, int64_t Lq, int64_t Lk) {
  const Sequence& seq = c.seqs[b];
  const int64_t D = c.head_dim, R = c.rows(seq);
  const T* k_base = static_cast<const T*>(t.k) + b * c.k_sb + seq.k_start * c.k_sr + kvh * c.k_sh;
  const T* v_base = static_cast<const T*>(t.v) + b * c.v_sb + seq.k_start * c.v_sr + kvh * c.v_sh;
  T* dk_base = static_cast<T*>(t.dk) + b * t.dk_sb + seq.k_start * t.dk_sr + kvh * t.dk_sh;
  T* dv_base = static_cast<T*>(t.dv) + b * t.dv_sb + seq.k_start * t.dv_sr + kvh * t.dv_sh;
  const RowBlock all{b, kvh, 0, R};
  w.q.resize(R * D), w.dout.resize(R * D), w.dq.assign(R * D, 0.f), w.lse.resize(R), w.delta.resize(R);
  pack_rows(c, seq, all, static_cast<const T*>(t.q), c.q_sb, c.q_sr, c.q_sh, w.q.data());
  pack_rows(c, seq, all, static_cast<const T*>(t.dout), t.do_sb, t.do_sr, t.do_sh, w.dout.data());
  std::vector<float> o_row(D);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / c.group, h = kvh * c.group + r % c.group;
    w.lse[r] = t.lse[c.lse_index(b, h, seq, i)];
    load_converted(static_cast<const T*>(t.out) + b * t.o_sb + (seq.q_start + i) * t.o_sr + h * t.o_sh, o_row.data(), D);
    load_converted(w.dout.data() + r * D, w.row.data(), D);
    double dot = 0;   // one row of D products: float32 terms, summed in double (no cancellation drift at D = 256)
    for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(w.row[d] * o_row[d]);
    float delta = static_cast<float>(dot);
    if (t.dlse != nullptr) delta -= t.dlse[b * t.dlse_sb + h * t.dlse_sh + (seq.q_start + i) * t.dlse_sr];
    w.delta[r] = delta;
  }
  const float keep_scale = c.dropout_p > 0 ? 1.f / (1.f - c.dropout_p) : 1.f;
  for (int64_t j0 = 0; j0 < seq.k_len; j0 += kBlockN) {
    const int64_t n = std::min(kBlockN, seq.k_len - j0);
    // query positions that may see a key of [j0, j0 + n): key_lo(i) <= j0 + n - 1 and key_hi(i) > j0
    const int64_t i_lo = std::clamp<int64_t>(j0 - seq.align - c.right, 0, seq.q_len);
    const int64_t i_hi = std::clamp<int64_t>(j0 + n - 1 - seq.align + c.left + 1, i_lo, seq.q_len);
    std::fill(w.dk.begin(), w.dk.begin() + n * D, 0.f);
    std::fill(w.dv.begin(), w.dv.begin() + n * D, 0.f);
    for (int64_t r0 = i_lo * c.group; r0 < i_hi * c.group; r0 += kBackwardBlockM) {
      const RowBlock rb{b, kvh, r0, std::min(r0 + kBackwardBlockM, i_hi * c.group)};
      const int64_t rows = rb.r1 - rb.r0;
      const T* q_blk = w.q.data() + r0 * D;
      const T* do_blk = w.dout.data() + r0 * D;
      float* p = w.p.data();
      cpu_gemm::gemm(Trans::N, Trans::T, rows, n, D, c.scale, q_blk, D, k_base + j0 * c.k_sr, c.k_sr, 0.f, p, n);
      finish_scores(c, seq, rb, j0, n, p, n, c.softcap > 0 ? w.cap.data() : nullptr);
      for (int64_t r = 0; r < rows; ++r) {
        const float lse = w.lse[r0 + r];
        float* row = p + r * n;
        if (lse == kNegInf) std::fill(row, row + n, 0.f);
        else exp_and_sum(row, n, lse);
      }
      // dV += dropout(P)^T dO
      for (int64_t r = 0; r < rows; ++r) {
        float* row = w.dp.data() + r * n;       // dp as scratch for dropout(P) in float32
        std::copy(p + r * n, p + (r + 1) * n, row);
        if (c.dropout_p > 0) {
          const int64_t g = r0 + r;
          dropout_scale(row, n, c.seed, dropout_offset(c, b, kvh * c.group + g % c.group, g / c.group) + j0,
                        c.dropout_p, keep_scale);
        }
      }
      cpu_gemm::gemm(Trans::T, Trans::N, n, D, rows, 1.f, w.dp.data(), n, do_blk, D, 1.f, w.dv.data(), D);
      // dP = dropout(dO V^T);  dS = P (dP - delta)
      float* dp = w.dp.data();
      cpu_gemm::gemm(Trans::N, Trans::T, rows, n, D, 1.f, do_blk, D, v_base + j0 * c.v_sr, c.v_sr, 0.f, dp, n);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r0 + r, i = g / c.group, h = kvh * c.group + g % c.group;
        float* dp_row = dp + r * n;
        if (c.dropout_p > 0)
          dropout_scale(dp_row, n, c.seed, dropout_offset(c, b, h, i) + j0, c.dropout_p, keep_scale);
        const float* p_row = p + r * n;
        const Vec vdelta(w.delta[g]);
        int64_t j = 0;
        for (; j + kW <= n; j += kW) (Vec::loadu(p_row + j) * (Vec::loadu(dp_row + j) - vdelta)).store(dp_row + j);
        for (; j < n; ++j) dp_row[j] = p_row[j] * (dp_row[j] - w.delta[g]);
        if (t.d_mask != nullptr) store_mask_grad<T>(c, t, b, h, i, j0, dp_row, n, Lq, Lk);
        if (c.softcap > 0) {
          const float* cap = w.cap.data() + r * n;
          for (j = 0; j + kW <= n; j += kW) (Vec::loadu(dp_row + j) * Vec::loadu(cap + j)).store(dp_row + j);
          for (; j < n; ++j) dp_row[j] *= cap[j];
        }
      }
      // dK += dS^T Q;  dQ += dS K
      cpu_gemm::gemm(Trans::T, Trans::N, n, D, rows, 1.f, dp, n, q_blk, D, 1.f, w.dk.data(), D);
      cpu_gemm::gemm(Trans::N, Trans::N, rows, D, n, 1.f, dp, n, k_base + j0 * c.k_sr, c.k_sr, 1.f,
                     w.dq.data() + r0 * D, D);
    }
    for (int64_t j = 0; j < n; ++j) {
      scale_row(w.dk.data() + j * D, D, c.scale);
      store_converted(w.dk.data() + j * D, dk_base + (j0 + j) * t.dk_sr, D);
      store_converted(w.dv.data() + j * D, dv_base + (j0 + j) * t.dv_sr, D);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / c.group, h = kvh * c.group + r % c.group;
    scale_row(w.dq.data() + r * D, D, c.scale);
    store_converted(w.dq.data() + r * D, static_cast<T*>(t.dq) + b * t.dq_sb + (seq.q_start + i) * t.dq_sr + h * t.dq_sh, D);
  }
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.sizes() == like.sizes(), op, ": ", name, " must be a CPU tensor of shape ",
                    like.sizes(), "; got ", t.sizes(), " on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
                   "; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name, " must have a contiguous head dim");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& dlse, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale, bool causal, bool bottom_right, int64_t window_left,
    int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi_slopes,
    const c10::optional<at::Tensor>& attn_mask, bool mask_grad, double dropout_p, int64_t seed) {
  constexpr const char* op = "mmkern_C::cpu_attention_backward";
  Call c = make_call(op, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
                     seed);
  check_like(op, "dout", dout, q);
  check_like(op, "out", out, q);
  const bool varlen = q.dim() == 3;
  const std::vector<int64_t> lse_shape = varlen ? std::vector<int64_t>{c.heads, q.size(0)}
                                                : std::vector<int64_t>{c.batch, c.heads, q.size(1)};
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse}, {"dlse", dlse ? &*dlse : nullptr}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->sizes() == at::IntArrayRef(lse_shape),
                      op, ": ", name, " must be a float32 CPU tensor of shape ", at::IntArrayRef(lse_shape), "; got ",
                      t->scalar_type(), " ", t->sizes());
  }
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse ? dlse->contiguous() : at::Tensor();
  if (varlen) c.lse_sb = 0, c.lse_sh = lse_c.stride(0), c.lse_sr = lse_c.stride(1);
  else c.lse_sb = lse_c.stride(0), c.lse_sh = lse_c.stride(1), c.lse_sr = lse_c.stride(2);
  // gradients laid out like their inputs' shapes, contiguous; rows no item writes (keys past seqused_k or
  // outside every varlen sequence) are zero
  at::Tensor dq = empty_output(q.sizes(), q.options()), dk = empty_output(k.sizes(), k.options()),
             dv = empty_output(v.sizes(), v.options());
  if (varlen) dq.zero_();
  if (varlen || seqused_k.has_value()) dk.zero_(), dv.zero_();
  const bool want_mask_grad = mask_grad && attn_mask.has_value() && attn_mask->scalar_type() != at::kBool;
  at::Tensor d_mask = want_mask_grad ? at::zeros(attn_mask->sizes(), attn_mask->options()) : q.new_empty({0});
  Tensors t{q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), out.data_ptr(), lse_c.data_ptr<float>(),
            dlse ? dlse_c.data_ptr<float>() : nullptr, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            want_mask_grad ? d_mask.data_ptr() : nullptr,
            varlen ? 0 : out.stride(0), out.stride(varlen ? 0 : 1), out.stride(varlen ? 1 : 2),
            varlen ? 0 : dout.stride(0), dout.stride(varlen ? 0 : 1), dout.stride(varlen ? 1 : 2),
            varlen ? 0 : dq.stride(0), dq.stride(varlen ? 0 : 1), dq.stride(varlen ? 1 : 2),
            varlen ? 0 : dk.stride(0), dk.stride(varlen ? 0 : 1), dk.stride(varlen ? 1 : 2),
            varlen ? 0 : dv.stride(0), dv.stride(varlen ? 0 : 1), dv.stride(varlen ? 1 : 2),
            0, 0, 0, want_mask_grad ? d_mask.scalar_type() : at::kFloat};
  if (dlse) {
    if (varlen) t.dlse_sh = dlse_c.stride(0), t.dlse_sr = dlse_c.stride(1);
    else t.dlse_sb = dlse_c.stride(0), t.dlse_sh = dlse_c.stride(1), t.dlse_sr = dlse_c.stride(2);
  }
  const int64_t Lq = varlen ? 0 : q.size(1), Lk = varlen ? 0 : k.size(1);
  std::vector<std::pair<int64_t, int64_t>> items;   // (cost, b * H_kv + kvh), heaviest first
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t kvh = 0; kvh < c.kv_heads; ++kvh) items.push_back({c.seqs[b].q_len * c.seqs[b].k_len, b * c.kv_heads + kvh});
  std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  const int64_t n_items = static_cast<int64_t>(items.size());
  if (n_items == 0) return {dq, dk, dv, d_mask};
  dispatch_dtype(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    int64_t tile_rows = 1, tile_keys = 1;
    for (const Sequence& s : c.seqs) {
      tile_rows = std::max(tile_rows, std::min(kBackwardBlockM, c.rows(s)));
      tile_keys = std::max(tile_keys, std::min(kBlockN, s.k_len));
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      Scratch<T> w(c.head_dim, c.softcap > 0, tile_rows, tile_keys);
      for (int64_t it; (it = next.fetch_add(1)) < n_items;) {
        const int64_t id = items[it].second;
        backward_item<T>(c, t, id / c.kv_heads, id % c.kv_heads, w, Lq, Lk);
      }
    });
  });
  return {dq, dk, dv, d_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern_C, CPU, m) { m.impl("cpu_attention_backward", &cpu_attention_backward); }

}  // namespace mmkern::attention_cpu
