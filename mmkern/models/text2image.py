"""TinyText2Image: text encoder + DiT denoiser, trained and sampled with mmkern's diffusion ops.

Training (v-prediction by default, Salimans & Ho 2022: the target sqrt(a) noise - sqrt(1 - a) x_0 stays
well scaled at every t, so a model trained for a few minutes already gives clean samples; "epsilon"
and "sample" work too):
    t ~ U{0..T-1}, noise ~ N(0, I), x_t = mmkern.diffusion.add_noise(x_0, noise, t, a)
    loss = mmkern.diffusion.diffusion_loss(denoiser(x_t, t, text), x_0, noise, t, a, prediction_type)   (MSE)
A fraction `cond_drop` of captions is replaced by "" so the model also learns the unconditional
prediction, which classifier-free guidance (Ho & Salimans 2022) needs at sampling time.
Sampling: DDIM (eta = 0) over `steps` trailing timesteps T-1, T-1-T/steps, ..., with
    out = out("") + guidance * (out(caption) - out(""))         (out: the model's prediction)
and each step one mmkern.diffusion.ddim_step (x_0 prediction clipped to [-1, 1], the image range).
The noise schedule is mmkern.diffusion.NoiseSchedule (cosine by default: better than linear for small images).

Whether samples follow their captions' colours (`colour_accuracy`): each image's foreground (pixels with a
channel above mid-grey; the training canvases are black) is averaged to one RGB colour, classified to the nearest
of the given colours, and compared with the colour word of its caption.
"""
from __future__ import annotations

import torch
from torch import nn

import mmkern
from mmkern.diffusion import NoiseSchedule
from mmkern.models.denoiser import DiTDenoiser
from mmkern.models.text_encoder import TextEncoder
from mmkern.models.tokenizer import WordTokenizer


