// attention_cpu.h:make_call: the C++ CPU attention kernels' view of one call, and the checks a kernel needs
// before it may trust an index. The op layer (mmkern/ops/attention_problem.py) has validated shapes, dtypes
// and cu_seqlens already; this repeats what decides memory safety (a direct torch.ops.mmkern_C call skips
// the op layer): devices, the contiguous head dim, cu_seqlens within the packed lengths, seqused_k within
// the cache, the mask's shape.
#include "attention/attention_cpu.h"

#include "common/checks.h"

namespace mmkern::attention_cpu {
namespace {

std::vector<int64_t> host_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

void check_head_layout(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must have a contiguous head dim (stride 1); got strides ", t.strides());
}

}  // namespace

Call make_call(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
               const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
               double softmax_scale, bool causal, bool bottom_right, int64_t window_left, int64_t window_right,
               double softcap, const c10::optional<at::Tensor>& alibi_slopes,
               const c10::optional<at::Tensor>& attn_mask, double dropout_p, int64_t seed,
               const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& leftpad_k) {
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK_VALUE(varlen == cu_seqlens_k.has_value(), op, ": cu_seqlens_q and cu_seqlens_k go together");
  const int64_t rank = varlen ? 3 : 4;
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor; got ", t->device());
    TORCH_CHECK_VALUE(t->dim() == rank, op, ": ", name, " must be ", rank, "-D; got shape ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                     q.scalar_type(), "; got ", t->scalar_type());
    check_head_layout(op, name, *t);
  }
  check_dtype(op, "q", q, {at::kFloat, at::kBFloat16, at::kHalf});
  Call c;
  c.dtype = q.scalar_type();
  c.heads = q.size(-2);
  c.kv_heads = k.size(-2);
  c.head_dim = q.size(-1);
  TORCH_CHECK_VALUE(c.kv_heads >= 1 && c.heads % c.kv_heads == 0, op, ": k/v heads (", c.kv_heads,
                    ") must divide q heads (", c.heads, ")");
  TORCH_CHECK_VALUE(k.size(-1) == c.head_dim && v.size(-1) == c.head_dim && v.size(-2) == c.kv_heads &&
                        v.size(0) == k.size(0) && (varlen || v.size(1) == k.size(1)),
                    op, ": k ", k.sizes(), " and v ", v.sizes(), " must agree with q ", q.sizes());
  c.group = c.heads / c.kv_heads;
  const int r = varlen ? 0 : 1;   // the row dim
  c.q_sb = varlen ? 0 : q.stride(0), c.q_sr = q.stride(r), c.q_sh = q.stride(r + 1);
  c.k_sb = varlen ? 0 : k.stride(0), c.k_sr = k.stride(r), c.k_sh = k.stride(r + 1);
  c.v_sb = varlen ? 0 : v.stride(0), c.v_sr = v.stride(r), c.v_sh = v.stride(r + 1);

  if (varlen) {
    const std::vector<int64_t> cq = host_values(*cu_seqlens_q), ck = host_values(*cu_seqlens_k);
    TORCH_CHECK_VALUE(cq.size() == ck.size() && !cq.empty(), op, ": cu_seqlens_q and cu_seqlens_k must both hold "
                      "batch + 1 offsets");
    c.batch = static_cast<int64_t>(cq.size()) - 1;
    for (int64_t b = 0; b < c.batch; ++b) {
      const int64_t ql = cq[b + 1] - cq[b], kl = ck[b + 1] - ck[b];
      TORCH_CHECK_VALUE(cq[b] >= 0 && ql >= 0 && cq[b + 1] <= q.size(0) && ck[b] >= 0 && kl >= 0 &&
                            ck[b + 1] <= k.size(0),
                        op, ": cu_seqlens must be non-decreasing offsets within the packed lengths (q ", q.size(0),
                        ", k ", k.size(0), ")");
      TORCH_CHECK_VALUE(ql <= max_seqlen_q && kl <= max_seqlen_k, op, ": a sequence is longer than max_seqlen");
      c.seqs.push_back({cq[b], ql, ck[b], kl, bottom_right ? kl - ql : 0});
    }
    c.max_seqlen_q = std::max<int64_t>(max_seqlen_q, 1);
    c.max_seqlen_k = std::max<int64_t>(max_seqlen_k, 1);
  } else {
    c.batch = q.size(0);
    TORCH_CHECK_VALUE(!(varlen && (block_table.has_value() || leftpad_k.has_value())), op,
                      ": block_table and leftpad_k take dense q");
    if (block_table.has_value()) {   // paged: k/v (num_blocks, page, H_kv, D), the table (batch, max_blocks)
      const at::Tensor& t = *block_table;
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == c.batch && t.device().is_cpu(), op,
                        ": block_table must be a CPU (batch, max_blocks) tensor; got ", t.sizes());
      TORCH_CHECK_VALUE(!attn_mask.has_value() && k.size(1) > 0, op, ": paged k/v take no attn_mask and pages of >= 1 row");
      c.table = host_values(t);
      c.table_cols = t.size(1);
      c.page = k.size(1);
      for (int64_t e : c.table)
        TORCH_CHECK_VALUE(e >= 0 && e < k.size(0), op, ": block_table entry ", e, " is not a page index in 0..",
                          k.size(0) - 1);
    } else {
      TORCH_CHECK_VALUE(k.size(0) == c.batch, op, ": k must have q's batch ", c.batch, "; got ", k.size(0));
    }
    const int64_t Lq = q.size(1), Lk = c.paged() ? c.table_cols * c.page : k.size(1);
    std::vector<int64_t> used, pads;
    if (seqused_k.has_value()) {
      TORCH_CHECK_VALUE(seqused_k->dim() == 1 && seqused_k->size(0) == c.batch, op,
                        ": seqused_k must have shape (batch,) = (", c.batch, ",); got ", seqused_k->sizes());
      used = host_values(*seqused_k);
    }
    if (leftpad_k.has_value()) {
      TORCH_CHECK_VALUE(leftpad_k->dim() == 1 && leftpad_k->size(0) == c.batch, op,
                        ": leftpad_k must have shape (batch,) = (", c.batch, ",); got ", leftpad_k->sizes());
      pads = host_values(*leftpad_k);
    }
    for (int64_t b = 0; b < c.batch; ++b) {
      const int64_t end = used.empty() ? Lk : used[b], pad = pads.empty() ? 0 : pads[b];
      TORCH_CHECK_VALUE(end >= 0 && end <= Lk, op, ": seqused_k[", b, "] = ", end, " must be in 0..", Lk,
                        " (the cache length)");
      TORCH_CHECK_VALUE(pad >= 0 && pad <= end, op, ": leftpad_k[", b, "] = ", pad, " must be in 0..seqused_k[", b,
                        "] = ", end);
      const int64_t kl = end - pad;      // the sequence's keys: cache rows [pad, end), positions from pad
      c.seqs.push_back({0, Lq, pad, kl, bottom_right ? kl - Lq : 0});
    }
    c.max_seqlen_q = std::max<int64_t>(Lq, 1);
    c.max_seqlen_k = std::max<int64_t>(Lk, 1);
  }
  c.scale = static_cast<float>(softmax_scale);
  c.softcap = static_cast<float>(softcap);
  c.left = window_left < 0 ? kUnbounded : window_left;
  const int64_t right = causal ? 0 : window_right;
  c.right = right < 0 ? kUnbounded : right;

  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    check_dtype(op, "alibi_slopes", a, {at::kFloat});
    TORCH_CHECK_VALUE(a.device().is_cpu() && a.is_contiguous() &&
                          ((a.dim() == 1 && a.size(0) == c.heads) ||
                           (a.dim() == 2 && a.size(0) == c.batch && a.size(1) == c.heads)),
                      op, ": alibi_slopes must be contiguous (heads,) or (batch, heads); got ", a.sizes());
    c.alibi = a.data_ptr<float>();
    c.alibi_sb = a.dim() == 2 ? c.heads : 0;
  }
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK_VALUE(!varlen && m.dim() == 4 && m.size(0) == c.batch && m.size(1) == c.heads &&
                          m.size(2) == q.size(1) && m.size(3) == k.size(1),
                      op, ": attn_mask must have shape (batch, heads, seqlen_q, seqlen_k); got ", m.sizes());
    check_dtype(op, "attn_mask", m, {at::kBool, at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    c.mask_kind = m.scalar_type() == at::kBool ? 1 : 2;
    c.mask = m.data_ptr();
    c.mask_dtype = m.scalar_type();
    c.m_sb = m.stride(0), c.m_sh = m.stride(1), c.m_sr = m.stride(2), c.m_sc = m.stride(3);
  }
  c.dropout_p = static_cast<float>(dropout_p);
  c.seed = static_cast<uint64_t>(seed);
  return c;
}

}  // namespace mmkern::attention_cpu
