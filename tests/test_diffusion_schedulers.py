"""The drop-in schedulers against diffusers' own, over whole set_timesteps loops with a fixed generator.

A deterministic stand-in "model" (a smooth function of the sample and the timestep) drives both
loops; each loop feeds its own samples forward, and the two must agree within float32 rounding at
every step. Runs on the auto backend: Triton (through the interpreter on a CPU) where it can.
Skipped cleanly where diffusers is not installed (the GPU machine); CI installs it (.[test,models]).
"""
import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import mmkern  # noqa: E402
from conftest import forced  # noqa: E402

SHAPE = (2, 3, 4, 4)
STEPS = 6
TOL = dict(rtol=2e-4, atol=2e-4)


def model(sample, t, channels_out=None, variance_type=None):
    """A smooth stand-in denoiser; with a learned variance, a second half of channels."""
    t = torch.as_tensor(t, dtype=torch.float32)
    out = 0.7 * torch.tanh(sample) + 0.2 * torch.cos(t / 150.0) * sample.flip(-1)
    if variance_type == "learned":          # a variance: positive
        return torch.cat([out, 0.01 * torch.sigmoid(sample)], 1)
    if variance_type == "learned_range":    # a fraction in [-1, 1]
        return torch.cat([out, torch.tanh(0.5 * sample)], 1)
    return out


# The drop-ins' loops run on Triton (its interpreter on a CPU), forced: no fallback to another backend, and
# conftest.forced fails the test if no op ran on Triton. These loops run on CPU tensors, which Triton takes only
# through its interpreter: on a GPU machine (where the diffusers wheel is carried in) forced skips them with
# Triton's reasons instead of failing.
BACKEND = "triton"


def run_loop(scheduler, latents, seed, step_kwargs=None, variance_type=None, euler=False):
    if type(scheduler).__module__.startswith("mmkern"):
        with forced(BACKEND):
            return _run_loop(scheduler, latents, seed, step_kwargs, variance_type, euler)
    return _run_loop(scheduler, latents, seed, step_kwargs, variance_type, euler)


def _run_loop(scheduler, latents, seed, step_kwargs, variance_type, euler):
    generator = torch.Generator().manual_seed(seed)
    sample, trace = latents.clone(), []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t) if euler else sample
        mo = model(model_input, t, variance_type=variance_type)
        out = scheduler.step(mo, t, sample, generator=generator, **(step_kwargs or {}))
        sample = out.prev_sample
        trace.append((sample, out.pred_original_sample))
    return trace


def assert_same_trace(ours, theirs):
    assert len(ours) == len(theirs)
    for i, ((s, x0), (s_ref, x0_ref)) in enumerate(zip(ours, theirs)):
        scale = 1.0 + s_ref.abs().max().item()
        torch.testing.assert_close(s, s_ref, rtol=TOL["rtol"], atol=TOL["atol"] * scale,
                                   msg=lambda m: f"step {i}: prev_sample: {m}")
        scale = 1.0 + x0_ref.abs().max().item()
        torch.testing.assert_close(x0.to(x0_ref.dtype), x0_ref, rtol=TOL["rtol"], atol=TOL["atol"] * scale,
                                   msg=lambda m: f"step {i}: pred_original_sample: {m}")


def _pair(name, config, steps=STEPS):
    theirs = getattr(diffusers, name)(**config)
    ours = getattr(mmkern.diffusion, name).from_config(theirs.config)
    assert isinstance(ours, getattr(diffusers, name)) and type(ours) is not type(theirs)
    for s in (theirs, ours):
        s.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    return ours, theirs


