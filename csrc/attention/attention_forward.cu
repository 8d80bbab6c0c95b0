// Host side of the CUDA flash attention forward (torch.ops.mmkern_C.attention_forward, CUDA key): checks the
// inputs (a clear error naming the argument), lays out the strides, and launches the tensor-core kernel of
// attention_forward_kernel.cuh on the current stream. Schemas and layouts: register.cpp.
//
// Template instantiations: {fp16, bf16} x head dim {64, 96, 128} = 6 kernels; dense/varlen, seqused_k,
// causal and GQA/MQA are runtime arguments (branches on uniform values, cheap next to the MMAs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "attention/attention_forward_kernel.cuh"
#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace mmkern::attention {
namespace {

constexpr const char* kOp = "mmkern_C::attention_forward";

// The kernel reads rows with 16-byte cp.async: last dimension contiguous, every other stride a multiple of
// 8 elements and a 16-byte aligned start. Other layouts (rare views) are copied once here.
at::Tensor rows_ready(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor int32_vector(const char* name, const at::Tensor& t, int64_t length, const at::Device& device) {
  check_device(kOp, name, t, device);
  check_dtype(kOp, name, t, {at::kInt});
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, kOp, ": ", name, " must have shape (", length, ",); got ",
                    t.sizes());
  return t.contiguous();
}

template <typename T, int kD>
void launch(const ForwardParams& params, dim3 grid) {
  auto kernel = attention_forward_kernel<T, kD>;
  constexpr int smem = forward_smem_bytes(kD);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kThreads, smem, cuda::current_stream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_head_dim(int64_t head_dim, const ForwardParams& params, dim3 grid) {
  switch (head_dim) {
    case 64: return launch<T, 64>(params, grid);
    case 96: return launch<T, 96>(params, grid);
    case 128: return launch<T, 128>(params, grid);
    default: TORCH_CHECK_VALUE(false, kOp, ": head_dim must be 64, 96 or 128; got ", head_dim);
  }
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    bool causal) {
  (void)max_seqlen_k;   // the kernel finds each sequence's keys through cu_seqlens_k / k's shape
  const auto device = q_in.device();
  TORCH_CHECK_VALUE(device.is_cuda(), kOp, ": q must be a CUDA tensor; got ", device);
  check_dtype(kOp, "q", q_in, {at::kHalf, at::kBFloat16});
  check_device(kOp, "k", k_in, device);
  check_device(kOp, "v", v_in, device);
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), kOp,
                   ": q, k and v must have the same dtype; got ", q_in.scalar_type(), ", ", k_in.scalar_type(), ", ",
                   v_in.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), kOp,
                    ": cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at all (dense)");
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "(total, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  TORCH_CHECK_VALUE(q_in.dim() == rank, kOp, ": q must be ", rank, "-D ", layout, "; got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(k_in.dim() == rank, kOp, ": k must be ", rank, "-D ", layout, "; got shape ", k_in.sizes());
  TORCH_CHECK_VALUE(v_in.sizes() == k_in.sizes(), kOp, ": v must have k's shape ", k_in.sizes(), "; got ",
                    v_in.sizes());
  const int64_t H = q_in.size(-2), D = q_in.size(-1), H_kv = k_in.size(-2);
  TORCH_CHECK_VALUE(D == 64 || D == 96 || D == 128, kOp, ": head_dim (q.shape[-1]) must be 64, 96 or 128; got ", D);
  TORCH_CHECK_VALUE(k_in.size(-1) == D, kOp, ": k must have q's head_dim ", D, "; got ", k_in.size(-1));
  TORCH_CHECK_VALUE(H_kv >= 1 && H % H_kv == 0, kOp, ": the key/value heads (", H_kv,
                    ") must divide the query heads (", H, ")");
  TORCH_CHECK_VALUE(H <= 65535, kOp, ": at most 65535 query heads; got ", H);
  TORCH_CHECK_VALUE(softmax_scale > 0.0, kOp, ": softmax_scale must be > 0; got ", softmax_scale);

  const int64_t B = varlen ? cu_seqlens_q->size(0) - 1 : q_in.size(0);
  TORCH_CHECK_VALUE(B >= 0 && B <= 65535, kOp, ": the batch must hold 0 to 65535 sequences; got ", B);
  if (!varlen) {
    TORCH_CHECK_VALUE(k_in.size(0) == B, kOp, ": k must have q's batch ", B, "; got ", k_in.size(0));
    TORCH_CHECK_VALUE(q_in.size(1) <= INT32_MAX && k_in.size(1) <= INT32_MAX, kOp, ": sequences too long");
  } else {
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_q <= INT32_MAX, kOp,
                      ": max_seqlen_q must be in [0, 2^31); got ", max_seqlen_q);
    TORCH_CHECK_VALUE(q_in.size(0) <= INT32_MAX && k_in.size(0) <= INT32_MAX, kOp, ": packed sequences too long");
  }
  const at::Tensor cu_q = varlen ? int32_vector("cu_seqlens_q", *cu_seqlens_q, B + 1, device) : at::Tensor();
  const at::Tensor cu_k = varlen ? int32_vector("cu_seqlens_k", *cu_seqlens_k, B + 1, device) : at::Tensor();
  const at::Tensor used = seqused_k.has_value() ? int32_vector("seqused_k", *seqused_k, B, device) : at::Tensor();

  c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = rows_ready(q_in), k = rows_ready(k_in), v = rows_ready(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = varlen ? at::empty({H, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({B, H, q.size(1)}, q.options().dtype(at::kFloat));
  const int64_t rows_q = varlen ? max_seqlen_q : q.size(1);
  if (B == 0 || H == 0 || rows_q == 0 || q.numel() == 0) return {out, lse};

  ForwardParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.cu_seqlens_q = varlen ? cu_q.data_ptr<int32_t>() : nullptr;
  p.cu_seqlens_k = varlen ? cu_k.data_ptr<int32_t>() : nullptr;
  p.seqused_k = used.defined() ? used.data_ptr<int32_t>() : nullptr;
  // (batch, row, head) strides; varlen tensors are (total, heads, dim): no batch stride
  auto strides = [varlen](const at::Tensor& t, int64_t& b, int64_t& r, int64_t& h) {
    b = varlen ? 0 : t.stride(0);
    r = t.stride(varlen ? 0 : 1);
    h = t.stride(varlen ? 1 : 2);
  };
  strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = varlen ? lse.stride(0) : lse.stride(1);
  p.seqlen_q = varlen ? 0 : static_cast<int>(q.size(1));
  p.seqlen_k = varlen ? 0 : static_cast<int>(k.size(1));
  p.group = static_cast<int>(H / H_kv);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;

  const dim3 grid(static_cast<unsigned>((rows_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(H),
                  static_cast<unsigned>(B));
  if (q.scalar_type() == at::kHalf) {
    launch_head_dim<mma::Fp16>(D, p, grid);
  } else {
    launch_head_dim<mma::Bf16>(D, p, grid);
  }
  return {out, lse};
}

}  // namespace
}  // namespace mmkern::attention

TORCH_LIBRARY_IMPL(mmkern_C, CUDA, m) { m.impl("attention_forward", &mmkern::attention::attention_forward_cuda); }
