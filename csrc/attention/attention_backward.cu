// CUDA flash attention backward: torch.ops.mmkern_C.attention_backward (CUDA key; schema in register.cpp).
//
// Host side: checks the inputs (each message names the argument), brings q/k/v/dout/out to a layout the
// kernels read with 16-byte copies (last dim contiguous, strides multiples of 8 elements, 16-byte aligned
// base; otherwise a contiguous copy), and launches on the current stream:
//   1. attention_bwd_delta_kernel  delta = rowsum(dO * O) - dlse        (float32, laid out like lse)
//   2. attention_bwd_dkdv_kernel   dK, dV per key tile (GQA group summed inside the block)
//   3. attention_bwd_dq_kernel     dQ per query tile
// No atomics anywhere: dq/dk/dv are bitwise identical run to run whatever `deterministic` says.
// The device code and the tiling are described in attention_backward_kernel.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "attention/attention_backward_kernel.cuh"
#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace mmkern::attention {
namespace {

constexpr const char* kOp = "mmkern_C::attention_backward";

// A (.., rows, heads, D) operand the kernels can read with cp.async: last dim contiguous, other strides
// multiples of 8 elements, 16-byte aligned data. Anything else becomes a contiguous copy (clone: fresh storage).
at::Tensor readable(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && cuda::aligned16(t.data_ptr());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_int_vector(const char* name, const at::Tensor& t, int64_t length, const at::Device& device) {
  check_device(kOp, name, t, device);
  check_dtype(kOp, name, t, {at::kInt});
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, kOp, ": ", name, " must have shape (", length,
                    ",); got ", t.sizes());
}

template <typename T, int D>
void launch(const bwd::BackwardParams& p, int64_t delta_pairs, int max_seqlen_q, int max_seqlen_k,
            cudaStream_t stream) {
  using Tr = bwd::Tiles<D>;
  if (delta_pairs > 0) {
    const int64_t blocks = (delta_pairs + 7) / 8;
    bwd::attention_bwd_delta_kernel<T, D><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p, delta_pairs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // more than 48 KB of dynamic shared memory needs the opt-in (sm_80: up to 163 KB, sm_90: 227 KB); set on
  // every call: the attribute belongs to the current device's context
  C10_CUDA_CHECK(cudaFuncSetAttribute(bwd::attention_bwd_dkdv_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kDkdvSmem));
  C10_CUDA_CHECK(cudaFuncSetAttribute(bwd::attention_bwd_dq_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kDqSmem));
  const int64_t key_tiles = (max_seqlen_k + Tr::kDkdvN - 1) / Tr::kDkdvN;
  const int64_t query_tiles = (max_seqlen_q + Tr::kDqM - 1) / Tr::kDqM;
  TORCH_CHECK_VALUE(key_tiles <= 65535 && query_tiles <= 65535, kOp, ": sequences longer than ",
                    65535 * Tr::kDqM, " are not supported; got max_seqlen_q ", max_seqlen_q, ", max_seqlen_k ",
                    max_seqlen_k);
  if (key_tiles > 0 && p.batch > 0) {
    const dim3 grid(static_cast<unsigned>(p.batch) * p.kv_heads, static_cast<unsigned>(key_tiles));
    bwd::attention_bwd_dkdv_kernel<T, D><<<grid, bwd::kThreads, Tr::kDkdvSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (query_tiles > 0 && p.batch > 0) {
    const dim3 grid(static_cast<unsigned>(p.batch) * p.heads, static_cast<unsigned>(query_tiles));
    bwd::attention_bwd_dq_kernel<T, D><<<grid, bwd::kThreads, Tr::kDqSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_head_dim(int64_t D, const bwd::BackwardParams& p, int64_t pairs, int mq, int mk, cudaStream_t s) {
  switch (D) {
    case 64: launch<T, 64>(p, pairs, mq, mk, s); break;
    case 96: launch<T, 96>(p, pairs, mq, mk, s); break;
    default: launch<T, 128>(p, pairs, mq, mk, s); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& dlse_in,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    bool causal, bool deterministic) {
  (void)deterministic;   // always deterministic: no atomics
  const at::Device device = q_in.device();
  TORCH_CHECK_VALUE(device.is_cuda(), kOp, ": q must be a CUDA tensor; got ", device);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"dout", &dout_in}, {"k", &k_in}, {"v", &v_in},
                         {"out", &out_in}, {"lse", &lse_in}}) {
    check_device(kOp, name, *t, device);
  }
  check_dtype(kOp, "q", q_in, {at::kHalf, at::kBFloat16});
  const auto dtype = q_in.scalar_type();
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"dout", &dout_in}, {"k", &k_in}, {"v", &v_in},
                         {"out", &out_in}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, kOp, ": ", name, " must have the dtype of q (", dtype, "); got ",
                     t->scalar_type());
  }
  check_dtype(kOp, "lse", lse_in, {at::kFloat});

  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK_VALUE(varlen == cu_seqlens_k.has_value(), kOp,
                    ": cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at all");
  const int64_t rank = varlen ? 3 : 4;
  TORCH_CHECK_VALUE(q_in.dim() == rank, kOp, ": q must be ", rank, "-D ",
                    varlen ? "(total_q, heads, head_dim)" : "(batch, seqlen_q, heads, head_dim)", "; got shape ",
                    q_in.sizes());
  TORCH_CHECK_VALUE(k_in.dim() == rank, kOp, ": k must be ", rank, "-D like q; got shape ", k_in.sizes());
  const int64_t H = q_in.size(-2), D = q_in.size(-1), H_kv = k_in.size(-2);
  TORCH_CHECK_VALUE(D == 64 || D == 96 || D == 128, kOp, ": head_dim (q.shape[-1]) must be 64, 96 or 128; got ", D);
  TORCH_CHECK_VALUE(H_kv >= 1 && H % H_kv == 0, kOp, ": the number of key/value heads (", H_kv,
                    ") must divide the number of query heads (", H, ")");
  TORCH_CHECK_VALUE(k_in.size(-1) == D, kOp, ": k must have head_dim ", D, " like q; got shape ", k_in.sizes());
  check_shape(kOp, "v", v_in, k_in.sizes());
  check_shape(kOp, "dout", dout_in, q_in.sizes());
  check_shape(kOp, "out", out_in, q_in.sizes());

