"""The per-signature memo (dispatch.call_memoized): a repeated call skips the metadata checks and the ranking of
the backends, and nothing that decides either can change without the memo noticing."""
import pytest
import torch

import mmkern
from mmkern import dispatch
from mmkern.ops import diffusion_problem
from conftest import randn

AC = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)


def _add_noise(x, t):
    return torch.ops.mmkern.add_noise(x, torch.ones_like(x), t, AC)


def _norm(x, eps=1e-5):
    """norm_residual_forward, the op itself (the public functions check eps before it)."""
    return torch.ops.mmkern.norm_residual_forward(x, None, None, None, eps, 0.0, None, False, True)


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_repeated_signature_is_checked_and_ranked_once(monkeypatch):
    checks = _counting(monkeypatch, diffusion_problem, "check_schedule_inputs")
    selections = _counting(monkeypatch, dispatch, "select")
    x, t = randn(3, 5, dtype=torch.float32), torch.tensor([0, 4, 9])
    with mmkern.dispatch_log() as log:
        outs = [_add_noise(x, t) for _ in range(4)]
    assert len(checks) == 1 and len(selections) == 1
    assert len(log.calls) == 4 and len(set(log.calls)) == 1, "every memoized call is logged, on one backend"
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    _add_noise(randn(3, 6, dtype=torch.float32), t)        # another shape: another signature
    assert len(checks) == 2 and len(selections) == 2


def test_a_new_signature_is_validated_after_a_good_one():
    x, t = randn(3, 5, dtype=torch.float32), torch.tensor([0, 4, 9])
    _add_noise(x, t)
    with pytest.raises(ValueError, match="timesteps"):
        _add_noise(x, torch.tensor([0, 4]))                  # two timesteps for three samples
    with pytest.raises(ValueError, match="timesteps"):
        _add_noise(x, t.float())                             # float timesteps
    _norm(randn(4, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="eps"):
        _norm(randn(4, 8, dtype=torch.float32), eps=-1.0)   # same tensors, another value of an argument


def test_value_checks_run_on_every_call():
    x = randn(3, 5, dtype=torch.float32)
    _add_noise(x, torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="timesteps"):
        _add_noise(x, torch.tensor([0, 4, 10]))              # the same signature, a timestep past the table


def test_a_forced_backend_is_part_of_the_signature(monkeypatch):
    x, t = randn(3, 5, dtype=torch.float32), torch.tensor([0, 4, 9])
    with mmkern.dispatch_log() as log:
        _add_noise(x, t)
        with mmkern.backend("reference"):
            _add_noise(x, t)
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        _add_noise(x, t)
        monkeypatch.delenv(dispatch.ENV_VAR)
        _add_noise(x, t)
    auto = dispatch.select("add_noise", dispatch.problem("add_noise", samples=x, noise=x, timesteps=t,
                                                         alphas_cumprod=AC))
    assert [name for _, name in log.calls] == [auto, "reference", "reference", auto]


def test_the_signature_holds_what_the_checks_and_reasons_read():
    x = randn(4, 6, dtype=torch.float32)
    key = dispatch._signature("add_noise", (x, 1.0), {})
    assert key == dispatch._signature("add_noise", (randn(4, 6, dtype=torch.float32), 1.0), {})
    others = [(x.t().contiguous().t(), 1.0),                   # strides
              (x.requires_grad_(False).clone().requires_grad_(), 1.0),
              (x.double(), 1.0), (x[:3], 1.0), (x, 2.0),
              (x, 1)]                                           # 1 == 1.0 as a key, but another type
    for args in others:
        assert dispatch._signature("add_noise", args, {}) != key, args
    assert dispatch._signature("add_noise", (x, 1.0), {"read_values": True}) != key
    assert dispatch._signature("norm_residual_forward", (x, 1.0), {}) != key


def test_tensor_subclasses_and_unhashable_arguments_are_not_memoized():
    class Sub(torch.Tensor):
        pass
    x = randn(4, 6, dtype=torch.float32)
    assert dispatch._signature("add_noise", (x.as_subclass(Sub),), {}) is None

    def build(op, samples, noise, timesteps, alphas_cumprod, unhashable, validate=True):
        return diffusion_problem.build_noise_mix(op, samples, noise, timesteps, alphas_cumprod, validate=validate)
    out = dispatch.call_memoized("add_noise", build, "add_noise", x, torch.ones_like(x), torch.tensor(3), AC, [1, 2])
    torch.testing.assert_close(out, _add_noise(x, torch.tensor(3)))
    assert len(dispatch._SELECTED) == 1, "only the second call, without the list, is memoized"


def test_the_memo_forgets_on_registration_environment_and_limit(monkeypatch):
    x = randn(2, 3, dtype=torch.float32)
    _add_noise(x, torch.tensor([1, 2]))
    assert dispatch._SELECTED
    dispatch.forget_environment()
    assert not dispatch._SELECTED
    _add_noise(x, torch.tensor([1, 2]))
    ref = dispatch.backends()["reference"]
    monkeypatch.setattr(ref, "kernels", dict(ref.kernels))
    dispatch.register_kernel("add_noise", "reference", ref.kernels["add_noise"].run)
    assert not dispatch._SELECTED
    monkeypatch.setattr(dispatch, "MEMO_LIMIT", 2)
    for n in range(1, 6):
        _add_noise(randn(n, 3, dtype=torch.float32), torch.zeros(n, dtype=torch.long))
        assert 1 <= len(dispatch._SELECTED) <= 2


def test_a_memoized_backend_whose_kernel_is_gone_is_ranked_again(monkeypatch):
    x, t = randn(3, 5, dtype=torch.float32), torch.tensor([0, 4, 9])
    with mmkern.backend("reference"):
        _add_noise(x, t)
        ref = dispatch.backends()["reference"]
        monkeypatch.setattr(ref, "kernels", {k: v for k, v in ref.kernels.items() if k != "add_noise"})
        with pytest.raises(mmkern.NoBackendError, match="reference"):
            _add_noise(x, t)
