"""Reference sampler steps (the oracle of mmkern::ddpm_step, ddim_step, euler_step, euler_scale_model_input).

The same math as diffusers' DDPMScheduler.step, DDIMScheduler.step and EulerDiscreteScheduler.step,
written per sample: `timesteps` / `prev_timesteps` / `step_index` are 0-d or (B,) and gathered from
the tables here, so one call can step a batch whose samples sit at different timesteps.
Computed in float64 (or precision.compute_in's dtype); outputs in the samples' dtype, always new
tensors (copy=True: with prediction_type "sample", x0 is model_output itself).

Where diffusers gives NaN, mmkern gives the evident intended value (each documented below):
  - DDPM variance_type "fixed_large_log": diffusers takes (log beta_t) ** 0.5 (NaN); mmkern uses
    exp(0.5 log beta_t) = sqrt(beta_t), GLIDE's meaning of a log variance.
  - DDIM: sqrt(1 - a_prev - std^2) clamps its argument at 0 (rounding can make it -1e-9 at eta = 1).
Each kernel takes the op's problem record (mmkern/ops/diffusion_samplers.py) and reads only its schema
arguments; the output dtypes are written out here (the oracle shares no dtype policy with the kernels).
"""
from __future__ import annotations

import torch

from mmkern.reference.precision import compute_dtype, up

def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or 0-d values shaped to broadcast against (B, ...)."""
    return values.reshape(tuple(values.shape) + (1,) * (like.dim() - values.dim()))


def gather_alphas(alphas_cumprod, timesteps, prev_timesteps, alpha_prev_if_negative, like):
    """(a_t, a_prev): prev_timesteps < 0 means "past the end of the chain" and takes alpha_prev_if_negative."""
    table = alphas_cumprod.to(compute_dtype())
    a = table[timesteps.long()]
    prev = prev_timesteps.long()
    a_prev = torch.where(prev >= 0, table[prev.clamp(min=0)], torch.full_like(a, alpha_prev_if_negative))
    return per_sample(a, like), per_sample(a_prev, like)


def predict_x0_and_epsilon(model_output, sample, a, prediction_type):
    """The clean sample x0 and the noise eps that model_output stands for (before any clipping)."""
    sqrt_a, sqrt_b = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
    return model_output, (sample - sqrt_a * model_output) / sqrt_b


def dynamic_threshold(x0: torch.Tensor, ratio: float, sample_max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = clamp(quantile(|x0|, ratio) per sample, 1, max); x0 -> clamp(x0, -s, s) / s."""
    if x0.numel() == 0:                 # no samples, or samples with no elements: nothing to threshold
        return x0.clone()
    flat = x0.reshape(x0.shape[0], -1)
    # torch.quantile takes float32/float64 only: half-precision x0 is upcast for it (as diffusers does)
    q = torch.quantile(flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.abs().float(), ratio, dim=1)
    s = q.to(flat.dtype).clamp(1, sample_max_value).unsqueeze(1)
    return (torch.minimum(torch.maximum(flat, -s), s) / s).reshape(x0.shape)


def clip_x0(x0, clip_sample_range, dynamic_thresholding_ratio, sample_max_value):
    """thresholding (ratio > 0) takes precedence over clip_sample (range > 0), as in diffusers."""
    if dynamic_thresholding_ratio > 0:
        return dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample_range > 0:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def split_learned_variance(model_output, sample, variance_type):
    """Models with a learned variance output 2C channels: (prediction, variance) along dim 1."""
    if variance_type in ("learned", "learned_range") and model_output.dim() > 1 and \
            model_output.shape[1] == 2 * sample.shape[1]:
        return model_output[:, :sample.shape[1]], model_output[:, sample.shape[1]:]
    return model_output, None


def ddpm_step(problem):
    """Kernel of mmkern::ddpm_step -> (prev_sample, pred_original_sample). Noise is added where t > 0
    (none at all when noise is None)."""
    p = problem
    sample, timesteps, noise, variance_type = p.sample, p.timesteps, p.noise, p.variance_type
    model_output, predicted_variance = split_learned_variance(p.model_output, sample, variance_type)
    mo, s = up(model_output), up(sample)
    a, a_prev = gather_alphas(p.alphas_cumprod, timesteps, p.prev_timesteps, 1.0, s)
    b, b_prev = 1 - a, 1 - a_prev
    current_alpha = a / a_prev
    current_beta = 1 - current_alpha
    x0, _ = predict_x0_and_epsilon(mo, s, a, p.prediction_type)
    x0 = clip_x0(x0, p.clip_sample_range, p.dynamic_thresholding_ratio, p.sample_max_value)
    mean = (a_prev.sqrt() * current_beta / b) * x0 + (current_alpha.sqrt() * b_prev / b) * s
    out = mean
    if noise is not None:
        variance = torch.clamp(b_prev / b * current_beta, min=1e-20)      # posterior variance (DDPM eq. 7)
        if variance_type in ("fixed_small", "fixed_small_log"):
            std = variance.sqrt()
        elif variance_type in ("fixed_large", "fixed_large_log"):
            std = current_beta.sqrt()
        elif variance_type == "learned":
            std = up(predicted_variance).sqrt()
        else:   # learned_range: interpolate the log variance between the two fixed ones
            frac = (up(predicted_variance) + 1) / 2
            std = torch.exp(0.5 * (frac * current_beta.log() + (1 - frac) * variance.log()))
        t_positive = per_sample(timesteps > 0, s)
        out = mean + torch.where(t_positive, std * up(noise), torch.zeros_like(mean))
    return out.to(sample.dtype, copy=True), x0.to(sample.dtype, copy=True)


