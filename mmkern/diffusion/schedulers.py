"""diffusers drop-in schedulers whose add_noise, get_velocity, scale_model_input and step run on mmkern's fused ops.

    pipe.scheduler = mmkern.diffusion.DDIMScheduler.from_config(pipe.scheduler.config)

Subclasses of diffusers' DDPMScheduler, DDIMScheduler and EulerDiscreteScheduler: same config, same
set_timesteps, same outputs (within float32 rounding), same use of the generator. Importing this module
imports diffusers (an optional dependency: `pip install mmkern[models]`); `import mmkern` does not.

What differs from diffusers, on purpose:
  - No host synchronisation in step / add_noise / scale_model_input: the tables live on the
    sample's device (cached per device), timesteps are gathered inside the kernels, the previous
    timestep comes from a device lookup table built in set_timesteps (diffusers' DDPM searches
    self.timesteps with .nonzero() every step). DDPM draws its noise whenever the timestep is a
    device tensor (diffusers asks `t > 0` on the host; the kernel adds it only where t > 0), so the
    generator advances once more at the last step than diffusers' does; with CPU timesteps the
    draws are exactly diffusers'. Euler finds its first step index as diffusers does (one search,
    unless set_begin_index was called), then counts on the host.
  - Coefficients in float32 whatever the sample dtype, from diffusers' own float32 alphas_cumprod
    (the table the model was trained with); diffusers casts a_t to the sample dtype before the square
    root, which rounds a_t to 1 near t = 0 in float16/bfloat16 (1 - a_t = 0: inf/NaN x0).
  - step also accepts a (B,) tensor of timesteps: one per sample.
  - DDPM "fixed_large_log" gives sqrt(beta_t) noise (diffusers: (log beta_t) ** 0.5 = NaN).
  - EulerDiscreteScheduler.add_noise finds each timestep's step index on the device (diffusers: a host
    search per timestep), then one fused kernel.
"""
from __future__ import annotations

import torch
import diffusers
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from mmkern.diffusion.noising import add_noise as _add_noise, get_velocity as _get_velocity
from mmkern.diffusion.sampling import (ddim_step, ddpm_step, euler_add_noise, euler_scale_model_input,
                                       euler_step)


def _on(cache: dict, key: str, device: torch.device, make):
    """cache[(key, device)], made once per device (a host-to-device copy outside the sampling loop)."""
    k = (key, str(device))
    if k not in cache:
        cache[k] = make().to(device)
    return cache[k]


def _timestep_tensor(timestep, device) -> torch.Tensor:
    if isinstance(timestep, torch.Tensor):
        return timestep.to(device=device, dtype=torch.int64) if timestep.dtype.is_floating_point or \
            timestep.device != device else timestep
    return torch.tensor(int(timestep), dtype=torch.int64, device=device)


def _host_any_positive(timestep) -> bool | None:
    """Is any timestep > 0, if that can be known without reading a GPU tensor (None: unknown)."""
    if isinstance(timestep, torch.Tensor):
        return bool((timestep > 0).any()) if timestep.device.type == "cpu" else None
    return timestep > 0