class TinyText2Image(nn.Module):
    def __init__(self, captions: list[str], image_size: int = 16, channels: int = 3, patch: int = 4, dim: int = 96,
                 depth: int = 3, heads: int = 4, text_dim: int = 32, text_layers: int = 2, max_text_len: int = 6,
                 num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                 prediction_type: str = "v_prediction"):
        super().__init__()
        if prediction_type not in mmkern.diffusion.PREDICTION_TYPES:
            raise ValueError(f"TinyText2Image: prediction_type must be one of {mmkern.diffusion.PREDICTION_TYPES}, "
                             f"got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.tokenizer = WordTokenizer(captions)
        self.max_text_len = max_text_len
        self.text_encoder = TextEncoder(len(self.tokenizer), max_text_len, text_dim, text_layers, heads)
        self.denoiser = DiTDenoiser(image_size, channels, patch, dim, depth, heads, text_dim)
        self.schedule = NoiseSchedule(num_train_timesteps, beta_schedule=beta_schedule)
        # the table the kernels read (float32: they compute coefficients in float32 anyway); moves with .to()
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod.float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def encode_text(self, captions: list[str]):
        ids, keep = self.tokenizer(captions, self.max_text_len)
        device = self.alphas_cumprod.device
        ids, keep = ids.to(device), keep.to(device)
        states, pooled = self.text_encoder(ids, keep)
        return states, keep, pooled

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The model's prediction (B, C, H, W) (noise, velocity or clean image, per prediction_type) for noisy
        images x_t at timesteps t (B,) under `captions`."""
        states, keep, pooled = self.encode_text(captions)
        return self.denoiser(x_t, t, states, keep, pooled)

    def loss(self, images: torch.Tensor, captions: list[str], cond_drop: float = 0.1,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion training loss on clean images (B, C, H, W) in [-1, 1]: a 0-d float32 tensor."""
        B, device = images.shape[0], images.device
        t = torch.randint(0, self.num_train_timesteps, (B,), device=device, generator=generator)
        noise = torch.randn(images.shape, device=device, dtype=images.dtype, generator=generator)
        drop = torch.rand(B, generator=generator) < cond_drop
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x_t = mmkern.diffusion.add_noise(images, noise, t, self.alphas_cumprod)
        return mmkern.diffusion.diffusion_loss(self(x_t, t, captions), images, noise, t, self.alphas_cumprod,
                                               self.prediction_type)

    def sampling_timesteps(self, steps: int) -> list[int]:
        """DDIM's trailing spacing: T-1, T-1-T/steps, ... (starts at pure noise whatever `steps`)."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"TinyText2Image.sample: steps must be in 1..{self.num_train_timesteps}, got {steps}")
        ratio = self.num_train_timesteps / steps
        return [round(self.num_train_timesteps - i * ratio) - 1 for i in range(steps)]

    @torch.no_grad()
    def sample(self, captions: list[str], steps: int = 25, guidance: float = 3.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1], one per caption, by DDIM with classifier-free guidance."""
        d = self.denoiser
        B, device = len(captions), self.alphas_cumprod.device
        x = torch.randn(B, d.channels, d.image_size, d.image_size, generator=generator).to(device)
        states, keep, pooled = self.encode_text(list(captions) + [""] * B)    # conditional | unconditional
        timesteps = self.sampling_timesteps(steps)
        for i, t in enumerate(timesteps):
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1         # -1: the end, a_prev = 1
            t_batch = torch.full((2 * B,), t, dtype=torch.int64, device=device)
            out_cond, out_uncond = d(torch.cat([x, x]), t_batch, states, keep, pooled).chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
            x, _ = mmkern.diffusion.ddim_step(out, t, x, self.alphas_cumprod, prev, final_alpha_cumprod=1.0,
                                              prediction_type=self.prediction_type, clip_sample=True,
                                              clip_sample_range=1.0)
        return x.clamp(-1, 1)


FOREGROUND = 0.5    # a pixel is foreground when one of its channels, in [0, 1], is above this (the canvas is black)


def classify_colours(images: torch.Tensor, colours: dict[str, tuple[float, float, float]]) -> list[str | None]:
    """Per image (B, 3, H, W) in [-1, 1]: the name of the colour in `colours` (RGB in [0, 1]) nearest to the mean
    of its foreground pixels, or None when no pixel is foreground (no shape drawn)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"classify_colours: images must be (batch, 3, H, W); got {tuple(images.shape)}")
    names = list(colours)
    palette = torch.tensor([colours[n] for n in names], dtype=torch.float32)              # (K, 3)
    rgb = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).flatten(2)              # (B, 3, H*W) in [0, 1]
    fg = rgb.amax(1) > FOREGROUND                                                        # (B, H*W)
    mean = (rgb * fg[:, None]).sum(-1) / fg.sum(-1, keepdim=True).clamp(min=1)           # (B, 3)
    nearest = torch.cdist(mean, palette).argmin(-1)
    return [names[k] if any_fg else None for k, any_fg in zip(nearest.tolist(), fg.any(-1).tolist())]


def caption_colour(caption: str, colours: dict[str, tuple[float, float, float]]) -> str:
    """The (first) colour word of `caption` among the keys of `colours`."""
    found = [w for w in caption.lower().split() if w in colours]
    if not found:
        raise ValueError(f"caption_colour: {caption!r} names none of the colours {list(colours)}")
    return found[0]


def colour_accuracy(images: torch.Tensor, captions: list[str],
                    colours: dict[str, tuple[float, float, float]]) -> float:
    """The fraction of images (B, 3, H, W) whose foreground colour (classify_colours) is the colour their caption
    names. Chance, for captions spread evenly over the colours, is 1 / len(colours)."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"colour_accuracy: {images.shape[0]} images but {len(captions)} captions")
    predicted = classify_colours(images, colours)
    return sum(p == caption_colour(c, colours) for p, c in zip(predicted, captions)) / max(len(captions), 1)
