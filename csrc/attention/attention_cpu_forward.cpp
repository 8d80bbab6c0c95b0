// C++ CPU flash attention, forward (torch.ops.mmkern_C.cpu_attention_forward, CPU key). See attention_cpu.h for
// the work decomposition and what a score is.
//
// Per work item, a block of <= kBlockM packed rows of one (b, kvh), over a range of keys, one tile at a time:
//     S  = scale * Q K^T                      (rows x n) float32, one GEMM (cpu_gemm.h: MKL or portable)
// (P stays float32 into the P V GEMM: no rounding of P to a half dtype, as the GPU kernels must.)
//     S  = finish_scores(S)                   softcap, ALiBi, mask, visibility
//     m' = max(m, rowmax S);  P = e^(S - m');  l = l e^(m - m') + rowsum P;  O = O e^(m - m') + dropout(P) V
// then out = O / l and lse = m + ln l. Memory per thread: Q block, one score tile (and its copy in the input
// the O accumulator: about 200 KiB at D = 128, whatever the sequence length.
// Traffic: Q and out once; K and V once per row block (kBlockM rows of the group share them).
//
// Decode (few rows, long keys): when there are fewer than kTargetItems row blocks, each block's keys are split
// into ranges (at least kMinSplitKeys each) that run as separate items into float32 partials (O, m, l), merged
// per row in split order. The split count depends only on the shapes (or num_splits), never on the thread
// count, so results are bitwise the same with 1 or 2 threads.
//
// KV caches: seqused_k ends each sequence's keys, leftpad_k starts them (Sequence::k_start); paged k/v (block_table)
// are read a tile at a time from their pages (gather_tile).
//
// Numerics contract (mmkern/ops/attention_problem.py): l = 0 (no visible key) gives out 0, lse -inf; a NaN score
// makes m and l NaN (out, lse NaN); a +inf score (no NaN) gives l NaN, out NaN, lse +inf.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <memory>

#include "attention/attention_cpu.h"
#include "common/cpu_gemm.h"
#include "common/cpu_output.h"
#include "common/philox_cpu.h"

