"""The fused loss and sampler steps: Triton against the float64 oracle (flash-attn's criterion, fp32/fp16/bf16),
the loss's gradient against autograd through the reference, and per-sample timesteps against single calls."""
import math

import pytest
import torch

import mmkern
from mmkern.verify import Case
from conftest import assert_backend_matches_oracle, max_abs_err, randn

D = mmkern.diffusion
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 1000


def _ac(schedule="linear", table=torch.float32, **kw):
    return D.NoiseSchedule(beta_schedule=schedule, **kw).alphas_cumprod.to(table).to(DEVICE)


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def _t(values):
    return torch.tensor(values, device=DEVICE)


# --------------------------------------------------------------------------- loss

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("shape,timesteps", [((4, 3, 5, 7), [0, 1, 500, 999]), ((3, 1031), [999, 3, 7]),
                                              ((2,), 17)])
def test_loss_matches_oracle(prediction_type, snr_gamma, shape, timesteps):
    ac = _ac(table=torch.float64 if snr_gamma else torch.float32)
    t = _t(timesteps) if isinstance(timesteps, list) else timesteps
    case = Case("diffusion_loss", str(shape), lambda: dict(mo=_randn(*shape), x0=_randn(*shape), n=_randn(*shape)),
                lambda mo, x0, n: (D.diffusion_loss(mo, x0, n, t, ac, prediction_type, snr_gamma),),
                cast=("mo", "x0", "n"), grad=("mo",))
    assert_backend_matches_oracle("triton", case, reduced_elements=math.prod(shape))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 1.0])
def test_loss_and_gradient_against_autograd_through_the_diffusers_formula(prediction_type, snr_gamma):
    """diffusers' train_text_to_image loss, written out, differentiated by autograd (float64)."""
    ac = _ac("scaled_linear", torch.float64, beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    shape, t = (4, 2, 3, 3), _t([0, 400, 998, 999])
    mo, x0, n = (randn(*shape).to(DEVICE).requires_grad_() for _ in range(3))
    a = ac[t].view(-1, 1, 1, 1)
    target = {"epsilon": n, "sample": x0, "v_prediction": a.sqrt() * n - (1 - a).sqrt() * x0}[prediction_type]
    per_sample = ((mo - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = (a / (1 - a)).flatten()
        w = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1) if prediction_type == "v_prediction" else w
        w = torch.nan_to_num(w, nan=1.0)     # a = 0 (zero terminal SNR), epsilon: 0/0; mmkern takes the limit 1
        per_sample = per_sample * w
    want = per_sample.mean()
    for backend in ("reference", "triton"):
        inputs = [x.detach().float().requires_grad_() for x in (mo, x0, n)] if backend == "triton" else \
            [x.detach().clone().requires_grad_() for x in (mo, x0, n)]
        with mmkern.backend(backend):
            got = D.diffusion_loss(*inputs, t, ac, prediction_type, snr_gamma)
            grads = torch.autograd.grad(got, inputs)
        tol = 1e-10 if backend == "reference" else 1e-5
        assert got.dtype == (torch.float64 if backend == "reference" else torch.float32)
        assert abs(got.item() - want.item()) <= tol * (1 + abs(want.item()))
        for g, w_grad, x in zip(grads, torch.autograd.grad(want, (mo, x0, n), retain_graph=True, allow_unused=True),
                                (mo, x0, n)):
            w_grad = torch.zeros_like(x) if w_grad is None else w_grad      # the target does not use it
            assert max_abs_err(g, w_grad) <= tol * (1 + w_grad.abs().max().item())


def test_loss_is_deterministic_and_reduces_across_many_programs():
    ac = _ac()
    x = torch.randn(3, 2 * 1024 + 5, device=DEVICE)
    t = _t([1, 2, 3])
    with mmkern.backend("triton"):
        first = D.diffusion_loss(x, x * 0.5, x.flip(-1), t, ac)
        assert all(torch.equal(first, D.diffusion_loss(x, x * 0.5, x.flip(-1), t, ac)) for _ in range(3))
    with mmkern.backend("reference"):
        want = D.diffusion_loss(x.double(), (x * 0.5).double(), x.flip(-1).double(), t, ac)
    assert abs(first.item() - want.item()) < 1e-5 * want.item()


# --------------------------------------------------------------------------- sampler steps

def _step_case(name, shape, run, extra=()):
    return Case(name, str(shape), lambda: dict(mo=_randn(*shape), s=_randn(*shape), n=_randn(*shape)), run,
                cast=("mo", "s", "n"))


DDPM = [("fixed_small", "none"), ("fixed_small_log", "clip"), ("fixed_large", "threshold"),
        ("fixed_large_log", "none"), ("learned", "clip"), ("learned_range", "threshold")]
CLIP = {"none": {}, "clip": dict(clip_sample=True, clip_sample_range=1.5),
        "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type,clip", DDPM)
@pytest.mark.parametrize("table", [torch.float32, torch.float64])
def test_ddpm_step_matches_oracle(prediction_type, variance_type, clip, table):
    ac = _ac(table=table)
    # Far from t = 0 and with strides of 100 (a 10-step schedule): in bfloat16 a_t rounds to 1 up to t ~ 20 and
    # neighbouring a_t are equal, so the eager baseline would divide by 0 (what mmkern does there instead:
    # test_ddpm_step_near_t0_in_half_precision and the float32 whole-loop tests against diffusers)
    t, prev = _t([150, 300, 600, 999]), _t([50, 200, 500, 899])
    shape = (4, 3, 5, 7)
    learned = variance_type.startswith("learned")

    def run(mo, s, n):
        if learned:   # the variance channels: positive for "learned", a fraction in [-1, 1] for learned_range
            v = mo.abs() * 0.01 if variance_type == "learned" else torch.tanh(mo)
            mo = torch.cat([mo, v], 1)
        return D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n, prediction_type=prediction_type,
                           variance_type=variance_type, **CLIP[clip])
    assert_backend_matches_oracle("triton", _step_case("ddpm_step", shape, run),
                                  conditioning=2.0)   # x0 at t = 999 amplifies a rounding 156x (conftest)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta,clip,clipped", [(0.0, "none", False), (0.5, "clip", True), (1.0, "threshold", False),
                                              (1.0, "threshold", True)])
