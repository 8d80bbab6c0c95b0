"""The eager fast path (mmkern/ops/_eager.py): public functions skip the torch.library custom-op layers exactly
when those have nothing to do, and give the same results either way."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmkern
from mmkern.ops import _eager as eager
from mmkern.ops import diffusion as diffusion_ops


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_plain_tensors_take_the_fast_path():
    x = torch.randn(3)
    assert eager.plain_eager((x, [x, x], 1.0, None, "s"))
    assert eager.plain_eager((torch.nn.Parameter(torch.randn(3)),)) is False       # requires grad
    with torch.no_grad():
        assert eager.plain_eager((torch.nn.Parameter(torch.randn(3)),))


@pytest.mark.parametrize("case", ["requires_grad", "meta", "subclass", "dispatch_mode", "profiler", "vmap",
                                  "functional"])
def test_anything_the_op_layers_handle_takes_the_op(case):
    x = torch.randn(3)
    if case == "requires_grad":
        assert not eager.plain_eager((x, torch.randn(3, requires_grad=True)))
    elif case == "meta":
        assert not eager.plain_eager((torch.empty(3, device="meta"),))
    elif case == "subclass":
        assert not eager.plain_eager((x.as_subclass(_Subclass),))
    elif case == "dispatch_mode":
        with _Passthrough():
            assert not eager.plain_eager((x,))
    elif case == "profiler":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            assert not eager.plain_eager((x,))
    elif case == "vmap":
        seen = []
        torch.func.vmap(lambda row: seen.append(eager.plain_eager((row,))) or row)(torch.randn(2, 3))
        assert seen == [False]
    elif case == "functional":
        assert not eager.plain_eager((torch._to_functional_tensor(x),))


def _custom_op_calls(monkeypatch):
    """A list that grows by one for every call of a CustomOpDef (the op path)."""
    calls = []
    cls = type(diffusion_ops.add_noise)
    real = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    return calls


def test_eager_calls_skip_the_op_and_autograd_calls_take_it(monkeypatch):
    calls = _custom_op_calls(monkeypatch)
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ac = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    mmkern.diffusion.add_noise(x0, noise, torch.tensor([1, 7]), ac)
    assert calls == []
    x0.requires_grad_()
    out = mmkern.diffusion.add_noise(x0, noise, torch.tensor([1, 7]), ac)
    assert len(calls) == 1
    out.sum().backward()
    assert x0.grad is not None


def _cases():
    ac = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)
    x, mo, n = (torch.randn(3, 4, 5, 6) for _ in range(3))
    t = torch.tensor([3, 20, 49])
    q, k, v = (torch.randn(2, 7, 3, 16) for _ in range(3))
    k_cache, v_cache = torch.zeros(2, 12, 3, 16), torch.zeros(2, 12, 3, 16)
    h = torch.randn(2, 5, 32)
    return {
        "add_noise": lambda: mmkern.diffusion.add_noise(x, n, t, ac),
        "get_velocity": lambda: mmkern.diffusion.get_velocity(x, n, t, ac),
        "ddpm_step": lambda: mmkern.diffusion.ddpm_step(mo, t, x, ac, noise=n, clip_sample=True),
        "ddim_step": lambda: mmkern.diffusion.ddim_step(mo, t, x, ac, t - 2, eta=0.5, noise=n),
        "euler_step": lambda: mmkern.diffusion.euler_step(mo, torch.tensor([0, 3, 5]), x,
                                                          torch.linspace(14.0, 0.0, 11)),
        "diffusion_loss": lambda: mmkern.diffusion.diffusion_loss(mo, x, n, t, ac, "v_prediction", snr_gamma=5.0),
        "layer_norm_residual": lambda: mmkern.layer_norm_residual(h, h.flip(0), torch.randn(32), torch.randn(32),
                                                                   prenorm=True),
        "flash_attn_func": lambda: mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True),
        "flash_attn_with_kvcache": lambda: (mmkern.flash_attn_with_kvcache(
            q[:, :1], k_cache, v_cache, k=k[:, :1], v=v[:, :1], cache_seqlens=torch.tensor([3, 0], dtype=torch.int32)),
            k_cache.clone(), v_cache.clone()),
    }


def _tensors(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in _tensors(item)]


@pytest.mark.parametrize("name", list(_cases()))
def test_the_fast_path_gives_the_op_paths_results(name, monkeypatch):
    torch.manual_seed(0)
    fast = _cases()[name]()
    monkeypatch.setattr(eager, "plain_eager", lambda args: False)
    torch.manual_seed(0)
    through_op = _cases()[name]()
    for a, b in zip(_tensors(fast), _tensors(through_op), strict=True):
        assert torch.equal(a, b), name
