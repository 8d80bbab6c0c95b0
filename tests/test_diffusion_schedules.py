"""Schedule tables (float64) against diffusers' own (float32) for every schedule and option."""
import pytest
import torch

from mmkern.diffusion import schedules

CONFIGS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "sigmoid": dict(beta_schedule="sigmoid", beta_start=0.0001, beta_end=0.02),
    "trained_betas": dict(trained_betas=torch.linspace(0.001, 0.03, 50).tolist(), num_train_timesteps=50),
}


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol=2e-4, atol=1e-6):
    assert ours.dtype == torch.float64 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tables_equal_diffusers(name, zero_snr):
    diffusers = pytest.importorskip("diffusers")
    config = dict(CONFIGS[name], rescale_betas_zero_snr=zero_snr)
    theirs = diffusers.DDPMScheduler(**config)          # the only diffusers scheduler with every schedule
    ours = schedules.NoiseSchedule(**config)
    _close(ours.betas, theirs.betas)
    _close(ours.alphas_cumprod, theirs.alphas_cumprod)
    if zero_snr:
        assert ours.alphas_cumprod[-1] == 0 and ours.snr[-1] == 0
    else:
        # the Euler scheduler's sigma table is ours flipped, with a 0 appended
        if name != "sigmoid":
            euler = diffusers.EulerDiscreteScheduler(**config)
            # sigma ~ a^-1/2 where a_t is tiny (cosine: 1e-8): diffusers' float32 cumprod is off by ~1e-3 there
            _close(ours.sigmas.flip(0), euler.sigmas[:-1], rtol=1e-3)
        _close(ours.snr, theirs.alphas_cumprod.double() / (1 - theirs.alphas_cumprod.double()), rtol=2e-3)


def test_formulas_by_hand():
    s = schedules.NoiseSchedule(num_train_timesteps=10, beta_start=0.1, beta_end=0.5)
    b = torch.linspace(0.1, 0.5, 10, dtype=torch.float64)
    assert torch.equal(s.betas, b)
    assert torch.allclose(s.alphas_cumprod, torch.tensor([(1 - b[: i + 1]).prod() for i in range(10)],
                                                         dtype=torch.float64), rtol=1e-14)
    assert torch.allclose(s.sigmas ** 2 * s.snr, torch.ones(10, dtype=torch.float64), rtol=1e-12)
    z = schedules.NoiseSchedule(num_train_timesteps=10, beta_start=0.1, beta_end=0.5, rescale_betas_zero_snr=True)
    assert torch.allclose(z.alphas_cumprod[0], s.alphas_cumprod[0]) and z.alphas_cumprod[-1] == 0


def test_bad_schedule():
    with pytest.raises(ValueError, match="beta_schedule must be one of linear, scaled_linear"):
        schedules.make_betas(beta_schedule="quadratic")


def test_mmkern_works_without_diffusers():
    """diffusers is optional: without it the tables and functional ops work and the drop-ins say what to install."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import torch, mmkern\n"
            "s = mmkern.diffusion.NoiseSchedule(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)\n"
            "x = torch.randn(2, 3, dtype=torch.float64)\n"
            "with mmkern.backend('reference'):\n"
            "    mmkern.diffusion.add_noise(x, x, torch.tensor([0, 999]), s.alphas_cumprod)\n"
            "    mmkern.diffusion.ddim_step(x, 999, x, s.alphas_cumprod, 979)\n"
            "try:\n"
            "    mmkern.diffusion.DDIMScheduler\n"
            "except ImportError as e:\n"
            "    assert 'pip install diffusers' in str(e), e\n"
            "    print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