CLIPPING = {"none": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
            "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)}
SCHEDULE = {"linear": dict(), "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            "zero_snr_cosine": dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)}


def _valid(prediction_type, schedule):
    # zero terminal SNR makes a_T = 0: epsilon and sample predictions are singular there (diffusers
    # gives inf/NaN as well); the paper pairs it with v_prediction
    return schedule != "zero_snr_cosine" or prediction_type == "v_prediction"


DDPM_VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]


@pytest.mark.parametrize("prediction_type,variance_type,clipping,spacing,schedule", [
    c for c in itertools.product(["epsilon", "v_prediction", "sample"], DDPM_VARIANCES, list(CLIPPING),
                                 ["leading", "trailing", "linspace"], list(SCHEDULE)) if _valid(c[0], c[4])])
def test_ddpm_loop_matches_diffusers(prediction_type, variance_type, clipping, spacing, schedule):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, timestep_spacing=spacing,
                  **CLIPPING[clipping], **SCHEDULE[schedule])
    ours, theirs = _pair("DDPMScheduler", config)
    latents = torch.randn(SHAPE)
    assert_same_trace(run_loop(ours, latents, 7, variance_type=variance_type),
                      run_loop(theirs, latents, 7, variance_type=variance_type))


def test_ddpm_fixed_large_log_is_finite_where_diffusers_is_nan():
    """diffusers takes (log beta) ** 0.5 (NaN); mmkern adds exp(0.5 log beta) = sqrt(beta) noise: fixed_large."""
    ours, theirs = _pair("DDPMScheduler", dict(variance_type="fixed_large_log"))
    large, _ = _pair("DDPMScheduler", dict(variance_type="fixed_large"))
    latents = torch.randn(SHAPE)
    assert torch.isnan(run_loop(theirs, latents, 3)[0][0]).all()
    for (a, _), (b, _) in zip(run_loop(ours, latents, 3), run_loop(large, latents, 3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type,eta,clipping,spacing,schedule,clipped_eps", [
    c for c in itertools.product(["epsilon", "v_prediction", "sample"], [0.0, 0.5, 1.0], list(CLIPPING),
                                 ["leading", "trailing", "linspace"], list(SCHEDULE), [False, True])
    if _valid(c[0], c[4]) and (c[5] is False or c[2] != "none")])
def test_ddim_loop_matches_diffusers(prediction_type, eta, clipping, spacing, schedule, clipped_eps):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, **CLIPPING[clipping],
                  **SCHEDULE[schedule], set_alpha_to_one=schedule != "scaled_linear", steps_offset=1 if
                  spacing == "leading" else 0)
    ours, theirs = _pair("DDIMScheduler", config)
    latents = torch.randn(SHAPE)
    kwargs = dict(eta=eta, use_clipped_model_output=clipped_eps)
    assert_same_trace(run_loop(ours, latents, 11, kwargs), run_loop(theirs, latents, 11, kwargs))


def test_ddim_given_variance_noise():
    ours, theirs = _pair("DDIMScheduler", dict(clip_sample=False))
    sample, mo, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[1]
    a = ours.step(mo, t, sample, eta=0.8, variance_noise=noise)
    b = theirs.step(mo, t, sample, eta=0.8, variance_noise=noise)
    torch.testing.assert_close(a.prev_sample, b.prev_sample, **TOL)


@pytest.mark.parametrize("prediction_type,spacing,schedule,churn", [
    c for c in itertools.product(["epsilon", "v_prediction", "sample"], ["leading", "trailing", "linspace"],
                                 list(SCHEDULE), ["none", "all", "window"])
    if _valid(c[0], c[2])])
