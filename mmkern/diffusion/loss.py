"""The diffusion training loss, fused: MSE against the prediction target, optionally Min-SNR-gamma weighted.

    loss = mmkern.diffusion.diffusion_loss(model_pred, latents, noise, timesteps, alphas_cumprod,
                                           prediction_type="v_prediction", snr_gamma=5.0)
    loss.backward()          # d model_pred in one fused kernel

is diffusers' training-script loss (train_text_to_image.py: target from the scheduler, F.mse_loss in
float32, with --snr_gamma the per-sample weights min(SNR, g) / SNR (epsilon), / (SNR + 1) (v_prediction),
min(SNR, g) (sample)) without materialising the target, the squared error or the weights.
Unlike the script, a = 0 (zero terminal SNR) gives weight 1 for epsilon instead of 0/0 = NaN.
"""
from __future__ import annotations

import torch

from mmkern.ops import diffusion_loss as ops
from mmkern.ops import _eager as eager
from mmkern.ops._checks import last_dim_contiguous


def diffusion_loss(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type="epsilon",
                   snr_gamma=None):
    """Mean over all elements of w_b (model_output - target)^2, a 0-d float32 tensor (float64 for float64 inputs).

    timesteps: int, 0-d or (B,) integer tensor; snr_gamma: None (no weighting) or a float > 0."""
    fn = "mmkern.diffusion.diffusion_loss"
    from mmkern.diffusion import _timesteps
    if snr_gamma is not None and (isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float))
                                  or not snr_gamma > 0):
        raise ValueError(f"{fn}: snr_gamma must be None or a float > 0, got {snr_gamma!r}")
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"{fn}: model_output must be a torch.Tensor, got {type(model_output).__name__}")
    ops.check_prediction_type(fn, prediction_type)
    return eager.call(ops.diffusion_loss, last_dim_contiguous(model_output), last_dim_contiguous(original_samples),
                      last_dim_contiguous(noise), _timesteps(fn, timesteps, model_output), alphas_cumprod,
                      prediction_type, float(snr_gamma or 0.0))