  int64_t B, Lq, Lk;
  if (varlen) {
    B = cu_seqlens_q->numel() - 1;
    TORCH_CHECK_VALUE(B >= 0, kOp, ": cu_seqlens_q must hold batch + 1 offsets; got shape ", cu_seqlens_q->sizes());
    check_int_vector("cu_seqlens_q", *cu_seqlens_q, B + 1, device);
    check_int_vector("cu_seqlens_k", *cu_seqlens_k, B + 1, device);
    Lq = q_in.size(0);
    Lk = k_in.size(0);
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, kOp, ": max_seqlen_q / max_seqlen_k must be >= 0; got ",
                      max_seqlen_q, ", ", max_seqlen_k);
    // no sequence is longer than the packed total: a larger bound (flash-attn allows one) only widens the grid
    max_seqlen_q = std::min(max_seqlen_q, Lq);
    max_seqlen_k = std::min(max_seqlen_k, Lk);
    check_shape(kOp, "lse", lse_in, {H, Lq});
  } else {
    B = q_in.size(0);
    Lq = q_in.size(1);
    Lk = k_in.size(1);
    TORCH_CHECK_VALUE(k_in.size(0) == B, kOp, ": k must have the batch size of q (", B, "); got shape ",
                      k_in.sizes());
    max_seqlen_q = Lq;
    max_seqlen_k = Lk;
    check_shape(kOp, "lse", lse_in, {B, H, Lq});
  }
  TORCH_CHECK_VALUE(Lq < (int64_t{1} << 31) && Lk < (int64_t{1} << 31), kOp, ": sequence lengths must fit in int32");
  if (seqused_k.has_value()) check_int_vector("seqused_k", *seqused_k, B, device);
  if (dlse_in.has_value()) {
    check_device(kOp, "dlse", *dlse_in, device);
    check_dtype(kOp, "dlse", *dlse_in, {at::kFloat});
    check_shape(kOp, "dlse", *dlse_in, lse_in.sizes());
  }

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  const at::Tensor dout = readable(dout_in), out = readable(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor dlse = dlse_in.has_value() ? dlse_in->contiguous() : at::Tensor();
  const at::Tensor cu_q = varlen ? cu_seqlens_q->contiguous() : at::Tensor();
  const at::Tensor cu_k = varlen ? cu_seqlens_k->contiguous() : at::Tensor();
  const at::Tensor used = seqused_k.has_value() ? seqused_k->contiguous() : at::Tensor();

  at::Tensor dq = at::empty(q.sizes(), q.options());
  // keys past seqused_k are never visited: their gradient is 0
  at::Tensor dk = used.defined() ? at::zeros(k.sizes(), k.options()) : at::empty(k.sizes(), k.options());
  at::Tensor dv = used.defined() ? at::zeros(v.sizes(), v.options()) : at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};

  bwd::BackwardParams p{};
  p.q = static_cast<const uint16_t*>(q.data_ptr());
  p.k = static_cast<const uint16_t*>(k.data_ptr());
  p.v = static_cast<const uint16_t*>(v.data_ptr());
  p.dout = static_cast<const uint16_t*>(dout.data_ptr());
  p.out = static_cast<const uint16_t*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = static_cast<uint16_t*>(dq.data_ptr());
  p.dk = static_cast<uint16_t*>(dk.data_ptr());
  p.dv = static_cast<uint16_t*>(dv.data_ptr());
  p.cu_seqlens_q = varlen ? cu_q.data_ptr<int>() : nullptr;
  p.cu_seqlens_k = varlen ? cu_k.data_ptr<int>() : nullptr;
  p.seqused_k = used.defined() ? used.data_ptr<int>() : nullptr;
  // (batch, row, head) strides; varlen has no batch dimension (batch stride 0, rows are packed)
  auto strides = [varlen](const at::Tensor& t, int64_t& sb, int64_t& sm, int64_t& sh) {
    sb = varlen ? 0 : t.stride(0);
    sm = t.stride(varlen ? 0 : 1);
    sh = t.stride(varlen ? 1 : 2);
  };
  strides(q, p.q_b, p.q_m, p.q_h);
  strides(k, p.k_b, p.k_n, p.k_h);
  strides(v, p.v_b, p.v_n, p.v_h);
  strides(dout, p.do_b, p.do_m, p.do_h);
  strides(out, p.o_b, p.o_m, p.o_h);
  strides(dq, p.dq_b, p.dq_m, p.dq_h);
  strides(dk, p.dk_b, p.dk_n, p.dk_h);
  p.lse_b = varlen ? 0 : H * Lq;
  p.lse_h = Lq;
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(H_kv);
  p.group = static_cast<int>(H / H_kv);
  p.seqlen_q = static_cast<int>(Lq);
  p.seqlen_k = static_cast<int>(Lk);
  p.rows_per_batch = static_cast<int>(std::max<int64_t>(Lq, 1));
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;
  const int64_t pairs = (varlen ? Lq : B * Lq) * H;

  const cudaStream_t stream = cuda::current_stream();
  if (dtype == at::kHalf) {
    launch_head_dim<bwd::Fp16>(D, p, pairs, static_cast<int>(max_seqlen_q), static_cast<int>(max_seqlen_k), stream);
  } else {
    launch_head_dim<bwd::Bf16>(D, p, pairs, static_cast<int>(max_seqlen_q), static_cast<int>(max_seqlen_k), stream);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace mmkern::attention

TORCH_LIBRARY_IMPL(mmkern_C, CUDA, m) {
  m.impl("attention_backward", &mmkern::attention::attention_backward_cuda);
}
