"""Triton add_noise / get_velocity against the float64 oracle (interpreter on CPU, or a GPU)."""
import pytest
import torch

import mmkern
from mmkern.verify import Case
from conftest import DTYPES, assert_backend_matches_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _alphas_cumprod(T):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float().to(DEVICE)


@pytest.mark.parametrize("op", ["add_noise", "get_velocity"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1, 1), (3,), (2, 1031), (0, 4)])
@pytest.mark.parametrize("timesteps", ["per_sample", "single"])
@pytest.mark.parametrize("table", [torch.float32, torch.float64])
def test_matches_oracle(op, shape, timesteps, table):
    T = 1000
    ac = _alphas_cumprod(T).to(table)
    if timesteps == "per_sample":
        t = torch.randint(0, T, (shape[0],), device=DEVICE, dtype=torch.int32)
        if shape[0] > 1:
            t[0], t[-1] = 0, T - 1                 # both ends of the schedule
    else:
        t = torch.tensor(T - 1, device=DEVICE)
    fn = getattr(mmkern.diffusion, op)
    case = Case(op, str(shape), lambda: dict(x=torch.randn(shape, dtype=torch.float64, device=DEVICE),
                                              n=torch.randn(shape, dtype=torch.float64, device=DEVICE)),
                lambda x, n: (fn(x, n, t, ac),), cast=("x", "n"))
    assert_backend_matches_oracle("triton", case)


def test_auto_dispatch_picks_triton_and_rejects_float64():
    x = torch.randn(2, 8, device=DEVICE)
    ac = _alphas_cumprod(10)
    inputs = dict(samples=x, noise=x, timesteps=torch.tensor(3, device=DEVICE), alphas_cumprod=ac)
    assert mmkern.dispatch.select("add_noise", mmkern.dispatch.problem("add_noise", **inputs)) == "triton"
    inputs.update(samples=x.double(), noise=x.double())
    assert mmkern.dispatch.select("add_noise", mmkern.dispatch.problem("add_noise", **inputs)) == "reference"
    with mmkern.backend("triton"), pytest.raises(mmkern.NoBackendError, match="samples has dtype torch.float64"):
        mmkern.diffusion.add_noise(x.double(), x.double(), 3, ac)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_through_triton_forward(dtype):
    ac = _alphas_cumprod(50)
    x = torch.randn(3, 4, device=DEVICE, dtype=dtype, requires_grad=True)
    n = torch.randn(3, 4, device=DEVICE, dtype=dtype, requires_grad=True)
    t = torch.tensor([0, 10, 49], device=DEVICE)
    with mmkern.backend("triton"):
        out = mmkern.diffusion.get_velocity(x, n, t, ac)
    out.backward(torch.ones_like(out))
    a = ac.double()[t].view(-1, 1)
    assert torch.allclose(x.grad.double(), -(1 - a).sqrt().expand(3, 4), atol=1e-2)
    assert torch.allclose(n.grad.double(), a.sqrt().expand(3, 4), atol=1e-2)
