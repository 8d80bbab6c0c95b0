"""The reference noise-schedule ops against the formulas written out by hand (diffusers' DDPMScheduler)."""
import pytest
import torch

import mmkern
from conftest import DTYPES, max_abs_err, randn

ref = mmkern.backend("reference")


def linear_alphas_cumprod(T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def by_hand(x0, noise, t, ac, kind):
    out = torch.empty_like(x0, dtype=torch.float64)
    for b in range(x0.shape[0]):
        a = ac.double()[t[b] if t.dim() else t]
        if kind == "add_noise":
            out[b] = a.sqrt() * x0[b].double() + (1 - a).sqrt() * noise[b].double()
        else:
            out[b] = a.sqrt() * noise[b].double() - (1 - a).sqrt() * x0[b].double()
    return out


@pytest.mark.parametrize("kind", ["add_noise", "get_velocity"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 7), (1, 1), (3,)])
@pytest.mark.parametrize("per_sample", [True, False])
def test_matches_formula_and_gradient(kind, shape, per_sample):
    ac = linear_alphas_cumprod()
    x0, noise = randn(*shape, requires_grad=True), randn(*shape, requires_grad=True)
    if per_sample:
        t = torch.randint(0, 1000, (shape[0],))
        t[0] = 0                               # the first step of the schedule ...
    else:
        t = torch.tensor(999)                  # ... and the last
    fn = getattr(mmkern.diffusion, kind)
    with ref:
        out = fn(x0, noise, t, ac)
    want = by_hand(x0, noise, t, ac, kind)
    assert out.shape == x0.shape and max_abs_err(out, want) < 1e-12
    g = randn(*shape)
    for got, exp in zip(torch.autograd.grad(out, (x0, noise), g), torch.autograd.grad(want, (x0, noise), g)):
        assert max_abs_err(got, exp) < 1e-6          # the backward's coefficients are float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_python_int_timestep(dtype):
    ac = linear_alphas_cumprod(50)
    x0, noise = randn(2, 8).to(dtype), randn(2, 8).to(dtype)
    with ref:
        out = mmkern.diffusion.add_noise(x0, noise, 17, ac)
    want = by_hand(x0, noise, torch.tensor(17), ac, "add_noise")
    assert out.dtype == dtype
    assert max_abs_err(out, want) <= max_abs_err(want.to(dtype), want) + 1e-12


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target(prediction_type):
    ac = linear_alphas_cumprod()
    x0, noise, t = randn(3, 4), randn(3, 4), torch.tensor([0, 500, 999])
    with ref:
        target = mmkern.diffusion.training_target(x0, noise, t, ac, prediction_type)
    want = {"epsilon": noise, "sample": x0, "v_prediction": by_hand(x0, noise, t, ac, "velocity")}[prediction_type]
    assert max_abs_err(target, want) < 1e-12


def test_empty_batch():
    ac = linear_alphas_cumprod(10)
    with ref:
        out = mmkern.diffusion.add_noise(randn(0, 3), randn(0, 3), torch.zeros(0, dtype=torch.long), ac)
    assert out.shape == (0, 3)
