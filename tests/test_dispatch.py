"""Backend selection: auto priority, forcing by context and environment, and the errors when nothing fits."""
import os
import subprocess
import sys

import pytest
import torch

import mmkern
from mmkern import dispatch
from conftest import randn


def test_reference_is_always_available():
    assert "reference" in mmkern.available_backends()


def test_auto_picks_first_backend_without_reasons():
    x = randn(2, 4, dtype=torch.float32)
    problem = dispatch.problem("add_noise", samples=x, noise=x, timesteps=torch.tensor(1),
                               alphas_cumprod=torch.linspace(0.9, 0.1, 5))
    fitting = [name for name in dispatch.PRIORITY if not dispatch.not_supported_reasons("add_noise", name, problem)]
    assert fitting and fitting[-1] == "reference"
    assert dispatch.select("add_noise", problem) == fitting[0]


def test_forcing_a_backend_that_cannot_run_lists_its_reasons():
    x = randn(2, 4)
    ac = torch.linspace(0.9, 0.1, 5)
    with mmkern.backend("cuda"):
        with pytest.raises(mmkern.NoBackendError, match=r"forced backend 'cuda' cannot run it.*\n  cuda: "):
            mmkern.diffusion.add_noise(x, x, 1, ac)


def test_nothing_fits_lists_every_backend(monkeypatch):
    ref = dispatch.backends()["reference"]
    monkeypatch.setattr(ref, "kernels", {k: v for k, v in ref.kernels.items() if k != "add_noise"})
    with pytest.raises(mmkern.NoBackendError) as info:
        mmkern.diffusion.add_noise(randn(2, 4), randn(2, 4), 1, torch.linspace(0.9, 0.1, 5))
    message = str(info.value)
    for name in dispatch.PRIORITY:
        assert f"\n  {name}: " in message
    assert "reference: has no kernel for add_noise" in message


def test_backend_context_nests_and_is_reusable():
    ref = mmkern.backend("reference")
    assert dispatch.forced_backend() == "auto"
    with ref:
        assert dispatch.forced_backend() == "reference"
        with mmkern.backend("auto"):
            assert dispatch.forced_backend() == "auto"
        with ref:
            assert dispatch.forced_backend() == "reference"
        assert dispatch.forced_backend() == "reference"
    assert dispatch.forced_backend() == "auto"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*known backends: auto, cuda, triton, cpu, torch, reference"):
        mmkern.backend("fast")


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("MMKERN_BACKEND", "cuda")
    with pytest.raises(mmkern.NoBackendError, match="forced backend 'cuda'"):
        mmkern.diffusion.add_noise(randn(2, 4), randn(2, 4), 1, torch.linspace(0.9, 0.1, 5))
    with mmkern.backend("reference"):      # an explicit block wins over the environment
        mmkern.diffusion.add_noise(randn(2, 4), randn(2, 4), 1, torch.linspace(0.9, 0.1, 5))


def test_triton_backend_accepts_cpu_tensors_only_under_the_interpreter():
    code = ("import torch, mmkern; from mmkern import dispatch; b = dispatch.backends()['triton'];"
            "print(b.device_reason(torch.device('cpu')))")
    for interpret, expected in (("1", "None"), ("0", "interpreter")):
        env = dict(os.environ, TRITON_INTERPRET=interpret)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert expected in out.stdout
