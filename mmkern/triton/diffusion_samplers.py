"""Triton kernels of the sampler steps: DDPM and DDIM (one kernel, KIND), Euler, Euler's input scaling.
See mmkern/reference/diffusion_samplers.py for the math, written out plainly.

Samples (B, ...) are viewed flat; element i belongs to sample b = i // per_sample, whose table
entries (a_t, a_prev or sigma, sigma_next) are gathered inside the kernel from its timestep (cached
loads; no (B,) coefficient tensors, no host reads). Indices are clamped into the table.
One step = one launch: read model_output, sample (and noise), write prev_sample and
pred_original_sample: 4-5 x numel x itemsize bytes. Coefficient math in float32.

Dynamic thresholding needs s_b = quantile(|x0_b|, ratio) first, a per-sample order statistic that
one streaming pass cannot give. The runner then launches the kernel in its X0 mode (writes x0 in
fp32, 2 reads + 1 write), takes torch.quantile on the device (no host sync), and launches the step
with s (B,) as an input. torch.quantile accepts at most 2**24 elements per call; larger batches go
through it in chunks of samples.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkern.triton._common import dtype_reasons

BLOCK = 1024
NUM_WARPS = 4
PREDICTION = {"epsilon": 0, "v_prediction": 1, "sample": 2, "original_sample": 2}
VARIANCE = {"fixed_small": 0, "fixed_small_log": 1, "fixed_large": 2, "fixed_large_log": 3, "learned": 4,
            "learned_range": 5}
X0_ONLY, DDPM, DDIM = 0, 1, 2
QUANTILE_LIMIT = 2 ** 24


@triton.jit
def _alpha_step_kernel(mo_ptr, sample_ptr, noise_ptr, threshold_ptr, out_ptr, x0_ptr, timesteps_ptr,
                       prev_timesteps_ptr, alphas_cumprod_ptr, numel, per_sample, mo_sample_stride, timestep_stride,
                       T, alpha_prev_if_negative, eta, clip_sample_range, variance_type, clipped_eps,
                       KIND: tl.constexpr, PRED: tl.constexpr, THRESHOLD: tl.constexpr, HAS_NOISE: tl.constexpr,
                       BLOCK: tl.constexpr):
    # Runtime switches (few constexprs keep the number of compiled variants small):
    # clip_sample_range (inf = no clipping), variance_type (index into VARIANCE), clipped_eps (0/1).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    b = offsets // per_sample
    inner = offsets - b * per_sample
    # ---- the schedule at this sample's timestep (fp32)
    t = tl.load(timesteps_ptr + b * timestep_stride, mask=in_bounds, other=0)
    t = tl.minimum(tl.maximum(t, 0), T - 1)
    # (masked lanes: a = 0.25, a_prev = 0.5, so that no log(0) is evaluated even where nothing is stored)
    a = tl.load(alphas_cumprod_ptr + t, mask=in_bounds, other=0.25).to(tl.float32)
    sqrt_a = tl.sqrt(a)
    beta = 1.0 - a
    sqrt_beta = tl.sqrt(beta)
    # ---- x0 and eps from the model output (model_output rows may be 2C wide: learned variance)
    mo_offsets = b * mo_sample_stride + inner
    mo = tl.load(mo_ptr + mo_offsets, mask=in_bounds, other=0.0).to(tl.float32)
    s = tl.load(sample_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if PRED == 0:
        x0 = (s - sqrt_beta * mo) / sqrt_a
        eps = mo
    elif PRED == 1:
        x0 = sqrt_a * s - sqrt_beta * mo
        eps = sqrt_a * mo + sqrt_beta * s
    else:
        x0 = mo
        eps = (s - sqrt_a * mo) / sqrt_beta
    if KIND == 0:
        tl.store(x0_ptr + offsets, x0, mask=in_bounds)           # fp32 x0 for the quantile
    else:
        if THRESHOLD:
            thr = tl.load(threshold_ptr + b, mask=in_bounds, other=1.0)
            x0 = tl.minimum(tl.maximum(x0, -thr), thr) / thr
        else:
            x0 = tl.minimum(tl.maximum(x0, -clip_sample_range), clip_sample_range)
        t_prev = tl.load(prev_timesteps_ptr + b * timestep_stride, mask=in_bounds, other=0)
        a_prev_table = tl.load(alphas_cumprod_ptr + tl.minimum(tl.maximum(t_prev, 0), T - 1), mask=in_bounds,
                               other=0.5).to(tl.float32)
        a_prev = tl.where(t_prev >= 0, a_prev_table, alpha_prev_if_negative)
        beta_prev = 1.0 - a_prev
        if KIND == 1:     # DDPM: posterior mean (eq. 7) + std * noise where t > 0
            current_alpha = a / a_prev
            current_beta = 1.0 - current_alpha
            out = (tl.sqrt(a_prev) * current_beta / beta) * x0 + (tl.sqrt(current_alpha) * beta_prev / beta) * s
            if HAS_NOISE:
                variance = tl.maximum(beta_prev / beta * current_beta, 1e-20)
                learned = variance_type >= 4          # the variance is the second half of the model's channels
                pv = tl.load(mo_ptr + mo_offsets + per_sample, mask=in_bounds & learned, other=1.0).to(tl.float32)
                frac = (pv + 1.0) / 2.0
                std = tl.where(variance_type <= 1, tl.sqrt(variance),
                               tl.where(variance_type <= 3, tl.sqrt(current_beta),
                                        tl.where(variance_type == 4, tl.sqrt(tl.where(variance_type == 4, pv, 1.0)),
                                                 tl.exp(0.5 * (frac * tl.log(current_beta) +
                                                               (1.0 - frac) * tl.log(variance))))))
                noise = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
                out = out + tl.where(t > 0, std * noise, 0.0)
        else:             # DDIM (eq. 12)
            var = (beta_prev / beta) * (1.0 - a / a_prev)      # sigma_t^2 / eta^2
            std = eta * tl.sqrt(var)
            eps = tl.where(clipped_eps != 0, (s - sqrt_a * x0) / sqrt_beta, eps)
            # from var, not std * std (csrc/diffusion/diffusion_math.h: exact 0 at eta = 1, zero terminal SNR)
            out = tl.sqrt(a_prev) * x0 + tl.sqrt(tl.maximum(beta_prev - eta * eta * var, 0.0)) * eps
            if HAS_NOISE:
                noise = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
                out = out + std * noise
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)
        tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _euler_step_kernel(mo_ptr, sample_ptr, noise_ptr, out_ptr, x0_ptr, step_index_ptr, sigmas_ptr, numel,
                       per_sample, index_stride, n_sigmas, gamma, s_tmin, s_tmax, s_noise, PRED: tl.constexpr,
                       HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    b = offsets // per_sample
    i = tl.load(step_index_ptr + b * index_stride, mask=in_bounds, other=0)
    i = tl.minimum(tl.maximum(i, 0), n_sigmas - 2)
    sigma = tl.load(sigmas_ptr + i, mask=in_bounds, other=1.0).to(tl.float32)
    sigma_next = tl.load(sigmas_ptr + i + 1, mask=in_bounds, other=0.0).to(tl.float32)
    churn = tl.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma, 0.0)
    sigma_hat = sigma * (churn + 1.0)
    mo = tl.load(mo_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    s = tl.load(sample_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_NOISE:     # churn: lift the sample from sigma to sigma_hat
        noise = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        s = s + noise * s_noise * tl.sqrt(sigma_hat * sigma_hat - sigma * sigma)
    if PRED == 0:
        x0 = s - sigma_hat * mo
    elif PRED == 1:
        x0 = mo * (-sigma / tl.sqrt(sigma * sigma + 1.0)) + s / (sigma * sigma + 1.0)
    else:
        x0 = mo
    out = s + (s - x0) / sigma_hat * (sigma_next - sigma_hat)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _euler_scale_kernel(sample_ptr, out_ptr, step_index_ptr, sigmas_ptr, numel, per_sample, index_stride, n_sigmas,
                        BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    i = tl.load(step_index_ptr + (offsets // per_sample) * index_stride, mask=in_bounds, other=0)
    sigma = tl.load(sigmas_ptr + tl.minimum(tl.maximum(i, 0), n_sigmas - 1), mask=in_bounds, other=0.0)
    sigma = sigma.to(tl.float32)
    s = tl.load(sample_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (s / tl.sqrt(sigma * sigma + 1.0)).to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _euler_add_noise_kernel(x_ptr, noise_ptr, out_ptr, step_index_ptr, sigmas_ptr, numel, per_sample, index_stride,
                            n_sigmas, BLOCK: tl.constexpr):
    """out = x + sigmas[i_b] * noise: read x, noise, write out (3 x numel x itemsize bytes)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    i = tl.load(step_index_ptr + (offsets // per_sample) * index_stride, mask=in_bounds, other=0)
    sigma = tl.load(sigmas_ptr + tl.minimum(tl.maximum(i, 0), n_sigmas - 1), mask=in_bounds, other=0.0)
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x + sigma.to(tl.float32) * noise).to(out_ptr.dtype.element_ty), mask=in_bounds)


