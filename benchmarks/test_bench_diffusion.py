"""add_noise on a batch of latents: mmkern (auto backend) against the eager formula diffusers uses."""
import pytest
import torch

import mmkern
from conftest import DEVICE, ON_GPU

SHAPE = (64, 4, 64, 64) if ON_GPU else (8, 4, 32, 32)


@pytest.mark.parametrize("impl", ["mmkern", "torch_eager"])
def test_add_noise(bench, benchmark, impl):
    benchmark.group = f"add_noise {SHAPE}"
    x0, noise = (torch.randn(SHAPE, device=DEVICE) for _ in range(2))
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=DEVICE), 0)
    t = torch.randint(0, 1000, (SHAPE[0],), device=DEVICE)
    if impl == "mmkern":
        def fn(x0, noise, t):
            return mmkern.diffusion.add_noise(x0, noise, t, alphas_cumprod)
    else:
        def fn(x0, noise, t):   # diffusers' DDPMScheduler.add_noise
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            return a.sqrt() * x0 + (1 - a).sqrt() * noise
    bench(fn, x0, noise, t, bytes=3 * x0.numel() * x0.element_size(), shape=str(SHAPE))