namespace mmkern::attention_cpu {
namespace {

using cpu_gemm::Trans;

constexpr int64_t kTargetItems = 16;     // below this many row blocks, split the keys (decode)
constexpr int64_t kMinSplitKeys = 256;

struct Item {
  RowBlock rows;
  int64_t key_lo, key_hi;   // this item's keys
  int64_t block;            // index of its row block (its splits are consecutive items)
};

// Running softmax state of one row block.
struct State {
  // (rows,), (rows,), (rows x D). l in double: lse = m + ln l is the backward's P = e^(s - lse) for every key of
  // the row, so its rounding error is a relative error of the whole row's P (and of dV): rounded once, at the end
  std::vector<float> m, o;
  std::vector<double> l;
  void reset(int64_t rows, int64_t D) {
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    o.assign(rows * D, 0.f);
  }
};

// Per thread, sized for the call's largest item (rows <= kBlockM, keys per tile <= kBlockN) and left
// uninitialised: a decode step (a few rows, a short cache) would otherwise zero 256 KiB, freshly mmap'ed by malloc
// on every call, for a tile of a few hundred floats (measured: that cost a GPT-2 decode call 40 us).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> q;          // rows x D packed rows
  std::unique_ptr<float[]> s;      // rows x keys scores, then probabilities (float32 into the P V GEMM too)
  std::unique_ptr<T[]> k, v;       // paged caches only: one tile's keys x D rows, read from their pages
  Scratch(int64_t D, int64_t rows, int64_t keys, bool paged)
      : q(new T[rows * D]), s(new float[rows * keys]), k(paged ? new T[keys * D] : nullptr),
        v(paged ? new T[keys * D] : nullptr) {}
};

// Paged caches: the tile's n cache rows [j0, j0 + n) of sequence b, head kvh, copied from their pages into
// w.k / w.v (n x D, contiguous), so the GEMMs see one matrix whatever the page size (a 16-row page would
// otherwise cut a tile into 16 GEMMs of 16 keys). The copy is of one tile (L2-resident), never of the cache:
// each key row is read from memory once, as in the dense path. Each row is one run of D elements (the rows of a
// page are H_kv * D apart) and the pages lie anywhere, so the hardware prefetcher, which follows a dense cache's
// rows from one 4 KiB page to the next, cannot guess where the next page starts: the copy prefetches the rows
// kPrefetchRows ahead itself. Measured (2026-12-04, 1 thread, fp32 decode, GQA 32/8, D128, page 16, paged / dense):
// no prefetch 1.23-1.32x at B1 4k, B1 16k and B8 4k keys; 4 rows ahead 1.00-1.21x; 8 rows 1.01-1.16x; 16 no better.
constexpr int64_t kPrefetchRows = 8;

template <typename T>
void prefetch_row(const T* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(bytes + off);
}

template <typename T>
void gather_tile(const Call& c, const RowBlock& rb, int64_t j0, int64_t n, const T* k, const T* v, Scratch<T>& w) {
  const int64_t D = c.head_dim;
  auto k_row = [&](int64_t t) { return k + c.paged_row(rb.b, j0 + t, rb.kvh, c.k_sb, c.k_sr, c.k_sh); };
  auto v_row = [&](int64_t t) { return v + c.paged_row(rb.b, j0 + t, rb.kvh, c.v_sb, c.v_sr, c.v_sh); };
  for (int64_t t = 0; t < std::min(kPrefetchRows, n); ++t) prefetch_row(k_row(t), D), prefetch_row(v_row(t), D);
  for (int64_t t = 0; t < n; ++t) {
    if (t + kPrefetchRows < n) prefetch_row(k_row(t + kPrefetchRows), D), prefetch_row(v_row(t + kPrefetchRows), D);
    std::memcpy(w.k.get() + t * D, k_row(t), D * sizeof(T));
    std::memcpy(w.v.get() + t * D, v_row(t), D * sizeof(T));
  }
}

// Runs the rows of `rb` over keys [lo, hi), updating `st` (already reset).
template <typename T>
void attend(const Call& c, const Sequence& seq, const RowBlock& rb, int64_t lo, int64_t hi, const T* q, const T* k,
            const T* v, Scratch<T>& w, State& st) {
  const int64_t D = c.head_dim, rows = rb.r1 - rb.r0;
  pack_rows(c, seq, rb, q, c.q_sb, c.q_sr, c.q_sh, w.q.get());
  // (paged: no base, the rows are found per tile)
  const T* k_base = c.paged() ? k : k + rb.b * c.k_sb + seq.k_start * c.k_sr + rb.kvh * c.k_sh;
  const T* v_base = c.paged() ? v : v + rb.b * c.v_sb + seq.k_start * c.v_sr + rb.kvh * c.v_sh;
  const float keep_scale = c.dropout_p > 0 ? 1.f / (1.f - c.dropout_p) : 1.f;
  for (int64_t j0 = lo; j0 < hi; j0 += kBlockN) {
    const int64_t n = std::min(kBlockN, hi - j0);
    // the tile's keys and values: rows of the dense cache in place, or the paged rows gathered (cache row
    // seq.k_start + j: a left pad shifts the rows, not the positions)
    const T* k_tile = k_base + j0 * c.k_sr;
    const T* v_tile = v_base + j0 * c.v_sr;
    int64_t k_ld = c.k_sr, v_ld = c.v_sr;
    if (c.paged()) {
      const int64_t row0 = seq.k_start + j0;
      if (row0 / c.page == (row0 + n - 1) / c.page) {   // the tile lies in one page: read it there, strided
        k_tile = k + c.paged_row(rb.b, row0, rb.kvh, c.k_sb, c.k_sr, c.k_sh);
        v_tile = v + c.paged_row(rb.b, row0, rb.kvh, c.v_sb, c.v_sr, c.v_sh);
      } else {
        gather_tile(c, rb, seq.k_start + j0, n, k, v, w);
        k_tile = w.k.get(), v_tile = w.v.get(), k_ld = v_ld = D;
      }
    }
    cpu_gemm::gemm(Trans::N, Trans::T, rows, n, D, c.scale, w.q.get(), D, k_tile, k_ld, 0.f, w.s.get(), n);
    finish_scores(c, seq, rb, j0, n, w.s.get(), n, nullptr);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = w.s.get() + r * n;
      const float m_old = st.m[r], mx = row_max_nan(row, n);
      const float m_new = (std::isnan(m_old) || std::isnan(mx)) ? std::numeric_limits<float>::quiet_NaN()
                                                                 : std::max(m_old, mx);
      const float m_safe = m_new == kNegInf ? 0.f : m_new;     // rows that have seen nothing yet
      const float sum = exp_and_sum(row, n, m_safe);
      const float rescale = std::exp(m_old - m_safe);
      st.l[r] = st.l[r] * rescale + static_cast<double>(sum);
      if (rescale != 1.f) scale_row(st.o.data() + r * D, D, rescale);
      st.m[r] = m_new;
      if (c.dropout_p > 0) {
        const int64_t g = rb.r0 + r;
        const uint64_t offset = dropout_offset(c, rb.b, rb.kvh * c.group + g % c.group, g / c.group) + j0;
        dropout_scale(row, n, c.seed, offset, c.dropout_p, keep_scale);
      }
    }
    cpu_gemm::gemm(Trans::N, Trans::N, rows, D, n, 1.f, w.s.get(), n, v_tile, v_ld, 1.f, st.o.data(), D);
  }
}