def test_ddim_step_matches_oracle(prediction_type, eta, clip, clipped):
    ac = _ac("scaled_linear", beta_start=0.00085, beta_end=0.012)
    t, prev = _t([41, 60, 520, 999]), _t([-1, 40, 500, 979])      # (bfloat16 rounds a_t to 1 below t ~ 40)

    def run(mo, s, n):
        return D.ddim_step(mo, t, s, ac, prev, final_alpha_cumprod=ac[0].item(), eta=eta, noise=n,
                           prediction_type=prediction_type, use_clipped_model_output=clipped, **CLIP[clip])
    assert_backend_matches_oracle("triton", _step_case("ddim_step", (4, 2, 3, 11), run))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("churn", [{}, dict(s_churn=3.0, s_noise=1.01), dict(s_churn=3.0, s_tmin=0.5, s_tmax=4.0)])
def test_euler_step_and_scale_match_oracle(prediction_type, churn):
    sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)]).to(DEVICE)
    i = _t([0, 3, 9])

    def run(mo, s, n):
        return D.euler_step(mo, i, s, sigmas, noise=n if churn else None, prediction_type=prediction_type, **churn)
    assert_backend_matches_oracle("triton", _step_case("euler_step", (3, 4, 9), run))
    scale = Case("euler_scale_model_input", "(3, 4, 9)", lambda: dict(s=_randn(3, 4, 9)),
                 lambda s: (D.euler_scale_model_input(s, i, sigmas),), cast=("s",))
    assert_backend_matches_oracle("triton", scale)
    noising = Case("euler_add_noise", "(3, 4, 9)", lambda: dict(x=_randn(3, 4, 9), n=_randn(3, 4, 9)),
                   lambda x, n: (D.euler_add_noise(x, n, i, sigmas),), cast=("x", "n"))
    assert_backend_matches_oracle("triton", noising)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_sample_steps_equal_a_loop_of_single_timestep_calls(backend):
    ac = _ac()
    sigmas = torch.cat([torch.linspace(10.0, 0.1, 8), torch.zeros(1)]).to(DEVICE)
    mo, s, n = (torch.randn(3, 2, 5, device=DEVICE) for _ in range(3))
    t, prev, idx = _t([999, 0, 431]), _t([979, -1, 411]), _t([0, 7, 3])
    calls = {
        "ddpm": lambda b, t_, p_: D.ddpm_step(mo[b], t_, s[b], ac, prev_timesteps=p_, noise=n[b],
                                              variance_type="fixed_large", clip_sample=True),
        "ddim": lambda b, t_, p_: D.ddim_step(mo[b], t_, s[b], ac, p_, eta=0.7, noise=n[b], thresholding=True,
                                              dynamic_thresholding_ratio=0.8, sample_max_value=1.5),
        "euler": lambda b, i_, _: D.euler_step(mo[b], i_, s[b], sigmas, noise=n[b], s_churn=2.0, s_tmax=5.0),
    }
    with mmkern.backend(backend):
        for name, call in calls.items():
            first, second = (t, prev) if name != "euler" else (idx, idx)
            batched = call(slice(None), first, second)
            for b in range(3):
                single = call(slice(b, b + 1), int(first[b]), int(second[b]))
                for x, y in zip(batched, single):
                    assert torch.equal(x[b:b + 1], y), f"{name} sample {b}"


