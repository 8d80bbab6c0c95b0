"""Property-based parity of the diffusion ops: hypothesis draws schedules, timesteps (0 and T - 1
always among the candidates), sample shapes (batch 1, empty trailing dims), prediction types and
sampler options; every usable backend is compared with the float64 oracle (flash-attn's criterion,
see tests/fuzz_profiles.py for profiles, seed and the printed counts).
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import mmkern
import fuzz_profiles as fz
from fuzz_profiles import fuzz
from mmkern import verify
from mmkern.diffusion import NoiseSchedule

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
# Plain inputs (fp32, (2, 3)): the schema arguments of a plain call of each op, whose problem record the
# backends' not_supported_reasons see, for every_backend_checks
_x = torch.zeros(2, 3, device=fz.DEVICE)
_t = torch.zeros(2, dtype=torch.long, device=fz.DEVICE)
_table = torch.full((10,), 0.5, device=fz.DEVICE)
TYPICAL_LOSS = dict(model_output=_x, original_samples=_x, noise=_x, timesteps=_t, alphas_cumprod=_table,
                    prediction_type="epsilon", snr_gamma=0.0)
TYPICAL_DDPM = dict(model_output=_x, sample=_x, timesteps=_t, prev_timesteps=_t - 1, alphas_cumprod=_table, noise=None,
                    prediction_type="epsilon", variance_type="fixed_small", clip_sample_range=0.0,
                    dynamic_thresholding_ratio=0.0, sample_max_value=1.0)
TYPICAL_EULER = dict(model_output=_x, sample=_x, step_index=_t, sigmas=_table, noise=None, prediction_type="epsilon",
                     gamma=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)


@pytest.fixture(autouse=True, scope="module")
def _summary(pytestconfig):
    fz.register_summary(pytestconfig)


@st.composite
def schedules(draw):
    """A float32 alphas_cumprod table (as diffusers trains with), T 2..1000, zero terminal SNR sometimes."""
    T = draw(st.sampled_from([2, 10, 1000]))
    kind = draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]))
    zero_snr = draw(st.booleans()) if kind != "squaredcos_cap_v2" else False
    s = NoiseSchedule(T, beta_start=0.00085, beta_end=0.012, beta_schedule=kind, rescale_betas_zero_snr=zero_snr)
    return s.alphas_cumprod.float().to(fz.DEVICE), f"{kind} T{T}{' zero-snr' if zero_snr else ''}"


@st.composite
def samples(draw):
    B = draw(st.integers(1, 4))
    trailing = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    return (B, *trailing)


def timesteps(T, B):
    return st.lists(st.one_of(st.sampled_from([0, T - 1]), st.integers(0, T - 1)), min_size=B, max_size=B)


def _randn(shape):
    return torch.randn(shape, dtype=torch.float64, device=fz.DEVICE)


def _check_all(test, case, op, reasons_inputs, dtype):
    checked = 0
    for backend in fz.backends():
        if not fz.takes(backend, op, fz.DEVICE, reasons_inputs):
            fz.COUNTS[(test, f"not taken[{backend}]")] += 1
            continue
        fz.check(test, case, backend, dtype)
        checked += 1
    assert checked, "no backend checked this example"


@fz.every_backend_checks(["add_noise / get_velocity / diffusion_loss"], ("diffusion_loss", "add_noise"), TYPICAL_LOSS)
@fuzz(ci=12, gpu=150)
@given(data=st.data(), dtype=DTYPES, schedule=schedules(), shape=samples())
def test_noise_mix_and_loss_match_oracle(data, dtype, schedule, shape):
    """add_noise, get_velocity and the (Min-SNR) loss with its gradient."""
    test = "add_noise / get_velocity / diffusion_loss"
    with fz.counted(test):
        ac, name = schedule
        T, B = ac.shape[0], shape[0]
        t = torch.tensor(data.draw(timesteps(T, B), "timesteps"), device=fz.DEVICE)
        if data.draw(st.booleans(), "one timestep for the batch"):
            t = t[0]
        prediction = data.draw(st.sampled_from(PREDICTIONS), "prediction_type")
        snr_gamma = data.draw(st.sampled_from([None, 5.0]), "snr_gamma")
        layout = data.draw(st.sampled_from(fz.LAYOUTS), "layout")
        inputs = dict(mo=_randn(shape), x0=_randn(shape), noise=_randn(shape))

        def run(mo, x0, noise):
            x0, noise = fz.as_layout(x0, layout), fz.as_layout(noise, layout)
            return (mmkern.diffusion.diffusion_loss(mo, x0, noise, t, ac, prediction, snr_gamma),
                    mmkern.diffusion.add_noise(x0, noise, t, ac), mmkern.diffusion.get_velocity(x0, noise, t, ac))

        description = f"{name} {shape} t {t.tolist()} {prediction} snr_gamma {snr_gamma} {layout}"
        case = verify.Case(test, description, lambda: inputs, run, cast=("mo", "x0", "noise"), grad=("mo",),
                           outputs=("loss", "add_noise", "get_velocity"))
        x = inputs["x0"].to(dtype)
        for op, reasons in (("diffusion_loss", dict(model_output=x, original_samples=x, noise=x, timesteps=t,
                                                    alphas_cumprod=ac, prediction_type=prediction,
                                                    snr_gamma=snr_gamma or 0.0)),):
            _check_all(test, case, op, reasons, dtype)


@fz.every_backend_checks(["ddpm_step", "ddim_step"], ("ddpm_step", "ddim_step"), TYPICAL_DDPM)
@fuzz(ci=12, gpu=150)
@given(data=st.data(), dtype=DTYPES, schedule=schedules(), shape=samples(),
       sampler=st.sampled_from(["ddpm", "ddim"]))
def test_ddpm_ddim_steps_match_oracle(data, dtype, schedule, shape, sampler):
    test = f"{sampler}_step"
    with fz.counted(test):
        ac, name = schedule
        T, B = ac.shape[0], shape[0]
        t = torch.tensor(data.draw(timesteps(T, B), "timesteps"), device=fz.DEVICE)
        prev = t - data.draw(st.integers(1, max(T // 2, 1)), "stride")      # < 0 at the end of the chain
        prediction = data.draw(st.sampled_from(PREDICTIONS), "prediction_type")
        clip = data.draw(st.booleans(), "clip_sample")
        thresholding = data.draw(st.booleans(), "thresholding")
        use_noise = data.draw(st.booleans(), "noise")
        kw = dict(prediction_type=prediction, clip_sample=clip, thresholding=thresholding,
                  dynamic_thresholding_ratio=0.9, sample_max_value=data.draw(st.sampled_from([1.0, 3.0]), "max"))
        mo_shape = shape
        if sampler == "ddpm":
            variance = data.draw(st.sampled_from(["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                                  "learned", "learned_range"]), "variance_type")
            kw["variance_type"] = variance
            if variance.startswith("learned"):
                # C >= 1: with C = 0 the op's check rejects (B, 0) for (B, 2C) (reported, see test_errors_table)
                if len(shape) < 2 or shape[1] == 0:
                    shape = (shape[0], 1, *shape[2:])
                mo_shape = (shape[0], 2 * shape[1], *shape[2:])
        else:
            kw["eta"] = data.draw(st.sampled_from([0.0, 0.5, 1.0]), "eta") if use_noise else 0.0
            kw["use_clipped_model_output"] = data.draw(st.booleans(), "use_clipped_model_output")
        inputs = dict(mo=_randn(mo_shape), sample=_randn(shape), noise=_randn(shape))

        def run(mo, sample, noise):
            if sampler == "ddpm":
                if kw["variance_type"] == "learned_range":
                    mo = torch.cat([mo[:, :shape[1]], torch.tanh(mo[:, shape[1]:])], 1)
                return mmkern.diffusion.ddpm_step(mo, t, sample, ac, prev_timesteps=prev,
                                                  noise=noise if use_noise else None, **kw)
            return mmkern.diffusion.ddim_step(mo, t, sample, ac, prev, noise=noise if use_noise else None, **kw)

        description = f"{name} {shape} t {t.tolist()} prev {prev.tolist()} noise {use_noise} {kw}"
        case = verify.Case(test, description, lambda: inputs, run, cast=("mo", "sample", "noise"),
                           outputs=("prev_sample", "pred_original_sample"))
        x = inputs["sample"].to(dtype)
        mo = inputs["mo"].to(dtype)
        clip_args = dict(prediction_type=prediction, clip_sample_range=1.0 if clip else 0.0,
                         dynamic_thresholding_ratio=0.9 if thresholding else 0.0,
                         sample_max_value=kw["sample_max_value"])
        if sampler == "ddpm":
            reasons_inputs = dict(model_output=mo, sample=x, timesteps=t, prev_timesteps=prev, alphas_cumprod=ac,
                                  noise=x if use_noise else None, variance_type=kw["variance_type"], **clip_args)
        else:
            reasons_inputs = dict(model_output=mo, sample=x, timesteps=t, prev_timesteps=prev, alphas_cumprod=ac,
                                  final_alpha_cumprod=1.0, eta=kw["eta"], noise=x if use_noise else None,
                                  use_clipped_model_output=kw["use_clipped_model_output"], **clip_args)
        _check_all(test, case, f"{sampler}_step", reasons_inputs, dtype)


@fz.every_backend_checks(["euler_step / euler_scale_model_input / euler_add_noise"], ("euler_step",),
                         TYPICAL_EULER)
@fuzz(ci=10, gpu=150)
@given(data=st.data(), dtype=DTYPES, shape=samples())
def test_euler_ops_match_oracle(data, dtype, shape):
    """euler_step (with churn), euler_scale_model_input and euler_add_noise; step 0 and the last step."""
    test = "euler_step / euler_scale_model_input / euler_add_noise"
    with fz.counted(test):
        N = data.draw(st.sampled_from([1, 2, 10, 50]), "steps")
        sigmas = torch.cat([torch.linspace(data.draw(st.sampled_from([1.0, 14.6, 80.0]), "sigma_max"), 0.03, N),
                            torch.zeros(1)]).to(fz.DEVICE)
        B = shape[0]
        i = torch.tensor(data.draw(st.lists(st.one_of(st.sampled_from([0, N - 1]), st.integers(0, N - 1)),
                                            min_size=B, max_size=B), "step_index"), device=fz.DEVICE)
        prediction = data.draw(st.sampled_from(["epsilon", "v_prediction", "sample", "original_sample"]), "pred")
        churn = data.draw(st.sampled_from([0.0, 0.0, 1.0, 100.0]), "s_churn")
        s_tmax = data.draw(st.sampled_from([math.inf, 5.0]), "s_tmax")
        inputs = dict(mo=_randn(shape), sample=_randn(shape), noise=_randn(shape))

        def run(mo, sample, noise):
            prev, x0 = mmkern.diffusion.euler_step(mo, i, sample, sigmas, noise=noise, prediction_type=prediction,
                                                   s_churn=churn, s_tmax=s_tmax)
            return (prev, x0, mmkern.diffusion.euler_scale_model_input(sample, i, sigmas),
                    mmkern.diffusion.euler_add_noise(sample, noise, i, sigmas))

        description = f"{shape} sigmas {N}+1 i {i.tolist()} {prediction} churn {churn} s_tmax {s_tmax}"
        case = verify.Case(test, description, lambda: inputs, run, cast=("mo", "sample", "noise"),
                           outputs=("prev_sample", "pred_original_sample", "scale_model_input", "add_noise"))
        x = inputs["sample"].to(dtype)
        _check_all(test, case, "euler_step", dict(model_output=x, sample=x, step_index=i, sigmas=sigmas, noise=x,
                                                  prediction_type=prediction, gamma=0.0, s_tmin=0.0, s_tmax=s_tmax,
                                                  s_noise=1.0), dtype)