// out rows and lse of a finished block (the contract's special rows: see the header).
template <typename T>
void write_block(const Call& c, const Sequence& seq, const RowBlock& rb, const State& st, T* out, int64_t o_sb,
                 int64_t o_sr, int64_t o_sh, float* lse, std::vector<float>& row_buf) {
  const int64_t D = c.head_dim;
  row_buf.resize(D);
  for (int64_t r = 0; r < rb.r1 - rb.r0; ++r) {
    const int64_t g = rb.r0 + r, i = g / c.group, h = rb.kvh * c.group + g % c.group;
    const double l = st.l[r];
    const float m = st.m[r];
    const bool empty = l == 0.0;
    const float inv = empty ? 0.f : static_cast<float>(1.0 / l);
    for (int64_t d = 0; d < D; ++d) row_buf[d] = empty ? 0.f : st.o[r * D + d] * inv;
    store_converted(row_buf.data(), out + rb.b * o_sb + (seq.q_start + i) * o_sr + h * o_sh, D);
    lse[c.lse_index(rb.b, h, seq, i)] = empty ? kNegInf : (m == kInf ? kInf : static_cast<float>(m + std::log(l)));
  }
}

// Merges the splits of one block: M = max m_s, L = sum l_s e^(m_s - M), O = sum O_s e^(m_s - M), in split order.
void merge_splits(const std::vector<State>& parts, int64_t first, int64_t count, int64_t rows, int64_t D,
                  State& st) {
  st.reset(rows, D);
  for (int64_t r = 0; r < rows; ++r) {
    float m = kNegInf;
    for (int64_t s = 0; s < count; ++s) {
      const float ms = parts[first + s].m[r];
      m = (std::isnan(m) || std::isnan(ms)) ? std::numeric_limits<float>::quiet_NaN() : std::max(m, ms);
    }
    const float m_safe = m == kNegInf ? 0.f : m;
    double l = 0.0;
    float* o = st.o.data() + r * D;
    for (int64_t s = 0; s < count; ++s) {
      const State& p = parts[first + s];
      const float w = std::exp(p.m[r] - m_safe);
      l += p.l[r] * w;
      for (int64_t d = 0; d < D; ++d) o[d] += p.o[r * D + d] * w;
    }
    st.m[r] = m;
    st.l[r] = l;
  }
}