def test_ddpm_adds_no_noise_at_t0_and_steps_are_new_tensors():
    ac = _ac()
    mo, s, n = (torch.randn(2, 3, device=DEVICE) for _ in range(3))
    with mmkern.backend("triton"):
        with_noise, x0 = D.ddpm_step(mo, _t([0, 0]), s, ac, noise=n)
        without, _ = D.ddpm_step(mo, _t([0, 0]), s, ac)
    assert torch.equal(with_noise, without)
    assert with_noise.data_ptr() not in (mo.data_ptr(), s.data_ptr(), n.data_ptr()) and x0.is_contiguous()


def test_gamma_matches_diffusers_formula():
    from mmkern.diffusion.sampling import churn_gamma
    assert churn_gamma(0.0, 11) == 0.0 and churn_gamma(1.0, 11) == 0.1 and churn_gamma(100.0, 11) == math.sqrt(2) - 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_near_t0_in_half_precision(dtype, variance_type):
    """Near t = 0 a_t rounds to 1 in half precision, so eager half-precision math (diffusers' casts)
    gives inf/NaN; the kernel's fp32 coefficients do not. Criterion: within 2x the error of the float64
    result on the rounded inputs, rounded to dtype (the best a dtype-d result can be) + 1 ulp."""
    ac = _ac()
    t, prev = _t([0, 1, 7, 15]), _t([-1, 0, 6, 14])
    mo, s, n = _randn(4, 2, 3, 5), _randn(4, 2, 3, 5), _randn(4, 2, 3, 5)
    if variance_type == "learned_range":
        mo = torch.cat([mo, torch.tanh(mo)], 1)

    def step(mo, s, n):
        return D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n, variance_type=variance_type)
    with mmkern.backend("reference"):
        oracle = step(mo, s, n)
        best = [o.to(dtype) for o in step(*(x.to(dtype).double() for x in (mo, s, n)))]
    with mmkern.backend("triton"):
        got = step(*(x.to(dtype) for x in (mo, s, n)))
    for g, b, o in zip(got, best, oracle):
        assert torch.isfinite(g).all()
        tolerance = 2 * max_abs_err(b, o) + torch.finfo(dtype).eps * o.abs().max().item()
        assert max_abs_err(g, o) <= tolerance