# --------------------------------------------------------------------------- runners

def step_reasons(problem) -> list[str]:
    """What the kernels do not take in a DDPM / DDIM / Euler step or Euler scaling record."""
    return dtype_reasons(sample=problem.sample)


def _layout(sample, index):
    numel = sample.numel()
    per_sample = max(numel // sample.shape[0], 1) if sample.shape[0] else 1
    return numel, per_sample, 1 if index.dim() == 1 else 0


def _quantile_thresholds(x0_flat: torch.Tensor, ratio: float, sample_max_value: float) -> torch.Tensor:
    """s (B,) fp32 = clamp(quantile(|x0|, ratio) per sample, 1, max), on the device."""
    rows = max(1, QUANTILE_LIMIT // max(x0_flat.shape[1], 1))
    parts = [torch.quantile(chunk.abs(), ratio, dim=1) for chunk in x0_flat.split(rows)]
    return torch.cat(parts).clamp(1, sample_max_value).contiguous()


def _alpha_step(kind, model_output, sample, timesteps, prev_timesteps, alphas_cumprod, noise, prediction_type,
                clip_sample_range, dynamic_thresholding_ratio, sample_max_value, variance_type="fixed_small",
                alpha_prev_if_negative=1.0, eta=0.0, use_clipped_model_output=False):
    model_output, sample = model_output.contiguous(), sample.contiguous()
    noise = None if noise is None else noise.contiguous()
    alphas_cumprod = alphas_cumprod.contiguous()
    prev_timesteps = prev_timesteps.to(timesteps.dtype)     # one pointer type for both (a no-op when they agree)
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    numel, per_sample, t_stride = _layout(sample, timesteps)
    if numel == 0:
        return out, x0
    mo_sample_stride = model_output.numel() // sample.shape[0]
    grid = (triton.cdiv(numel, BLOCK),)
    clip_range = float(clip_sample_range) if clip_sample_range > 0 else float("inf")
    common = (timesteps, prev_timesteps, alphas_cumprod, numel, per_sample, mo_sample_stride, t_stride,
              alphas_cumprod.shape[0], float(alpha_prev_if_negative), float(eta), clip_range,
              VARIANCE[variance_type], int(bool(use_clipped_model_output)))
    consts = dict(PRED=PREDICTION[prediction_type], BLOCK=BLOCK, num_warps=NUM_WARPS)
    threshold = sample                                    # a placeholder pointer when unused
    if dynamic_thresholding_ratio > 0:
        x0_fp32 = torch.empty((sample.shape[0], per_sample), dtype=torch.float32, device=sample.device)
        _alpha_step_kernel[grid](model_output, sample, sample, sample, out, x0_fp32, *common, KIND=X0_ONLY,
                                 THRESHOLD=False, HAS_NOISE=False, **consts)
        threshold = _quantile_thresholds(x0_fp32, dynamic_thresholding_ratio, sample_max_value)
    _alpha_step_kernel[grid](model_output, sample, sample if noise is None else noise, threshold, out, x0, *common,
                             KIND=kind, THRESHOLD=dynamic_thresholding_ratio > 0, HAS_NOISE=noise is not None,
                             **consts)
    return out, x0


def ddpm_step(p):
    return _alpha_step(DDPM, p.model_output, p.sample, p.timesteps, p.prev_timesteps, p.alphas_cumprod, p.noise,
                       p.prediction_type, p.clip_sample_range, p.dynamic_thresholding_ratio, p.sample_max_value,
                       variance_type=p.variance_type)


def ddim_step(p):
    return _alpha_step(DDIM, p.model_output, p.sample, p.timesteps, p.prev_timesteps, p.alphas_cumprod,
                       p.noise if p.eta > 0 else None, p.prediction_type, p.clip_sample_range,
                       p.dynamic_thresholding_ratio, p.sample_max_value, alpha_prev_if_negative=p.final_alpha_cumprod,
                       eta=p.eta, use_clipped_model_output=p.use_clipped_model_output)


def euler_step(p):
    model_output, sample, step_index, sigmas, noise = (p.model_output.contiguous(), p.sample.contiguous(),
                                                       p.step_index, p.sigmas, p.noise)
    out = torch.empty(sample.shape, dtype=model_output.dtype, device=sample.device)
    x0 = torch.empty(sample.shape, dtype=p.x0_dtype, device=sample.device)
    numel, per_sample, stride = _layout(sample, step_index)
    if numel:
        _euler_step_kernel[(triton.cdiv(numel, BLOCK),)](
            model_output, sample, sample if noise is None else noise.contiguous(), out, x0, step_index,
            sigmas.contiguous(), numel, per_sample, stride, sigmas.shape[0], float(p.gamma), float(p.s_tmin),
            float(p.s_tmax), float(p.s_noise), PRED=PREDICTION[p.prediction_type], HAS_NOISE=noise is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, x0


def euler_scale_model_input(p):
    sample, step_index, sigmas = p.sample.contiguous(), p.step_index, p.sigmas
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    numel, per_sample, stride = _layout(sample, step_index)
    if numel:
        _euler_scale_kernel[(triton.cdiv(numel, BLOCK),)](sample, out, step_index, sigmas.contiguous(), numel,
                                                          per_sample, stride, sigmas.shape[0], BLOCK=BLOCK,
                                                          num_warps=NUM_WARPS)
    return out


def add_noise_reasons(problem) -> list[str]:
    """What the kernel does not take in an EulerAddNoiseProblem."""
    return dtype_reasons(original_samples=problem.original_samples)


def euler_add_noise(p):
    x, noise, step_index, sigmas = p.original_samples.contiguous(), p.noise.contiguous(), p.step_index, p.sigmas
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel, per_sample, stride = _layout(x, step_index)
    if numel:
        _euler_add_noise_kernel[(triton.cdiv(numel, BLOCK),)](x, noise, out, step_index, sigmas.contiguous(), numel,
                                                              per_sample, stride, sigmas.shape[0], BLOCK=BLOCK,
                                                              num_warps=NUM_WARPS)
    return out


def aot_configs():
    """Every configuration the dispatcher can launch, for the ahead-of-time compile check (the pointer
    types of timesteps and tables vary too: int32/int64, float32/float64)."""
    import itertools
    for dtype, t_type, a_type in itertools.product(("*fp16", "*bf16", "*fp32"), ("*i32", "*i64"), ("*fp32", "*fp64")):
        alpha_sig = {"mo_ptr": dtype, "sample_ptr": dtype, "noise_ptr": dtype, "threshold_ptr": "*fp32",
                     "out_ptr": dtype, "x0_ptr": dtype, "timesteps_ptr": t_type, "prev_timesteps_ptr": t_type,
                     "alphas_cumprod_ptr": a_type, "numel": "i64", "per_sample": "i64", "mo_sample_stride": "i64",
                     "timestep_stride": "i32", "T": "i32", "alpha_prev_if_negative": "fp32", "eta": "fp32",
                     "clip_sample_range": "fp32", "variance_type": "i32", "clipped_eps": "i32"}
        for pred in (0, 1, 2):
            # unused pointers get `sample` as a placeholder: its dtype (the threshold is fp32 when used)
            yield _alpha_step_kernel, dict(alpha_sig, x0_ptr="*fp32", threshold_ptr=dtype), \
                dict(KIND=X0_ONLY, PRED=pred, THRESHOLD=False, HAS_NOISE=False, BLOCK=BLOCK), NUM_WARPS, 1
            for kind, threshold, has_noise in itertools.product((DDPM, DDIM), (False, True), (False, True)):
                signature = alpha_sig if threshold else dict(alpha_sig, threshold_ptr=dtype)
                yield _alpha_step_kernel, signature, dict(KIND=kind, PRED=pred, THRESHOLD=threshold,
                                                          HAS_NOISE=has_noise, BLOCK=BLOCK), NUM_WARPS, 1
            x0_type = "*fp32" if dtype != "*fp32" else dtype
            for has_noise in (False, True):
                yield _euler_step_kernel, {"mo_ptr": dtype, "sample_ptr": dtype, "noise_ptr": dtype,
                                           "out_ptr": dtype, "x0_ptr": x0_type, "step_index_ptr": t_type,
                                           "sigmas_ptr": a_type, "numel": "i64", "per_sample": "i64",
                                           "index_stride": "i32", "n_sigmas": "i32", "gamma": "fp32",
                                           "s_tmin": "fp32", "s_tmax": "fp32", "s_noise": "fp32"}, \
                    dict(PRED=pred, HAS_NOISE=has_noise, BLOCK=BLOCK), NUM_WARPS, 1
        yield _euler_scale_kernel, {"sample_ptr": dtype, "out_ptr": dtype, "step_index_ptr": t_type,
                                    "sigmas_ptr": a_type, "numel": "i64", "per_sample": "i64", "index_stride": "i32",
                                    "n_sigmas": "i32"}, dict(BLOCK=BLOCK), NUM_WARPS, 1
        yield _euler_add_noise_kernel, {"x_ptr": dtype, "noise_ptr": dtype, "out_ptr": dtype, "step_index_ptr": t_type,
                                        "sigmas_ptr": a_type, "numel": "i64", "per_sample": "i64",
                                        "index_stride": "i32", "n_sigmas": "i32"}, dict(BLOCK=BLOCK), NUM_WARPS, 1