def ddim_step(problem):
    """Kernel of mmkern::ddim_step -> (prev_sample, pred_original_sample) (DDIM eq. 12)."""
    p = problem
    sample, eta, noise = p.sample, p.eta, p.noise
    mo, s = up(p.model_output), up(sample)
    a, a_prev = gather_alphas(p.alphas_cumprod, p.timesteps, p.prev_timesteps, p.final_alpha_cumprod, s)
    b, b_prev = 1 - a, 1 - a_prev
    x0, eps = predict_x0_and_epsilon(mo, s, a, p.prediction_type)
    x0 = clip_x0(x0, p.clip_sample_range, p.dynamic_thresholding_ratio, p.sample_max_value)
    std = eta * ((b_prev / b) * (1 - a / a_prev)).sqrt()
    if p.use_clipped_model_output:
        eps = (s - a.sqrt() * x0) / b.sqrt()
    out = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        out = out + std * up(noise)
    return out.to(sample.dtype, copy=True), x0.to(sample.dtype, copy=True)


def euler_sigmas(sigmas, step_index, like):
    table = sigmas.to(compute_dtype())
    i = step_index.long()
    return per_sample(table[i], like), per_sample(table[i + 1], like)


def euler_step(problem):
    """Kernel of mmkern::euler_step -> (prev_sample, pred_original_sample) (Karras et al. 2022, algorithm 2).

    sigmas: the (N + 1,) table of the sampling schedule (decreasing, last 0); step_index i, 0-d or (B,):
    sigma = sigmas[i], sigma_next = sigmas[i + 1]. Churn: gamma applies where s_tmin <= sigma <= s_tmax;
    noise (drawn by the caller when any gamma > 0) lifts the sample from sigma to sigma_hat = sigma (1 + gamma).
    prev_sample has model_output's dtype; pred_original_sample is at least float32 (diffusers' Euler step
    upcasts the sample to float32)."""
    p = problem
    model_output = p.model_output
    mo, s = up(model_output), up(p.sample)
    sigma, sigma_next = euler_sigmas(p.sigmas, p.step_index, s)
    g = torch.where((p.s_tmin <= sigma) & (sigma <= p.s_tmax), torch.full_like(sigma, p.gamma),
                    torch.zeros_like(sigma))
    sigma_hat = sigma * (g + 1)
    if p.noise is not None:
        s = s + up(p.noise) * p.s_noise * (sigma_hat ** 2 - sigma ** 2).sqrt()
    if p.prediction_type == "epsilon":
        x0 = s - sigma_hat * mo
    elif p.prediction_type == "v_prediction":
        x0 = mo * (-sigma / (sigma ** 2 + 1).sqrt()) + s / (sigma ** 2 + 1)
    else:
        x0 = mo
    out = s + (s - x0) / sigma_hat * (sigma_next - sigma_hat)
    x0_dtype = torch.promote_types(model_output.dtype, torch.float32)
    return out.to(model_output.dtype, copy=True), x0.to(x0_dtype, copy=True)


def euler_scale_model_input(problem):
    """Kernel of mmkern::euler_scale_model_input: sample / sqrt(sigma^2 + 1)."""
    sample, step_index, sigmas = problem.sample, problem.step_index, problem.sigmas
    s = up(sample)
    sigma = per_sample(sigmas.to(compute_dtype())[step_index.long()], s)
    return (s / (sigma ** 2 + 1).sqrt()).to(sample.dtype).contiguous()


def euler_add_noise(problem):
    """Kernel of mmkern::euler_add_noise: x + sigmas[i] * noise (the Euler scheduler's noising, sigma-space)."""
    p = problem
    original_samples, noise, step_index, sigmas = p.original_samples, p.noise, p.step_index, p.sigmas
    x = up(original_samples)
    sigma = per_sample(sigmas.to(compute_dtype())[step_index.long()], x)
    return (x + sigma * up(noise)).to(original_samples.dtype)
