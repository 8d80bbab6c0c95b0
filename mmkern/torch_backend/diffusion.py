"""The `torch` backend of the diffusion ops: the eager formulas a user writes without mmkern (diffusers'
schedulers and training scripts), through torch's own elementwise kernels.

Per op, in the dtype diffusers computes it in:
    add_noise, get_velocity, DDPM, DDIM, Euler's input scaling and add_noise: in the samples' dtype, the
        per-sample coefficients (sqrt(a_t), the posterior's, sigma) gathered and combined in the table's dtype
        (float32/float64, B numbers), then cast to the samples' dtype;
    the loss and its gradient: in float32 (F.mse_loss(pred.float(), target.float()), the Min-SNR weights);
    the Euler step: in float32 at least (diffusers upcasts the sample), prev_sample back in model_output's dtype.
Dynamic thresholding takes torch.quantile of |x0| in float32 (as diffusers, which upcasts half x0 for it).
Gathered indices are clamped into the table (as the kernels do: GPU index values are never read on the host).
The math and its special cases (fixed_large_log, DDIM's clamp at 0) are the op's, written out in the
reference backend (mmkern/reference/diffusion*.py): this file does not import it.

Refused (reasons): float64 samples (the reference backend's: the oracle is eager float64 torch already).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkern.ops.diffusion_loss_problem import LossProblem
from mmkern.ops.diffusion_problem import NoiseMixProblem
from mmkern.ops.diffusion_samplers_problem import EulerAddNoiseProblem


# --------------------------------------------------------------------------- reasons

def _samples(problem) -> tuple[str, torch.Tensor]:
    if isinstance(problem, NoiseMixProblem):
        return problem.samples_name, problem.samples
    if isinstance(problem, LossProblem):
        return "model_output", problem.model_output
    if isinstance(problem, EulerAddNoiseProblem):
        return "original_samples", problem.original_samples
    return "sample", problem.sample


def reasons(problem) -> list[str]:
    name, samples = _samples(problem)
    if samples.dtype == torch.float64:
        return [f"{name} has dtype torch.float64: the reference backend computes float64 (eager torch in float64 "
                f"is the oracle)"]
    return []


def ddpm_step_reasons(problem) -> list[str]:
    out = reasons(problem)
    if problem.learned_variance and problem.noise is not None and problem.sample.dim() < 2:
        out.append(f"variance_type {problem.variance_type!r} with a sample of shape {tuple(problem.sample.shape)}: "
                   f"no channel dimension holds the predicted variance")
    return out


# --------------------------------------------------------------------------- helpers

def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or 0-d values shaped to broadcast against (B, ...)."""
    return values.reshape(tuple(values.shape) + (1,) * (like.dim() - values.dim()))


def _gather(table: torch.Tensor, index: torch.Tensor, last: int, like: torch.Tensor) -> torch.Tensor:
    """table[index] per sample, in the table's dtype, the index clamped into [0, last]."""
    return _per_sample(table[index.clamp(0, last)], like)


def _new(t: torch.Tensor, dtype: torch.dtype, *inputs: torch.Tensor | None) -> torch.Tensor:
    """t in `dtype`, contiguous, and never one of `inputs` (an op's output may not alias an input)."""
    out = t.to(dtype).contiguous()
    return out.clone() if any(out is i for i in inputs if i is not None) else out


# --------------------------------------------------------------------------- noise schedule

def _noise_mix(p: NoiseMixProblem) -> torch.Tensor:
    x, noise, table = p.samples, p.noise, p.alphas_cumprod
    a = _gather(table, p.timesteps, table.shape[0] - 1, x)
    sqrt_a, sqrt_one_minus_a = a.sqrt().to(x.dtype), (1 - a).sqrt().to(x.dtype)
    if p.velocity:      # sqrt(a) noise - sqrt(1 - a) x, the product and the sum fused (torch.addcmul)
        out = torch.addcmul(sqrt_a * noise, x, sqrt_one_minus_a, value=-1)
    else:               # sqrt(a) x + sqrt(1 - a) noise
        out = torch.addcmul(sqrt_a * x, noise, sqrt_one_minus_a)
    return _new(out, x.dtype, x, noise)


def add_noise(problem):
    """Kernel of mmkern::add_noise: sqrt(a) x0 + sqrt(1 - a) noise (DDPMScheduler.add_noise)."""
    return _noise_mix(problem)


def get_velocity(problem):
    """Kernel of mmkern::get_velocity: sqrt(a) noise - sqrt(1 - a) x0 (DDPMScheduler.get_velocity)."""
    return _noise_mix(problem)


# --------------------------------------------------------------------------- loss

