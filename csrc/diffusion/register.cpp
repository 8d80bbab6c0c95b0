// Schemas of the diffusion ops of mmkern._C (namespace mmkern_C). Kernels: diffusion_cpu.cpp (CPU key),
// diffusion_cuda.cu (CUDA key, CUDA builds only). The Python side is mmkern/native/diffusion.py, which the
// `cpu` and `cuda` backends of mmkern::add_noise, ::diffusion_loss, ::ddpm_step, ... call.
//
// Conventions: samples (B, ...) are contiguous float32/float16/bfloat16; timesteps / step_index are 0-d or (B,)
// int32/int64 and are clamped into the table inside the kernels; alphas_cumprod / sigmas are 1-D float32/float64
// tables read as fp32. clip_sample_range <= 0 means no clipping; `threshold` (B,) fp32 is the dynamic
// thresholding scale s_b (computed by the caller from diffusion_alpha_x0's output with torch.quantile).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mmkern_C, m) {
  m.def("diffusion_add_noise(Tensor original_samples, Tensor noise, Tensor timesteps, Tensor alphas_cumprod)"
        " -> Tensor");
  m.def("diffusion_get_velocity(Tensor sample, Tensor noise, Tensor timesteps, Tensor alphas_cumprod) -> Tensor");
  // 0-d float32 mean of w * (model_output - target)^2; deterministic (fixed-order partial sums)
  m.def("diffusion_loss(Tensor model_output, Tensor original_samples, Tensor noise, Tensor timesteps, "
        "Tensor alphas_cumprod, str prediction_type, float snr_gamma) -> Tensor");
  // d loss / d model_output; grad: 0-d float32
  m.def("diffusion_loss_backward(Tensor grad, Tensor model_output, Tensor original_samples, Tensor noise, "
        "Tensor timesteps, Tensor alphas_cumprod, str prediction_type, float snr_gamma) -> Tensor");
  // the predicted x0 (before clipping) as fp32 (B, numel / B): the input of the dynamic-thresholding quantile;
  // model_output may be (B, 2C, ...) (a learned variance: its first half is read)
  m.def("diffusion_alpha_x0(Tensor model_output, Tensor sample, Tensor timesteps, Tensor alphas_cumprod, "
        "str prediction_type) -> Tensor");
  m.def("diffusion_ddpm_step(Tensor model_output, Tensor sample, Tensor timesteps, Tensor prev_timesteps, "
        "Tensor alphas_cumprod, Tensor? noise, Tensor? threshold, str prediction_type, str variance_type, "
        "float clip_sample_range) -> (Tensor, Tensor)");
  m.def("diffusion_ddim_step(Tensor model_output, Tensor sample, Tensor timesteps, Tensor prev_timesteps, "
        "Tensor alphas_cumprod, float final_alpha_cumprod, float eta, Tensor? noise, Tensor? threshold, "
        "str prediction_type, float clip_sample_range, bool use_clipped_model_output) -> (Tensor, Tensor)");
  // (prev_sample in model_output's dtype, pred_original_sample in float32)
  m.def("diffusion_euler_step(Tensor model_output, Tensor sample, Tensor step_index, Tensor sigmas, Tensor? noise, "
        "str prediction_type, float gamma, float s_tmin, float s_tmax, float s_noise) -> (Tensor, Tensor)");
  m.def("diffusion_euler_scale_model_input(Tensor sample, Tensor step_index, Tensor sigmas) -> Tensor");
  m.def("diffusion_euler_add_noise(Tensor original_samples, Tensor noise, Tensor step_index, Tensor sigmas)"
        " -> Tensor");
}
