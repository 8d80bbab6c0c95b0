"""The diffusion ops' C++ kernels (mmkern._C: the `cpu` backend, and the `cuda` backend where a GPU is present)
against the float64 reference through the public API, with flash-attn's criterion (conftest), every sample
dtype, awkward shapes (odd sizes, batch 1, empty batch, 0-d and per-sample timesteps, t = 0 and T - 1);
the drop-in schedulers against diffusers on the cpu backend; bad input at the C++ entry points."""
import math

import pytest
import torch

import mmkern
from mmkern.verify import Case
from conftest import DTYPES, assert_backend_matches_oracle, max_abs_err

D = mmkern.diffusion
T = 1000
HAS_GPU = torch.cuda.is_available()
BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Build mmkern._C (CPU kernels; CUDA ones too where nvcc is present) if missing or stale, and load it."""
    from mmkern import build
    return build.ensure_built()


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _ac(device, schedule="linear", table=torch.float32, **kw):
    return D.NoiseSchedule(beta_schedule=schedule, **kw).alphas_cumprod.to(table).to(device)


def _t(values, device, dtype=torch.int64):
    return torch.tensor(values, device=device, dtype=dtype)


def _randn(device, *shape):
    return torch.randn(*shape, dtype=torch.float64, device=device)


# --------------------------------------------------------------------------- add_noise, get_velocity, target

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["add_noise", "get_velocity", "training_target_v", "euler_add_noise"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1, 1), (3,), (2, 1031), (0, 4), (5, 3, 33)])
@pytest.mark.parametrize("timesteps", ["per_sample", "single"])
@pytest.mark.parametrize("table", [torch.float32, torch.float64])
def test_noise_ops_match_oracle(backend, op, shape, timesteps, table):
    device = _device(backend)
    if op == "euler_add_noise":
        ac = torch.cat([torch.linspace(14.6, 0.03, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        ac, n_table = ac.to(table).to(device), 11
    else:
        ac, n_table = _ac(device, table=table), T
    if timesteps == "per_sample":
        t = torch.randint(0, n_table, (shape[0],), device=device, dtype=torch.int32)
        if shape[0] > 1:
            t[0], t[-1] = 0, n_table - 1                 # both ends of the schedule
    else:
        t = torch.tensor(n_table - 1, device=device)
    fn = {"add_noise": D.add_noise, "get_velocity": D.get_velocity, "euler_add_noise": D.euler_add_noise,
          "training_target_v": lambda x, n, t, ac: D.training_target(x, n, t, ac, "v_prediction")}[op]
    case = Case(op, str(shape), lambda: dict(x=_randn(device, *shape), n=_randn(device, *shape)),
                lambda x, n: (fn(x, n, t, ac),), cast=("x", "n"))
    assert_backend_matches_oracle(backend, case)


def test_cpu_backend_runs_the_cpp_kernels_and_leaves_float64_to_the_reference():
    x = torch.randn(2, 8)
    inputs = dict(samples=x, noise=x, timesteps=torch.tensor(3), alphas_cumprod=_ac("cpu"))
    problem = mmkern.dispatch.problem("add_noise", **inputs)
    assert mmkern.dispatch.not_supported_reasons("add_noise", "cpu", problem) == []
    with mmkern.backend("cpu"):
        got = D.add_noise(x, x, 3, inputs["alphas_cumprod"])
        with pytest.raises(mmkern.NoBackendError, match="original_samples has dtype torch.float64"):
            D.add_noise(x.double(), x.double(), 3, inputs["alphas_cumprod"])
    a = inputs["alphas_cumprod"][3].double()
    assert max_abs_err(got, (a.sqrt() + (1 - a).sqrt()) * x.double()) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_through_the_cpu_kernels(dtype):
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0).float()
    x = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    n = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    t = torch.tensor([0, 10, 49])
    with mmkern.backend("cpu"):
        D.get_velocity(x, n, t, ac).backward(torch.ones(3, 4, dtype=dtype))
    a = ac.double()[t].view(-1, 1)
    assert torch.allclose(x.grad.double(), -(1 - a).sqrt().expand(3, 4), atol=1e-2)
    assert torch.allclose(n.grad.double(), a.sqrt().expand(3, 4), atol=1e-2)


# --------------------------------------------------------------------------- loss

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("shape,timesteps", [((4, 3, 5, 7), [0, 1, 500, 999]), ((3, 1031), [999, 3, 7]),
                                              ((2,), 17), ((1, 40000), [600])])
def test_loss_and_gradient_match_oracle(backend, prediction_type, snr_gamma, shape, timesteps):
    device = _device(backend)
    ac = _ac(device, table=torch.float64 if snr_gamma else torch.float32)
    t = _t(timesteps, device) if isinstance(timesteps, list) else timesteps
    case = Case("diffusion_loss", str(shape),
                lambda: dict(mo=_randn(device, *shape), x0=_randn(device, *shape), n=_randn(device, *shape)),
                lambda mo, x0, n: (D.diffusion_loss(mo, x0, n, t, ac, prediction_type, snr_gamma),),
                cast=("mo", "x0", "n"), grad=("mo", "x0", "n"))
    assert_backend_matches_oracle(backend, case, reduced_elements=math.prod(shape))


def test_loss_is_deterministic_whatever_the_thread_count():
    ac = _ac("cpu")
    x = torch.randn(3, 70001)
    t = torch.tensor([1, 500, 999])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            with mmkern.backend("cpu"):
                results.append(D.diffusion_loss(x, x * 0.5, x.flip(-1), t, ac, "v_prediction", 5.0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    with mmkern.backend("reference"):
        want = D.diffusion_loss(x.double(), (x * 0.5).double(), x.flip(-1).double(), t, ac, "v_prediction", 5.0)
    assert abs(results[0].item() - want.item()) < 1e-5 * want.item()


def test_loss_of_an_empty_batch_is_nan_and_its_gradient_empty():
    mo = torch.zeros(0, 3, requires_grad=True)
    with mmkern.backend("cpu"):
        loss = D.diffusion_loss(mo, torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), _ac("cpu"))
        loss.backward()
    assert loss.dtype == torch.float32 and math.isnan(loss.item()) and mo.grad.shape == (0, 3)


# --------------------------------------------------------------------------- sampler steps

def _step_case(name, shape, run, device):
    return Case(name, str(shape), lambda: dict(mo=_randn(device, *shape), s=_randn(device, *shape),
                                               n=_randn(device, *shape)), run, cast=("mo", "s", "n"))


DDPM = [("fixed_small", "none"), ("fixed_small_log", "clip"), ("fixed_large", "threshold"),
        ("fixed_large_log", "none"), ("learned", "clip"), ("learned_range", "threshold")]
CLIP = {"none": {}, "clip": dict(clip_sample=True, clip_sample_range=1.5),
        "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type,clip", DDPM)
@pytest.mark.parametrize("table", [torch.float32, torch.float64])
def test_ddpm_step_matches_oracle(backend, prediction_type, variance_type, clip, table):
    device = _device(backend)
    ac = _ac(device, table=table)
    # far from t = 0 (bfloat16 rounds a_t to 1 there: the eager yardstick would divide by 0; see the t0 test)
    t, prev = _t([150, 300, 600, 999], device, torch.int32), _t([50, 200, 500, 899], device)
    learned = variance_type.startswith("learned")

    def run(mo, s, n):
        if learned:
            v = mo.abs() * 0.01 if variance_type == "learned" else torch.tanh(mo)
            mo = torch.cat([mo, v], 1)
        return D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n, prediction_type=prediction_type,
                           variance_type=variance_type, **CLIP[clip])
    assert_backend_matches_oracle(backend, _step_case("ddpm_step", (4, 3, 5, 7), run, device),
                                  conditioning=2.0)   # x0 at t = 999 amplifies a rounding 156x (conftest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta,clip,clipped", [(0.0, "none", False), (0.5, "clip", True), (1.0, "threshold", False),
                                              (1.0, "threshold", True)])
def test_ddim_step_matches_oracle(backend, prediction_type, eta, clip, clipped):
    device = _device(backend)
    ac = _ac(device, "scaled_linear", beta_start=0.00085, beta_end=0.012)
    t, prev = _t([41, 60, 520, 999], device), _t([-1, 40, 500, 979], device)

    def run(mo, s, n):
        return D.ddim_step(mo, t, s, ac, prev, final_alpha_cumprod=ac[0].item(), eta=eta, noise=n,
                           prediction_type=prediction_type, use_clipped_model_output=clipped, **CLIP[clip])
    assert_backend_matches_oracle(backend, _step_case("ddim_step", (4, 2, 3, 11), run, device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("churn", [{}, dict(s_churn=3.0, s_noise=1.01), dict(s_churn=3.0, s_tmin=0.5, s_tmax=4.0)])
def test_euler_step_and_scale_match_oracle(backend, prediction_type, churn):
    device = _device(backend)
    sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)]).to(device)
    i = _t([0, 3, 9], device)

    def run(mo, s, n):
        return D.euler_step(mo, i, s, sigmas, noise=n if churn else None, prediction_type=prediction_type, **churn)
    assert_backend_matches_oracle(backend, _step_case("euler_step", (3, 4, 9), run, device))
    scale = Case("euler_scale_model_input", "(3, 4, 9)", lambda: dict(s=_randn(device, 3, 4, 9)),
                 lambda s: (D.euler_scale_model_input(s, i, sigmas),), cast=("s",))
    assert_backend_matches_oracle(backend, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3, 17), (2, 4, 8, 8), (5, 1, 3)])
@pytest.mark.parametrize("timesteps", ["zero_d_last", "per_sample_ends"])
def test_steps_at_awkward_shapes_and_the_ends_of_the_schedule(backend, shape, timesteps):
    """t = T - 1 and the last step (t -> -1, and sigma index N - 2 -> the final 0) in 0-d and (B,) form."""
    device = _device(backend)
    ac = _ac(device, "scaled_linear", beta_start=0.00085, beta_end=0.012)
    sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)]).to(device)
    B = shape[0]
    if timesteps == "zero_d_last":
        t, prev, i = _t(T - 1, device), _t(T - 21, device), _t(8, device)
    else:
        t = _t([T - 1 if b % 2 == 0 else 45 for b in range(B)], device)
        prev, i = t - 20, _t([9 if b % 2 == 0 else 0 for b in range(B)], device)
        prev[prev < 40] = -1
    steps = {
        "ddpm": lambda mo, s, n: D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n, variance_type="fixed_large",
                                             clip_sample=True),
        "ddim": lambda mo, s, n: D.ddim_step(mo, t, s, ac, prev, eta=0.3, noise=n, thresholding=True,
                                             dynamic_thresholding_ratio=0.8, sample_max_value=1.5),
        "euler": lambda mo, s, n: D.euler_step(mo, i, s, sigmas, noise=n, s_churn=2.0, s_tmax=5.0),
    }
    for name, run in steps.items():
        assert_backend_matches_oracle(backend, _step_case(name, shape, run, device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_of_an_empty_batch(backend):
    device = _device(backend)
    ac = _ac(device)
    sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)]).to(device)
    x = torch.zeros(0, 3, 4, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    with mmkern.backend(backend):
        outs = [*D.ddpm_step(x, empty, x, ac, noise=x, thresholding=True),
                *D.ddim_step(x, empty, x, ac, empty, eta=1.0, noise=x), *D.euler_step(x, empty, x, sigmas),
                D.euler_scale_model_input(x, empty, sigmas), D.add_noise(x, x, empty, ac)]
    assert all(o.shape == (0, 3, 4) for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_steps_equal_a_loop_of_single_timestep_calls(backend):
    device = _device(backend)
    ac = _ac(device)
    sigmas = torch.cat([torch.linspace(10.0, 0.1, 8), torch.zeros(1)]).to(device)
    mo, s, n = (torch.randn(3, 2, 5, device=device) for _ in range(3))
    t, prev, idx = _t([999, 0, 431], device), _t([979, -1, 411], device), _t([0, 7, 3], device)
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_near_t0_in_half_precision(dtype, variance_type):
    """fp32 coefficients stay finite where eager half-precision math gives inf/NaN (a_t rounds to 1): within 2x
    the error of the float64 step on the rounded inputs, rounded to dtype, + 1 ulp."""
    ac = _ac("cpu")
    t, prev = _t([0, 1, 7, 15], "cpu"), _t([-1, 0, 6, 14], "cpu")
    mo, s, n = _randn("cpu", 4, 2, 3, 5), _randn("cpu", 4, 2, 3, 5), _randn("cpu", 4, 2, 3, 5)
    if variance_type == "learned_range":
        mo = torch.cat([mo, torch.tanh(mo)], 1)

    def step(mo, s, n):
        return D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n, variance_type=variance_type)
    with mmkern.backend("reference"):
        oracle = step(mo, s, n)
        best = [o.to(dtype) for o in step(*(x.to(dtype).double() for x in (mo, s, n)))]
    with mmkern.backend("cpu"):
        got = step(*(x.to(dtype) for x in (mo, s, n)))
    for g, b, o in zip(got, best, oracle):
        assert torch.isfinite(g).all()
        assert max_abs_err(g, o) <= 2 * max_abs_err(b, o) + torch.finfo(dtype).eps * o.abs().max().item()


def test_non_contiguous_inputs_and_int32_indices():
    ac = _ac("cpu", table=torch.float64)
    base = torch.randn(4, 6, 10)
    x, noise = base[:, ::2], base[:, 1::2]          # last dim contiguous, rows strided
    t = torch.tensor([0, 5, 500, 999], dtype=torch.int32)
    with mmkern.backend("cpu"):
        got = D.add_noise(x, noise, t, ac)
        step = D.ddim_step(x, t, noise, ac, t.long() - 5, eta=0.5, noise=x)
    with mmkern.backend("reference"):
        want = D.add_noise(x, noise, t, ac)
        want_step = D.ddim_step(x, t, noise, ac, t.long() - 5, eta=0.5, noise=x)
    assert max_abs_err(got, want) < 1e-5
    assert all(max_abs_err(a, b) < 1e-4 for a, b in zip(step, want_step))


# --------------------------------------------------------------------------- the drop-in schedulers

def _scheduler_loop(name, config, euler=False, steps=5, step_kwargs=None, variance_type=None):
    diffusers = pytest.importorskip("diffusers")
    theirs = getattr(diffusers, name)(**config)
    ours = getattr(D, name).from_config(theirs.config)
    for s in (theirs, ours):
        s.set_timesteps(steps)
    latents = torch.randn(2, 3, 4, 5) * (ours.init_noise_sigma if euler else 1.0)

    def model(x, t):
        out = 0.7 * torch.tanh(x) + 0.2 * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 150.0) * x.flip(-1)
        if variance_type == "learned_range":
            out = torch.cat([out, torch.tanh(0.5 * x)], 1)
        return out

    traces = []
    for scheduler, backend in ((ours, "cpu"), (theirs, None)):
        generator, sample, trace = torch.Generator().manual_seed(5), latents.clone(), []
        with mmkern.backend(backend or "auto"):
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(sample, t) if euler else sample
                out = scheduler.step(model(model_input, t), t, sample, generator=generator, **(step_kwargs or {}))
                sample = out.prev_sample
                trace.append((sample, out.pred_original_sample))
        traces.append(trace)
    for i, ((s, x0), (s_ref, x0_ref)) in enumerate(zip(*traces)):
        for got, want in ((s, s_ref), (x0.to(x0_ref.dtype), x0_ref)):
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4 * (1 + want.abs().max().item()),
                                       msg=lambda m: f"{name} step {i}: {m}")


@pytest.mark.parametrize("config,variance_type", [
    (dict(), None), (dict(variance_type="learned_range", prediction_type="v_prediction", clip_sample=False),
                     "learned_range"),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0, prediction_type="sample"), None)])
def test_ddpm_scheduler_on_cpu_matches_diffusers(config, variance_type):
    _scheduler_loop("DDPMScheduler", config, variance_type=variance_type)


@pytest.mark.parametrize("config,kwargs", [
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False), {}),
    (dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=True, clip_sample_range=1.5),
     dict(eta=1.0, use_clipped_model_output=True))])
def test_ddim_scheduler_on_cpu_matches_diffusers(config, kwargs):
    _scheduler_loop("DDIMScheduler", config, step_kwargs=kwargs)


@pytest.mark.parametrize("config,kwargs", [
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), {}),
    (dict(prediction_type="v_prediction", use_karras_sigmas=True), dict(s_churn=2.0, s_noise=1.003))])
def test_euler_scheduler_on_cpu_matches_diffusers(config, kwargs):
    _scheduler_loop("EulerDiscreteScheduler", config, euler=True, step_kwargs=kwargs)


# --------------------------------------------------------------------------- bad input at the C++ entry points

def _op(name):
    from mmkern import native
    return native.cpp_op(name)


def test_cpp_entry_points_name_the_bad_argument():
    ac, x, t = _ac("cpu"), torch.randn(2, 8), torch.tensor([1, 2])
    cases = [
        (lambda: _op("diffusion_add_noise")(x.t(), x.t(), t, ac), "original_samples must be contiguous"),
        (lambda: _op("diffusion_add_noise")(x.double(), x.double(), t, ac), "original_samples must have dtype"),
        (lambda: _op("diffusion_add_noise")(x, x[:1], t, ac), "noise must have the shape and dtype"),
        (lambda: _op("diffusion_get_velocity")(x, x, t.float(), ac), "timesteps must have dtype int32 or int64"),
        (lambda: _op("diffusion_get_velocity")(x, x, torch.tensor([1, 2, 3]), ac), "timesteps must be 0-d or"),
        (lambda: _op("diffusion_add_noise")(x, x, t, ac.half()), "alphas_cumprod must have dtype float32"),
        (lambda: _op("diffusion_add_noise")(x, x, t, ac[:0]), "alphas_cumprod must be 1-D with at least 1"),
        (lambda: _op("diffusion_loss")(x, x, x, t, ac, "noise", 0.0), "prediction_type must be one of"),
        (lambda: _op("diffusion_loss_backward")(torch.ones(1), x, x, x, t, ac, "epsilon", 0.0),
         "grad must be a 0-d float32"),
        (lambda: _op("diffusion_ddpm_step")(x, x, t, t, ac, None, None, "epsilon", "small", 0.0),
         "variance_type must be one of"),
        (lambda: _op("diffusion_ddpm_step")(x, x, t, t, ac, None, None, "epsilon", "learned", 0.0),
         "a learned variance needs model_output of shape"),
        (lambda: _op("diffusion_ddim_step")(x, x, t, t[:1], ac, 1.0, 0.0, None, None, "epsilon", 0.0, False),
         "prev_timesteps must be 0-d or"),
        (lambda: _op("diffusion_ddim_step")(x, x, t, t, ac, 1.0, 0.5, x.half(), None, "epsilon", 0.0, False),
         "noise must have the shape and dtype of sample"),
        (lambda: _op("diffusion_ddim_step")(x, x, t, t, ac, 1.0, 0.0, None, torch.ones(3), "epsilon", 0.0, False),
         "threshold must be a contiguous"),
        (lambda: _op("diffusion_euler_step")(x, x, t, ac[:1], None, "epsilon", 0.0, 0.0, 1.0, 1.0),
         "sigmas must be 1-D with at least 2"),
        (lambda: _op("diffusion_euler_step")(x[:, :4].contiguous(), x, t, ac, None, "epsilon", 0.0, 0.0, 1.0, 1.0),
         "model_output must have the shape of sample"),
        (lambda: _op("diffusion_euler_add_noise")(x, x.half(), t, ac), "noise must have the shape and dtype"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_cuda_tensors_get_a_clear_error_or_run(extension):
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    from mmkern import native
    x = torch.randn(2, 8, device="cuda")
    t, ac = torch.tensor([1, 2], device="cuda"), _ac("cuda")
    if native.missing_op_reasons("diffusion_add_noise", device="cuda"):
        with pytest.raises(RuntimeError):
            _op("diffusion_add_noise")(x, x, t, ac)
    else:
        with pytest.raises(RuntimeError, match="alphas_cumprod must be on"):
            _op("diffusion_add_noise")(x, x, t, ac.cpu())
        torch.testing.assert_close(_op("diffusion_add_noise")(x, x, t, ac).cpu(),
                                   _op("diffusion_add_noise")(x.cpu(), x.cpu(), t.cpu(), ac.cpu()))


def test_cuda_steps_read_nothing_on_the_host():
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    ac = _ac("cuda")
    mo, s, n = (torch.randn(2, 4, 8, device="cuda") for _ in range(3))
    t, prev = _t([500, 20], "cuda"), _t([480, 0], "cuda")
    sigmas = torch.linspace(10, 0, 11, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with mmkern.backend("cuda"):
            D.add_noise(mo, n, t, ac)
            D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n, clip_sample=True)
            D.ddim_step(mo, t, s, ac, prev, eta=0.5, noise=n)
            D.euler_step(mo, t % 9, s, sigmas)
            D.diffusion_loss(mo, s, n, t, ac, "v_prediction", 5.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