def test_euler_loop_matches_diffusers(prediction_type, spacing, schedule, churn):
    if prediction_type == "sample":
        prediction_type = "original_sample" if schedule == "linear" else "sample"
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, **SCHEDULE[schedule])
    ours, theirs = _pair("EulerDiscreteScheduler", config)
    latents = torch.randn(SHAPE) * ours.init_noise_sigma
    kwargs = {"none": {}, "all": dict(s_churn=2.0, s_noise=1.003),
              "window": dict(s_churn=2.0, s_tmin=0.5, s_tmax=5.0)}[churn]
    assert_same_trace(run_loop(ours, latents, 5, kwargs, euler=True), run_loop(theirs, latents, 5, kwargs, euler=True))


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_add_noise_and_velocity_match_diffusers(name):
    ours, theirs = _pair(name, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    x0, noise, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([0, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_per_sample_timesteps_equal_single_calls(name):
    """step with a (B,) timestep tensor = one single-timestep step per sample."""
    ours, _ = _pair(name, dict(clip_sample=False) if name != "EulerDiscreteScheduler" else {})
    sample, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[torch.tensor([1, 4])]
    kwargs = dict(eta=0.0) if name == "DDIMScheduler" else {}
    batched = ours.step(mo, t, sample, generator=torch.Generator().manual_seed(0), **kwargs)
    for b in range(2):
        single, _ = _pair(name, dict(clip_sample=False) if name != "EulerDiscreteScheduler" else {})
        one = single.step(mo[b:b + 1], t[b], sample[b:b + 1], **kwargs)
        torch.testing.assert_close(batched.pred_original_sample[b:b + 1], one.pred_original_sample, rtol=1e-6,
                                   atol=1e-6)
        if name != "DDPMScheduler":   # DDPM's noise is drawn for the whole batch: only x0 can be compared
            torch.testing.assert_close(batched.prev_sample[b:b + 1], one.prev_sample, rtol=1e-6, atol=1e-6)


def test_from_pipeline_config_swap():
    """The README's three lines: swap a pipeline's scheduler by config."""
    original = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    swapped = mmkern.diffusion.EulerDiscreteScheduler.from_config(original.config)
    assert isinstance(swapped, diffusers.EulerDiscreteScheduler)
    assert swapped.config.beta_schedule == "scaled_linear"


def test_ddpm_custom_timesteps_loop_matches_diffusers():
    theirs = diffusers.DDPMScheduler(clip_sample=False)
    ours = mmkern.diffusion.DDPMScheduler.from_config(theirs.config)
    for s in (theirs, ours):
        s.set_timesteps(timesteps=[999, 800, 650, 300, 120, 7, 0])
    latents = torch.randn(SHAPE)
    assert_same_trace(run_loop(ours, latents, 2), run_loop(theirs, latents, 2))


@pytest.mark.parametrize("sigmas", ["karras", "log_linear", "sigma_min_final"])
def test_euler_sigma_options_loop_matches_diffusers(sigmas):
    config = {"karras": dict(use_karras_sigmas=True), "log_linear": dict(interpolation_type="log_linear"),
              "sigma_min_final": dict(final_sigmas_type="sigma_min")}[sigmas]
    ours, theirs = _pair("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012, **config))
    latents = torch.randn(SHAPE) * ours.init_noise_sigma
    kwargs = dict(s_churn=1.0)
    assert_same_trace(run_loop(ours, latents, 4, kwargs, euler=True), run_loop(theirs, latents, 4, kwargs, euler=True))


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_half_model_output_with_float32_latents(name):
    """Pipelines may step float32 latents with a float16 model output: same results as diffusers' promotion."""
    ours, theirs = _pair(name, {})
    sample, mo = torch.randn(SHAPE), torch.randn(SHAPE).half()
    t = ours.timesteps[2]
    a, b = ours.step(mo, t, sample), theirs.step(mo, t, sample)
    assert a.prev_sample.dtype == b.prev_sample.dtype
    torch.testing.assert_close(a.prev_sample.float(), b.prev_sample.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("begin", [None, 0, 3])
def test_euler_add_noise_matches_diffusers(begin):
    ours, theirs = _pair("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012))
    for s in (ours, theirs):
        if begin is not None:
            s.set_begin_index(begin)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[torch.tensor([0, 5])]
    with forced(BACKEND):
        got = ours.add_noise(x0, noise, t)
    torch.testing.assert_close(got, theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