def _weighted_difference(p: LossProblem):
    """(w per sample or None, model_output - target), float32 (the loss's dtype)."""
    dtype = p.loss_dtype
    table = p.alphas_cumprod.to(dtype)
    mo = p.model_output.to(dtype)
    a = _gather(table, p.timesteps, table.shape[0] - 1, mo)
    if p.prediction_type == "epsilon":
        target = p.noise.to(dtype)
    elif p.prediction_type == "v_prediction":
        target = a.sqrt() * p.noise.to(dtype) - (1 - a).sqrt() * p.original_samples.to(dtype)
    else:
        target = p.original_samples.to(dtype)
    w = None
    if p.min_snr:   # min(SNR, g) / SNR, / (SNR + 1), min(SNR, g): the forms without divisions by 0 (SNR = a / (1 - a))
        g = p.snr_gamma
        if p.prediction_type == "epsilon":
            w = torch.clamp_max(g * (1 - a) / a, 1.0)
        elif p.prediction_type == "v_prediction":
            w = torch.minimum(a, g * (1 - a))
        else:
            w = torch.clamp_max(a / (1 - a), g)
    return w, mo, target


def diffusion_loss(problem):
    """Kernel of mmkern::diffusion_loss: mean of w * (model_output - target)^2, float32 (the training scripts'
    F.mse_loss(model_pred.float(), target.float()), Min-SNR-weighted per sample)."""
    w, mo, target = _weighted_difference(problem)
    if w is None:
        loss = F.mse_loss(mo, target) if mo.numel() else (mo - target).square().mean()
    else:
        loss = (F.mse_loss(mo, target, reduction="none") * w).mean()
    return _new(loss, problem.loss_dtype)


def diffusion_loss_backward(problem):
    """Kernel of mmkern::diffusion_loss_backward: grad * 2 w (model_output - target) / numel, in float32, then in
    model_output's dtype."""
    w, mo, target = _weighted_difference(problem)
    d = problem.grad.to(mo.dtype) * (2.0 / max(mo.numel(), 1)) * (mo - target)
    if w is not None:
        d = d * w
    return _new(d, problem.model_output.dtype)


# --------------------------------------------------------------------------- DDPM and DDIM

def _alphas(p, alpha_prev_if_negative: float, like: torch.Tensor):
    """(a_t, a_prev) per sample in the table's dtype; prev_timesteps < 0 takes alpha_prev_if_negative."""
    table = p.alphas_cumprod
    last = table.shape[0] - 1
    a = _gather(table, p.timesteps, last, like)
    prev = _per_sample(p.prev_timesteps.long(), like)
    a_prev = torch.where(prev >= 0, _gather(table, p.prev_timesteps, last, like),
                         torch.full_like(a, alpha_prev_if_negative))
    return a, a_prev


def _predict(p, mo: torch.Tensor, s: torch.Tensor, a: torch.Tensor):
    """(x0, eps) from the model output, elementwise in the samples' dtype (sqrt(a), sqrt(1 - a) cast to it)."""
    sqrt_a, sqrt_b = a.sqrt().to(s.dtype), (1 - a).sqrt().to(s.dtype)
    if p.prediction_type == "epsilon":
        return (s - sqrt_b * mo) / sqrt_a, mo
    if p.prediction_type == "v_prediction":
        return sqrt_a * s - sqrt_b * mo, sqrt_a * mo + sqrt_b * s
    return mo, (s - sqrt_a * mo) / sqrt_b


def _clip(p, x0: torch.Tensor) -> torch.Tensor:
    """Dynamic thresholding (ratio > 0; Imagen's, diffusers' _threshold_sample) or clipping (range > 0)."""
    if p.dynamic_thresholding_ratio > 0:
        if x0.numel() == 0:     # no samples, or samples with no elements: nothing to threshold
            return x0
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs().float(), p.dynamic_thresholding_ratio, dim=1)
        s = s.to(flat.dtype).clamp(1, p.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)
    if p.clip_sample_range > 0:
        return x0.clamp(-p.clip_sample_range, p.clip_sample_range)
    return x0


def ddpm_step(problem):
    """Kernel of mmkern::ddpm_step (DDPMScheduler.step, per sample): (prev_sample, pred_original_sample)."""
    p = problem
    s, mo, dtype = p.sample, p.model_output, p.sample.dtype
    predicted_variance = None
    if p.learned_variance and mo.dim() > 1 and mo.shape[1] == 2 * s.shape[1]:
        mo, predicted_variance = mo[:, :s.shape[1]], mo[:, s.shape[1]:]
    a, a_prev = _alphas(p, 1.0, s)
    b, b_prev = 1 - a, 1 - a_prev
    current_alpha = a / a_prev
    current_beta = 1 - current_alpha
    x0 = _clip(p, _predict(p, mo, s, a)[0])
    # posterior mean (DDPM eq. 7): coefficients of x0 and x_t
    out = (a_prev.sqrt() * current_beta / b).to(dtype) * x0 + (current_alpha.sqrt() * b_prev / b).to(dtype) * s
    if p.noise is not None:
        variance = torch.clamp(b_prev / b * current_beta, min=1e-20)
        if p.variance_type in ("fixed_small", "fixed_small_log"):
            std = variance.sqrt().to(dtype)
        elif p.variance_type in ("fixed_large", "fixed_large_log"):   # fixed_large_log: exp(0.5 log beta_t)
            std = current_beta.sqrt().to(dtype)
        elif p.variance_type == "learned":
            std = predicted_variance.sqrt()
        else:   # learned_range: the log variance interpolated between the two fixed ones
            frac = (predicted_variance + 1) / 2
            std = torch.exp(0.5 * (frac * current_beta.log().to(dtype) + (1 - frac) * variance.log().to(dtype)))
        noisy = _per_sample(p.timesteps > 0, s)
        out = out + torch.where(noisy, std * p.noise, torch.zeros((), dtype=dtype, device=s.device))
    return _new(out, dtype, s, p.model_output), _new(x0, dtype, s, p.model_output)


