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

from mmkern.diffusion._args import index_tensor
from mmkern.ops import diffusion_loss as ops
from mmkern.ops import _eager as eager
from mmkern.ops._checks import last_dim_contiguous


def diffusion_loss(model_output, original_samples, noise, timesteps, alphas_cumprod, prediction_type="epsilon",
                   snr_gamma=None):
    """The training loss mean(w_b * (model_output - target)^2) over all elements, in one fused kernel (and its
    gradient in another), without materialising the target, the squared error or the weights.

    Arguments:
        model_output: (batch, ...), float16, bfloat16, float32 or float64. The denoiser's prediction.
        original_samples: the shape and dtype of model_output, on its device. The clean samples x_0.
        noise: the shape and dtype of model_output, on its device: the noise x_t was made with.
        timesteps: an int, or an int32/int64 tensor on the samples' device, 0-d (one timestep for all) or
            (batch,) (one per sample). Values in [0, T - 1] (checked for CPU tensors only: no GPU sync).
        alphas_cumprod: (T,) float32 or float64, on the samples' device.
        prediction_type: what model_output predicts, so the target: "epsilon" (noise), "v_prediction"
            (sqrt(a_t) noise - sqrt(1 - a_t) x_0) or "sample" (x_0).
        snr_gamma: None (w_b = 1, plain MSE) or a float > 0: Min-SNR-gamma weights (Hang et al. 2023),
            min(SNR, g) / SNR for epsilon, min(SNR, g) / (SNR + 1) for v_prediction, min(SNR, g) for sample,
            with SNR = a_t / (1 - a_t) per sample.
    Return:
        loss: a 0-d tensor, float32 (float64 for float64 inputs), on the samples' device. Differentiable in
        model_output, original_samples and noise.
    """
    fn = "mmkern.diffusion.diffusion_loss"
    if snr_gamma is not None and (isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float))
                                  or not snr_gamma > 0):
        raise ValueError(f"{fn}: snr_gamma must be None or a float > 0, got {snr_gamma!r}")
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"{fn}: model_output must be a torch.Tensor, got {type(model_output).__name__}")
    ops.check_prediction_type(fn, prediction_type)
    return eager.call(ops.diffusion_loss, last_dim_contiguous(model_output), last_dim_contiguous(original_samples),
                      last_dim_contiguous(noise), index_tensor(fn, "timesteps", timesteps, model_output),
                      alphas_cumprod, prediction_type, float(snr_gamma or 0.0))