class _AlphaTables:
    """float64 alphas_cumprod of the scheduler's config, per device, and the previous-timestep lookup."""

    def _mm_cache(self) -> dict:
        if "_mm_tables" not in self.__dict__:
            self.__dict__["_mm_tables"] = {}
        return self.__dict__["_mm_tables"]

    def _mm_alphas_cumprod(self, device) -> torch.Tensor:
        """diffusers' own alphas_cumprod (float32): the numbers the model was trained against. (mmkern's
        float64 NoiseSchedule differs from it by float32 cumprod drift, up to ~1e-3 relative where a_t is
        tiny, e.g. the end of the cosine schedule; the drop-in keeps diffusers' numbers.)"""
        return _on(self._mm_cache(), "alphas_cumprod", device,
                   lambda: self.alphas_cumprod.detach().to("cpu", torch.float32).clone())

    def _mm_set_prev_table(self, prev: torch.Tensor) -> None:
        cache = self._mm_cache()
        for k in [k for k in cache if k[0] == "prev"]:
            del cache[k]
        cache["prev_cpu"] = prev

    def _mm_prev_table(self, device) -> torch.Tensor:
        return _on(self._mm_cache(), "prev", device, lambda: self._mm_cache()["prev_cpu"])

    def add_noise(self, original_samples, noise, timesteps):
        """diffusers' add_noise on mmkern.diffusion.add_noise, with the scheduler's float32 alphas_cumprod.

        Arguments:
            original_samples: (batch, ...), float16, bfloat16, float32 or float64.
            noise: the shape and dtype of original_samples.
            timesteps: an int, or an integer (or float: cast to int64) tensor, 0-d or (batch,), on any device
                (moved to the samples' device); values in [0, num_train_timesteps - 1].
        Return:
            noisy_samples: the shape and dtype of original_samples.
        """
        return _add_noise(original_samples, noise, _timestep_tensor(timesteps, original_samples.device),
                          self._mm_alphas_cumprod(original_samples.device))

    def get_velocity(self, sample, noise, timesteps):
        """diffusers' get_velocity on mmkern.diffusion.get_velocity: sqrt(a_t) noise - sqrt(1 - a_t) sample.

        Arguments:
            sample: (batch, ...), float16, bfloat16, float32 or float64: the clean samples.
            noise: the shape and dtype of sample.
            timesteps: as in add_noise.
        Return:
            velocity: the shape and dtype of sample.
        """
        return _get_velocity(sample, noise, _timestep_tensor(timesteps, sample.device),
                             self._mm_alphas_cumprod(sample.device))

    def _mm_clip_kwargs(self):
        c = self.config
        return dict(prediction_type=c.prediction_type, clip_sample=c.clip_sample, clip_sample_range=c.clip_sample_range,
                    thresholding=c.thresholding, dynamic_thresholding_ratio=c.dynamic_thresholding_ratio,
                    sample_max_value=c.sample_max_value)


