// Schemas of the flash attention ops of mmkern._C (namespace mmkern_C).
// - attention_forward / attention_backward: the CUDA kernels (attention_forward.cu, attention_backward.cu; CUDA
//   key, CUDA builds only), called by mmkern/native/attention.py for the `cuda` backend.
// - cpu_attention_forward / cpu_attention_backward: the C++ CPU kernels (attention_cpu_*.cpp, CPU key, every
//   build), with every feature of mmkern::attention_forward / attention_backward (mmkern/ops/attention.py):
//   causal in both alignments, sliding window (-1 = unbounded), softcap (0 = off), ALiBi, bool/float masks and
//   the mask's gradient, dropout (Philox at the Triton kernels' counters; seed as an int), num_splits (0 =
//   choose) for the forward's split over keys. Called by mmkern/native/attention_cpu.py for the `cpu` backend.
//
// Layouts (as mmkern/ops/attention.py): dense q (B, Lq, H, D), k/v (B, Lk, H_kv, D), lse float32 (B, H, Lq);
// varlen q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens_q/k int32 (B + 1,), lse (H, total_q).
// seqused_k (B,) int32: valid keys per sequence (KV cache); cpu_attention_forward also takes block_table (B, max_blocks)
// (paged k/v (num_blocks, page, H_kv, D)) and leftpad_k (B,) (where each sequence's keys start). H % H_kv == 0 (GQA/MQA). causal is bottom-right
// aligned (query i sees key j iff j <= i + Lk - Lq). fp16/bf16, head dims 64, 96, 128, fp32 accumulation.
// A row that sees no key gives out = 0 and lse = -inf. dlse (optional, like lse) is the gradient of lse.
// deterministic=True: dq/dk/dv bitwise identical run to run.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmkern_C, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) "
        "-> (Tensor out, Tensor lse)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, "
        "float softmax_scale, bool causal, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("cpu_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, bool bottom_right, "
        "int window_left, int window_right, float softcap, Tensor? alibi_slopes, Tensor? attn_mask, float dropout_p, "
        "int seed, int num_splits, Tensor? block_table=None, Tensor? leftpad_k=None) -> (Tensor out, Tensor lse)");
  m.def("cpu_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, "
        "float softmax_scale, bool causal, bool bottom_right, int window_left, int window_right, float softcap, "
        "Tensor? alibi_slopes, Tensor? attn_mask, bool mask_grad, float dropout_p, int seed) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor d_mask)");
  // rotary_cpu.cpp: mmkern::rotary_embedding (mmkern/ops/rotary_problem.py) on CPU tensors; x (B, L, H, D) or varlen
  // (total, H, D) with cu_seqlens, cos/sin (seqlen_ro, rotary_dim / 2) contiguous in x's dtype or float32.
  m.def("cpu_rotary_embedding(Tensor x, Tensor cos, Tensor sin, Tensor? seqlen_offsets, Tensor? cu_seqlens, "
        "int seqlen_offset, bool interleaved, bool conjugate) -> Tensor");
}
