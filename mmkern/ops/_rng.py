"""Dropout seeds.

Ops never draw random numbers themselves: the public function draws a seed from torch's default
CPU generator (so `torch.manual_seed` makes dropout reproducible) and passes it to the op as a
(1,) int64 CPU tensor. The op is then a pure function of its inputs (opcheck, torch.compile), and
the backward regenerates the forward's mask from the same seed instead of storing it.
"""
import torch

_SEED_RANGE = 2**62


def draw_seed() -> torch.Tensor:
    return torch.randint(0, _SEED_RANGE, (1,), dtype=torch.int64, device="cpu")