class DDPMScheduler(_AlphaTables, diffusers.DDPMScheduler):
    """diffusers.DDPMScheduler with a fused, per-sample, sync-free step (see the module docstring)."""

    def set_timesteps(self, *args, **kwargs):
        """diffusers' set_timesteps (same arguments: num_inference_steps, device, timesteps), then the
        previous-timestep lookup table of the schedule, and the tables copied to `device`."""
        super().set_timesteps(*args, **kwargs)
        T = self.config.num_train_timesteps
        prev = torch.arange(-1, T - 1, dtype=torch.int64)              # without a schedule: t - 1
        if self.custom_timesteps or self.num_inference_steps:
            steps = self.timesteps.cpu().long()                         # once per set_timesteps, not per step
            prev = torch.full((T,), -1, dtype=torch.int64)
            prev[steps[:-1]] = steps[1:]
        self._mm_set_prev_table(prev)
        self._mm_to_device(self.timesteps.device)

    def _mm_to_device(self, device) -> None:
        """Copy the tables to the sampling device here, in set_timesteps, not in the first step."""
        if device.type != "cpu":
            self._mm_alphas_cumprod(device), self._mm_prev_table(device)

    def _mm_prev(self, t: torch.Tensor) -> torch.Tensor:
        if "prev_cpu" not in self._mm_cache():
            self._mm_set_prev_table(torch.arange(-1, self.config.num_train_timesteps - 1, dtype=torch.int64))
        # index_select, not table[t]: indexing with a 0-d tensor would read it on the host
        return torch.index_select(self._mm_prev_table(t.device), 0, t.reshape(-1)).reshape(t.shape)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One DDPM step on mmkern.diffusion.ddpm_step, without a host synchronisation.

        Arguments:
            model_output: (batch, C, ...) like sample, or (batch, 2C, ...) with a learned variance_type; cast to
                sample's dtype.
            timestep: an int, or a 0-d or (batch,) tensor (one timestep per sample), on any device.
            sample: (batch, C, ...), float16, bfloat16, float32 or float64: x_t.
            generator: None or a torch.Generator: draws the step's noise (randn_tensor, as diffusers).
            return_dict: return a DDPMSchedulerOutput (True) or a tuple.
        Return:
            DDPMSchedulerOutput(prev_sample, pred_original_sample), or (prev_sample, pred_original_sample): each
            the shape and dtype of sample.
        """
        model_output = model_output.to(sample.dtype)        # (the kernels take one dtype; diffusers promotes)
        t = _timestep_tensor(timestep, sample.device)
        draw = _host_any_positive(timestep)
        noise = None
        if draw is None or draw:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=model_output.dtype)
        prev_sample, x0 = ddpm_step(model_output, t, sample, self._mm_alphas_cumprod(sample.device),
                                    prev_timesteps=self._mm_prev(t), noise=noise, variance_type=self.variance_type,
                                    **self._mm_clip_kwargs())
        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class DDIMScheduler(_AlphaTables, diffusers.DDIMScheduler):
    """diffusers.DDIMScheduler with a fused, per-sample, sync-free step (see the module docstring)."""

    def set_timesteps(self, *args, **kwargs):
        """diffusers' set_timesteps (same arguments: num_inference_steps, device), and the table copied to
        `device`."""
        super().set_timesteps(*args, **kwargs)
        if self.timesteps.device.type != "cpu":       # the table goes to the device here, not in the first step
            self._mm_alphas_cumprod(self.timesteps.device)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """One DDIM step on mmkern.diffusion.ddim_step, without a host synchronisation.

        Arguments:
            model_output: the shape of sample; cast to sample's dtype.
            timestep: an int, or a 0-d or (batch,) tensor (one timestep per sample), on any device.
            sample: (batch, ...), float16, bfloat16, float32 or float64: x_t.
            eta: a float >= 0: the weight of the noise (0: deterministic DDIM).
            use_clipped_model_output: re-derive the noise from the clipped x_0 (bool).
            generator: None or a torch.Generator: draws the noise when eta > 0 (randn_tensor, as diffusers).
            variance_noise: None, or the shape of model_output: the noise itself, instead of a generator.
            return_dict: return a DDIMSchedulerOutput (True) or a tuple.
        Return:
            DDIMSchedulerOutput(prev_sample, pred_original_sample), or (prev_sample, pred_original_sample): each
            the shape and dtype of sample.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        model_output = model_output.to(sample.dtype)        # (the kernels take one dtype; diffusers promotes)
        t = _timestep_tensor(timestep, sample.device)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        ac = self._mm_alphas_cumprod(sample.device)
        final = float(self.final_alpha_cumprod)          # a CPU tensor in diffusers: no device sync
        prev_sample, x0 = ddim_step(model_output, t, sample, ac, prev_t, final_alpha_cumprod=final, eta=eta,
                                    noise=noise, use_clipped_model_output=use_clipped_model_output,
                                    **self._mm_clip_kwargs())
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class EulerDiscreteScheduler(diffusers.EulerDiscreteScheduler):
    """diffusers.EulerDiscreteScheduler with fused scale_model_input and step (see the module docstring).

    Its sigmas are diffusers' own (computed in set_timesteps, kept on the CPU by diffusers); a copy
    lives on the sample's device, with an index table whose 0-d views select a step without a copy."""

    def _mm_cache(self) -> dict:
        if "_mm_tables" not in self.__dict__:
            self.__dict__["_mm_tables"] = {}
        return self.__dict__["_mm_tables"]

    def set_timesteps(self, *args, **kwargs):
        """diffusers' set_timesteps (same arguments), then the sigma and index tables copied to `device`."""
        super().set_timesteps(*args, **kwargs)
        self.__dict__["_mm_tables"] = {}
        device = self.timesteps.device
        if device.type != "cpu":                      # copy the tables here, not in the first step
            self._mm_sigmas(device)
            _on(self._mm_cache(), "indices", device, lambda: torch.arange(len(self.sigmas)))
            _on(self._mm_cache(), "timesteps", device, lambda: self.timesteps.cpu())

    def _mm_sigmas(self, device):
        return _on(self._mm_cache(), "sigmas", device, lambda: self.sigmas.to(torch.float32))

    def _mm_index(self, timestep, device) -> torch.Tensor:
        """The step index as a device tensor: (B,) for per-sample timesteps, else a 0-d view."""
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and timestep.numel() > 1:
            schedule = _on(self._mm_cache(), "timesteps", device, lambda: self.timesteps.cpu())
            return (timestep.to(device)[:, None] == schedule[None, :]).int().argmax(1)   # first match
        if self.step_index is None:
            self._init_step_index(timestep)
        indices = _on(self._mm_cache(), "indices", device, lambda: torch.arange(len(self.sigmas)))
        return indices[self.step_index]

    def add_noise(self, original_samples, noise, timesteps):
        """x + sigma * noise with sigma gathered per sample inside the kernel. The step index of each
        timestep is found on the device (diffusers searches self.timesteps on the host for each one),
        with diffusers' rule: the second match when a timestep occurs twice, else the first.

        Arguments:
            original_samples: (batch, ...), float16, bfloat16, float32 or float64.
            noise: the shape of original_samples (cast to its dtype).
            timesteps: a tensor of timesteps of the schedule (self.timesteps' values), 0-d or (batch,).
        Return:
            noisy_samples: the shape and dtype of original_samples.
        """
        device = original_samples.device
        if self.begin_index is None:
            schedule = _on(self._mm_cache(), "timesteps", device, lambda: self.timesteps.cpu())
            t = timesteps.to(device).reshape(-1)
            matches = t[:, None] == schedule[None, :]
            which = torch.where(matches.sum(1) > 1, 2, 1)
            index = ((matches.int().cumsum(1) == which[:, None]) & matches).int().argmax(1)
            index = index.reshape(()) if index.numel() == 1 else index
        else:
            i = self.step_index if self.step_index is not None else self.begin_index
            index = _on(self._mm_cache(), "indices", device, lambda: torch.arange(len(self.sigmas)))[i]
        return euler_add_noise(original_samples, noise.to(original_samples.dtype), index, self._mm_sigmas(device))

    def scale_model_input(self, sample, timestep):
        """sample / sqrt(sigma^2 + 1) on mmkern.diffusion.euler_scale_model_input.

        Arguments:
            sample: (batch, ...), float16, bfloat16, float32 or float64.
            timestep: one of self.timesteps (a float or 0-d tensor), or a (batch,) tensor of them (per sample).
        Return:
            scaled: the shape and dtype of sample.
        """
        out = euler_scale_model_input(sample, self._mm_index(timestep, sample.device),
                                      self._mm_sigmas(sample.device))
        self.is_scale_input_called = True
        return out

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        """One Euler step on mmkern.diffusion.euler_step (diffusers' arguments and results).

        Arguments:
            model_output: the shape of sample, any float dtype (computed in the promotion of both dtypes).
            timestep: one of self.timesteps (a float or 0-d float tensor; not an integer index), or a (batch,)
                tensor of them (per sample: the step index is found per sample and not advanced).
            sample: (batch, ...), float16, bfloat16, float32 or float64.
            s_churn, s_tmin, s_tmax, s_noise: floats: Karras' churn (see mmkern.diffusion.euler_step).
            generator: None or a torch.Generator: draws the churn noise.
            return_dict: return an EulerDiscreteSchedulerOutput (True) or a tuple.
        Return:
            EulerDiscreteSchedulerOutput(prev_sample, pred_original_sample), or the tuple: prev_sample the shape
            and dtype of model_output, pred_original_sample at least float32.
        """
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`EulerDiscreteScheduler.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        per_sample = isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and timestep.numel() > 1
        index = self._mm_index(timestep, sample.device)
        gamma_max = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1)
        if per_sample:
            churn = gamma_max > 0                          # the kernel applies s_tmin/s_tmax per sample
        else:
            sigma = self.sigmas[self.step_index]           # a CPU table: no device sync
            churn = gamma_max > 0 and bool(s_tmin <= sigma <= s_tmax)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator) if churn else None
        # diffusers computes in float32 and returns prev_sample in model_output's dtype
        out_dtype = model_output.dtype
        compute = torch.promote_types(model_output.dtype, sample.dtype)
        prev_sample, x0 = euler_step(model_output.to(compute), index, sample.to(compute),
                                     self._mm_sigmas(sample.device), noise=None if noise is None else noise.to(compute),
                                     prediction_type=self.config.prediction_type,
                                     s_churn=s_churn if churn else 0.0, s_tmin=s_tmin,
                                     s_tmax=s_tmax, s_noise=s_noise)
        prev_sample = prev_sample.to(out_dtype)
        if not per_sample:
            self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
