"""The reference backend's dropout masks.

Drawn on the CPU from an integer seed with torch's own generator, so a mask depends only on
(seed, shape, p), is the same on every device, and the backward can regenerate the forward's
mask. Other backends draw their own masks (counter-based, in the kernel) and expose them for tests.
"""
import torch


def dropout_keep_mask(seed: int, shape: tuple[int, ...], dropout_p: float, device) -> torch.Tensor:
    """Bool tensor of `shape`, True where the element is kept (probability 1 - dropout_p)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.rand(shape, generator=generator, dtype=torch.float32) >= dropout_p).to(device)


def seed_value(dropout_seed: torch.Tensor) -> int:
    """The int inside the (1,) int64 seed tensor that the public functions draw."""
    return int(dropout_seed.reshape(-1)[0])
