"""Reference diffusion training loss (the oracle of mmkern::diffusion_loss and its backward).

With a = alphas_cumprod[t] per sample and the target of `prediction_type`
    epsilon: noise        v_prediction: sqrt(a) noise - sqrt(1 - a) x0        sample: x0
    loss = mean over all elements of  w_b * (model_output - target)^2
where w_b = 1, or with Min-SNR-gamma weighting (Hang et al. 2023; SNR = a / (1 - a)):
    epsilon: min(SNR, g) / SNR = min(g (1 - a) / a, 1)
    v_prediction: min(SNR, g) / (SNR + 1) = min(a, g (1 - a))
    sample: min(SNR, g)
(the right-hand forms are the same numbers without the divisions that give inf/NaN at a = 0 or 1).
The mean over all elements equals diffusers' training scripts' "per-sample mean times weight, then
mean over the batch" because every sample has the same number of elements.
The loss is float32, float64 for float64 inputs (like F.mse_loss(pred.float(), target.float())), written
out here: the oracle shares no dtype policy with the kernels (theirs is mmkern/ops/diffusion_loss.py).
Each kernel takes the op's problem record (LossProblem) and reads only its schema arguments.
"""
from __future__ import annotations

import torch

from mmkern.reference.precision import compute_dtype, up


def _alpha(timesteps, alphas_cumprod, like):
    a = alphas_cumprod.to(compute_dtype())[timesteps.long()]
    return a.reshape(tuple(a.shape) + (1,) * (like.dim() - a.dim()))


def min_snr_weight(a: torch.Tensor, prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weight (1 when snr_gamma <= 0, i.e. no weighting)."""
    if snr_gamma <= 0:
        return torch.ones_like(a)
    if prediction_type == "epsilon":
        return torch.clamp_max(snr_gamma * (1 - a) / a, 1.0)
    if prediction_type == "v_prediction":
        return torch.minimum(a, snr_gamma * (1 - a))
    return torch.clamp_max(a / (1 - a), snr_gamma)


def target(original_samples, noise, a, prediction_type):
    if prediction_type == "epsilon":
        return up(noise)
    if prediction_type == "v_prediction":
        return a.sqrt() * up(noise) - (1 - a).sqrt() * up(original_samples)
    return up(original_samples)


def forward(problem):
    """Kernel of mmkern::diffusion_loss: the 0-d loss."""
    p = problem
    a = _alpha(p.timesteps, p.alphas_cumprod, p.model_output)
    w = min_snr_weight(a, p.prediction_type, p.snr_gamma)
    diff = up(p.model_output) - target(p.original_samples, p.noise, a, p.prediction_type)
    out_dtype = torch.float64 if p.model_output.dtype == torch.float64 else torch.float32
    return (w * diff.square()).mean().to(out_dtype)


def backward(problem):
    """Kernel of mmkern::diffusion_loss_backward: d loss / d model_output = grad * 2 w (mo - target) / numel."""
    p = problem
    a = _alpha(p.timesteps, p.alphas_cumprod, p.model_output)
    w = min_snr_weight(a, p.prediction_type, p.snr_gamma)
    diff = up(p.model_output) - target(p.original_samples, p.noise, a, p.prediction_type)
    scale = 2.0 / max(p.model_output.numel(), 1)
    return (up(p.grad) * scale * w * diff).to(p.model_output.dtype).contiguous()