def ddim_step(problem):
    """Kernel of mmkern::ddim_step (DDIMScheduler.step, per sample; DDIM eq. 12)."""
    p = problem
    s, dtype = p.sample, p.sample.dtype
    a, a_prev = _alphas(p, p.final_alpha_cumprod, s)
    b, b_prev = 1 - a, 1 - a_prev
    x0, eps = _predict(p, p.model_output, s, a)
    x0 = _clip(p, x0)
    var = (b_prev / b) * (1 - a / a_prev)          # sigma_t^2 / eta^2
    std = p.eta * var.sqrt()
    if p.use_clipped_model_output:
        eps = (s - a.sqrt().to(dtype) * x0) / b.sqrt().to(dtype)
    # sqrt(1 - a_prev - std^2) as sqrt(b_prev - eta^2 var), clamped at 0: exactly 0 at eta = 1 and a = 0 (zero
    # terminal SNR), where std ** 2 rounds to +-1 ulp of b_prev (csrc/diffusion/diffusion_math.h)
    out = a_prev.sqrt().to(dtype) * x0 + (b_prev - p.eta ** 2 * var).clamp(min=0).sqrt().to(dtype) * eps
    if p.eta > 0 and p.noise is not None:
        out = out + std.to(dtype) * p.noise
    return _new(out, dtype, s, p.model_output), _new(x0, dtype, s, p.model_output)


# --------------------------------------------------------------------------- Euler

def euler_step(problem):
    """Kernel of mmkern::euler_step (EulerDiscreteScheduler.step, per sample; Karras et al. 2022, alg. 2), in
    float32 at least (diffusers upcasts the sample): prev_sample in model_output's dtype, x0 in x0_dtype."""
    p = problem
    dtype = p.x0_dtype
    sigmas = p.sigmas
    s, mo = p.sample.to(dtype), p.model_output.to(dtype)
    sigma = _gather(sigmas, p.step_index, sigmas.shape[0] - 2, s)
    sigma_next = _gather(sigmas, p.step_index.clamp(0, sigmas.shape[0] - 2) + 1, sigmas.shape[0] - 1, s)
    gamma = torch.where((p.s_tmin <= sigma) & (sigma <= p.s_tmax), torch.full_like(sigma, p.gamma),
                        torch.zeros_like(sigma))
    sigma_hat = sigma * (gamma + 1)
    if p.noise is not None:     # churn: lift the sample from sigma to sigma_hat
        s = s + p.noise.to(dtype) * (p.s_noise * (sigma_hat ** 2 - sigma ** 2).sqrt()).to(dtype)
    sigma_, sigma_hat_ = sigma.to(dtype), sigma_hat.to(dtype)
    if p.prediction_type == "epsilon":
        x0 = s - sigma_hat_ * mo
    elif p.prediction_type == "v_prediction":
        x0 = mo * (-sigma_ / (sigma_ ** 2 + 1).sqrt()) + s / (sigma_ ** 2 + 1)
    else:
        x0 = mo
    out = s + (s - x0) / sigma_hat_ * (sigma_next.to(dtype) - sigma_hat_)
    inputs = (p.sample, p.model_output)
    return _new(out, p.model_output.dtype, *inputs), _new(x0, dtype, *inputs)


def euler_scale_model_input(problem):
    """Kernel of mmkern::euler_scale_model_input: sample / sqrt(sigma^2 + 1)."""
    s, sigmas = problem.sample, problem.sigmas
    sigma = _gather(sigmas, problem.step_index, sigmas.shape[0] - 1, s)
    return _new(s / (sigma ** 2 + 1).sqrt().to(s.dtype), s.dtype, s)


def euler_add_noise(problem):
    """Kernel of mmkern::euler_add_noise: x + sigmas[i] * noise (EulerDiscreteScheduler.add_noise)."""
    x, noise, sigmas = problem.original_samples, problem.noise, problem.sigmas
    sigma = _gather(sigmas, problem.step_index, sigmas.shape[0] - 1, x)
    return _new(torch.addcmul(x, sigma.to(x.dtype), noise), x.dtype, x, noise)