// Items: row blocks (heaviest first, for the dynamic schedule), each split into key ranges when there are few.
std::vector<Item> make_items(const Call& c, int64_t num_splits, std::vector<int64_t>& splits_of_block) {
  std::vector<std::pair<int64_t, RowBlock>> blocks;   // (visible keys, block)
  for (int64_t b = 0; b < c.batch; ++b) {
    const Sequence& s = c.seqs[b];
    for (int64_t kvh = 0; kvh < c.kv_heads; ++kvh)
      for (int64_t r0 = 0; r0 < c.rows(s); r0 += kBlockM) {
        const RowBlock rb{b, kvh, r0, std::min(r0 + kBlockM, c.rows(s))};
        const auto [lo, hi] = block_keys(c, s, rb);
        blocks.push_back({std::max<int64_t>(hi - lo, 0), rb});
      }
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  std::vector<Item> items;
  splits_of_block.assign(nblocks, 1);
  for (int64_t bi = 0; bi < nblocks; ++bi) {
    const RowBlock& rb = blocks[bi].second;
    const auto [lo, hi] = block_keys(c, c.seqs[rb.b], rb);
    const int64_t keys = std::max<int64_t>(hi - lo, 0);
    // num_splits when given (at most one per key); else, when the blocks are few, enough splits for kTargetItems
    // items, each of at least kMinSplitKeys keys
    int64_t splits = 1;
    if (num_splits > 0) {
      splits = std::min(num_splits, std::max<int64_t>(keys, 1));
    } else if (nblocks < kTargetItems) {
      splits = std::min((kTargetItems + nblocks - 1) / nblocks, std::max<int64_t>(keys / kMinSplitKeys, 1));
    }
    const int64_t per = std::max<int64_t>((keys + splits - 1) / splits, 1);
    splits = std::max<int64_t>(1, (keys + per - 1) / per);     // rounding up can leave fewer non-empty ranges
    splits_of_block[bi] = splits;
    for (int64_t s = 0; s < splits; ++s) items.push_back({rb, lo + s * per, std::min(hi, lo + (s + 1) * per), bi});
  }
  return items;
}

template <typename T>
void forward_kernel(const Call& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, int64_t num_splits) {
  const int64_t D = c.head_dim;
  std::vector<int64_t> splits_of_block;
  const std::vector<Item> items = make_items(c, num_splits, splits_of_block);
  const int64_t n_items = static_cast<int64_t>(items.size());
  const bool split = n_items > static_cast<int64_t>(splits_of_block.size());
  std::vector<State> parts(split ? n_items : 0);
  std::vector<int64_t> first_item(splits_of_block.size(), 0);
  for (int64_t it = n_items - 1; it >= 0; --it) first_item[items[it].block] = it;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const bool varlen = q.dim() == 3;
  const int64_t o_sb = varlen ? 0 : out.stride(0), o_sr = out.stride(varlen ? 0 : 1), o_sh = out.stride(varlen ? 1 : 2);

  int64_t tile_rows = 1, tile_keys = 1;
  for (const Item& item : items) {
    tile_rows = std::max(tile_rows, item.rows.r1 - item.rows.r0);
    tile_keys = std::max(tile_keys, std::min(kBlockN, item.key_hi - item.key_lo));
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch<T> w(D, tile_rows, tile_keys, c.paged());
    State st;
    std::vector<float> row_buf;
    for (int64_t it; (it = next.fetch_add(1)) < n_items;) {
      const Item& item = items[it];
      const Sequence& seq = c.seqs[item.rows.b];
      State& target = split ? parts[it] : st;
      target.reset(item.rows.r1 - item.rows.r0, D);
      attend<T>(c, seq, item.rows, item.key_lo, item.key_hi, qp, kp, vp, w, target);
      if (!split) write_block(c, seq, item.rows, st, op, o_sb, o_sr, o_sh, lp, row_buf);
    }
  });
  if (!split) return;
  const int64_t n_blocks = static_cast<int64_t>(splits_of_block.size());
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    State st;
    std::vector<float> row_buf;
    for (int64_t bi = begin; bi < end; ++bi) {
      const Item& item = items[first_item[bi]];
      merge_splits(parts, first_item[bi], splits_of_block[bi], item.rows.r1 - item.rows.r0, D, st);
      write_block(c, c.seqs[item.rows.b], item.rows, st, op, o_sb, o_sr, o_sh, lp, row_buf);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cpu_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale, bool causal, bool bottom_right, int64_t window_left,
    int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi_slopes,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, int64_t seed, int64_t num_splits,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& leftpad_k) {
  constexpr const char* op = "mmkern_C::cpu_attention_forward";
  Call c = make_call(op, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, bottom_right, window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p,
                     seed, block_table, leftpad_k);
  TORCH_CHECK_VALUE(num_splits >= 0, op, ": num_splits must be >= 0 (0 = choose); got ", num_splits);
  const bool varlen = q.dim() == 3;
  at::Tensor out = empty_output(q.sizes(), q.options());
  at::Tensor lse = varlen ? empty_output({c.heads, q.size(0)}, q.options().dtype(at::kFloat))
                          : empty_output({c.batch, c.heads, q.size(1)}, q.options().dtype(at::kFloat));
  if (varlen) c.lse_sb = 0, c.lse_sh = lse.stride(0), c.lse_sr = lse.stride(1);
  else c.lse_sb = lse.stride(0), c.lse_sh = lse.stride(1), c.lse_sr = lse.stride(2);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (varlen) {   // rows of the packed q outside every sequence (cu_seqlens_q[-1] < total) are never visited
    out.zero_();
    lse.fill_(kNegInf);
  }
  dispatch_dtype(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T>(c, q, k, v, out, lse, num_splits);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern_C, CPU, m) { m.impl("cpu_attention_forward", &cpu_attention_forward); }

}  // namespace mmkern::attention_cpu
