"""Forward diffusion (q-sample) and the training targets: add_noise, get_velocity, training_target.

    x_t = add_noise(x_0, noise, t, alphas_cumprod)         sqrt(a_t) x_0 + sqrt(1 - a_t) noise
    v   = get_velocity(x_0, noise, t, alphas_cumprod)      sqrt(a_t) noise - sqrt(1 - a_t) x_0
    training_target(x_0, noise, t, alphas_cumprod, prediction_type)   what the model should predict
Same arguments and results as diffusers' DDPMScheduler.add_noise / get_velocity, plus per-sample timesteps.
"""
from __future__ import annotations

from mmkern.diffusion._args import samples_noise_timesteps
from mmkern.ops import diffusion as ops
from mmkern.ops import _eager as eager

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def add_noise(original_samples, noise, timesteps, alphas_cumprod):
    """Forward-diffuse clean samples to timestep t: x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise, one fused
    kernel, a_t gathered per sample inside it (diffusers' DDPMScheduler.add_noise).

    Arguments:
        original_samples: (batch, ...), float16, bfloat16, float32 or float64. The clean samples x_0.
        noise: the shape and dtype of original_samples, on its device.
        timesteps: an int (every sample at that timestep), or an int32/int64 tensor on the samples' device,
            0-d (one timestep for all) or (batch,) (one per sample). Values in [0, T - 1] (checked for CPU
            tensors; on a GPU the kernels clamp them into the table instead of reading them on the host).
        alphas_cumprod: (T,) float32 or float64, on the samples' device: a_t = prod_{s <= t} (1 - beta_s)
            (NoiseSchedule.alphas_cumprod, or a diffusers scheduler's).
    Return:
        x_t: the shape and dtype of original_samples (contiguous). Differentiable in original_samples and noise.
    """
    x0, noise, timesteps = samples_noise_timesteps("mmkern.diffusion.add_noise", "original_samples",
                                                   original_samples, noise, timesteps)
    return eager.call(ops.add_noise, x0, noise, timesteps, alphas_cumprod)


def get_velocity(sample, noise, timesteps, alphas_cumprod):
    """The v-prediction target (Salimans & Ho 2022): v = sqrt(a_t) * noise - sqrt(1 - a_t) * sample, one fused
    kernel (diffusers' DDPMScheduler.get_velocity).

    Arguments:
        sample: (batch, ...), float16, bfloat16, float32 or float64. The clean samples x_0.
        noise: the shape and dtype of sample, on its device.
        timesteps: an int, or an int32/int64 tensor on the samples' device, 0-d or (batch,); values in [0, T - 1]
            (as add_noise).
        alphas_cumprod: (T,) float32 or float64, on the samples' device.
    Return:
        v: the shape and dtype of sample (contiguous). Differentiable in sample and noise.
    """
    x0, noise, timesteps = samples_noise_timesteps("mmkern.diffusion.get_velocity", "sample", sample, noise,
                                                   timesteps)
    return eager.call(ops.get_velocity, x0, noise, timesteps, alphas_cumprod)


def training_target(original_samples, noise, timesteps, alphas_cumprod, prediction_type="epsilon"):
    """What a denoiser trained with `prediction_type` should output at timestep t (the target of diffusers'
    training scripts): the noise, the velocity, or the clean sample.

    Arguments:
        original_samples: (batch, ...), float16, bfloat16, float32 or float64. The clean samples x_0.
        noise: the shape and dtype of original_samples, on its device.
        timesteps: an int, or an int32/int64 tensor on the samples' device, 0-d or (batch,); values in [0, T - 1].
        alphas_cumprod: (T,) float32 or float64, on the samples' device.
        prediction_type: "epsilon" (the target is noise), "v_prediction" (get_velocity) or "sample" (x_0).
    Return:
        target: the shape and dtype of original_samples. For "epsilon" and "sample" it is the input tensor itself
        (noise, original_samples; copied only when its last dimension is strided), validated like the fused
        ops'; for "v_prediction" a new tensor from get_velocity.
    """
    fn = "mmkern.diffusion.training_target"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{fn}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
    if prediction_type == "v_prediction":
        return get_velocity(original_samples, noise, timesteps, alphas_cumprod)
    # epsilon / sample: validate like the fused ops, then the target is one of the inputs as it is
    x0, noise, timesteps = samples_noise_timesteps(fn, "original_samples", original_samples, noise, timesteps)
    ops.check_schedule_inputs(fn, "original_samples", x0, noise, timesteps, alphas_cumprod)
    ops.check_timestep_values(fn, timesteps, alphas_cumprod)   # as add_noise: CPU tensors only (no GPU sync)
    return noise if prediction_type == "epsilon" else x0
