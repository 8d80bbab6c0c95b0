"""Noise-schedule tables, computed in float64: the same schedules as diffusers' schedulers.

    betas (T,)            beta_t, the per-step noise variance
    alphas_cumprod (T,)   a_t = prod_{s<=t} (1 - beta_s), the signal fraction of x_t
    sigmas (T,)           sqrt((1 - a_t) / a_t), the noise-to-signal ratio k-diffusion / Euler use
    snr (T,)              a_t / (1 - a_t) = 1 / sigma_t^2

diffusers builds the same tables in float32 (torch.linspace(..., dtype=float32), a float32
cumprod over T steps); mmkern builds them in float64 from the same formulas, so its tables agree
with diffusers' to float32 rounding (about 1e-6 relative; the float32 cumprod drifts by up to
~T * 6e-8 relative at the end of a 1000-step schedule). Kernels read float64 or float32 tables
and do their coefficient math in float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal, "squaredcos_cap_v2"): betas that discretise
    alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, each capped at max_beta.

    Arguments:
        num_train_timesteps: T, an int >= 1.
        max_beta: a float: the cap on each beta (diffusers' 0.999).
    Return:
        betas: (T,) float64, on the CPU.
    """
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    T = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", algorithm 1): shift sqrt(a_t) so its last value is 0
    and scale it so its first value is unchanged.

    Arguments:
        betas: (T,) float tensor (any float dtype; computed in float64), T >= 2.
    Return:
        betas: (T,) float64, on betas' device; the last is 1 (a_{T-1} = 0).
    """
    sqrt_ac = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac ** 2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
               beta_schedule: str = "linear", trained_betas: Sequence[float] | torch.Tensor | None = None,
               rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """The betas of a schedule, with diffusers' argument names and meanings (its schedulers' __init__).

    Arguments:
        num_train_timesteps: T, an int >= 1 (ignored with trained_betas).
        beta_start, beta_end: floats: the first and last beta of "linear", "scaled_linear" and "sigmoid".
        beta_schedule: "linear", "scaled_linear" (linear in sqrt(beta): latent diffusion), "squaredcos_cap_v2"
            (cosine, betas_for_alpha_bar) or "sigmoid" (GeoDiff).
        trained_betas: None, or a sequence of floats / a tensor of any shape (flattened): the betas as given,
            in place of a schedule.
        rescale_betas_zero_snr: rescale to zero terminal SNR (rescale_zero_terminal_snr) (bool).
    Return:
        betas: (T,) float64 (T = len(trained_betas) when given), on the CPU (trained_betas: on its device).
    """
    fn = "mmkern.diffusion.make_betas"
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten().clone()
    elif not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"{fn}: num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":      # latent diffusion: linear in sqrt(beta)
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "sigmoid":            # GeoDiff
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)) * \
            (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"{fn}: beta_schedule must be one of {', '.join(BETA_SCHEDULES)} (or pass trained_betas); "
                         f"got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """a_t = prod_{s<=t} (1 - beta_s): the signal fraction of x_t.

    Arguments:
        betas: (T,) float tensor (any float dtype; computed in float64).
    Return:
        alphas_cumprod: (T,) float64, on betas' device.
    """
    return torch.cumprod(1 - betas.double(), 0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t), indexed by timestep (diffusers' Euler table is this, flipped,
    with a 0 appended).

    Arguments:
        alphas_cumprod: (T,) float tensor (any float dtype; computed in float64).
    Return:
        sigmas: (T,) float64, on alphas_cumprod's device (inf where a_t = 0).
    """
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = a_t / (1 - a_t), the signal-to-noise ratio (Min-SNR weighting reads it).

    Arguments:
        alphas_cumprod: (T,) float tensor (any float dtype; computed in float64).
    Return:
        snr: (T,) float64, on alphas_cumprod's device (inf where a_t = 1).
    """
    ac = alphas_cumprod.double()
    return ac / (1 - ac)


class NoiseSchedule:
    """All the tables of one schedule, float64, on the CPU (move with `.to(device)`).

    >>> s = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    >>> x_t = mmkern.diffusion.add_noise(x0, noise, t, s.alphas_cumprod.to(x0.device))

    Arguments: those of make_betas (num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
    rescale_betas_zero_snr).
    Attributes, each (T,) float64:
        betas, alphas (1 - betas), alphas_cumprod (a_t), sigmas (sqrt((1 - a_t) / a_t)), snr (a_t / (1 - a_t)).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, rescale_betas_zero_snr: bool = False):
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.snr = snr_from_alphas_cumprod(self.alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of timesteps (len(betas))."""
        return self.betas.shape[0]

    def to(self, device=None, dtype=None) -> "NoiseSchedule":
        """Move (and/or cast) every table in place; returns self. device: a torch.device or str; dtype: a float
        dtype (the kernels take float32 and float64 tables)."""
        for name in ("betas", "alphas", "alphas_cumprod", "sigmas", "snr"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))
        return self
