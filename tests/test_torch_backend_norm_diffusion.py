"""The `torch` backend (torch's own kernels in the input dtype) of the norm and diffusion ops against the float64
oracle: flash-attn's criterion through `mmkern verify`'s measure (conftest.assert_backend_matches_oracle), every
output and gradient, fp32/fp16/bf16, awkward shapes (one row, N not a power of two, an empty batch, batch 1,
0-d and per-sample timesteps); its output contract (dtypes, float32 statistics, new contiguous tensors, the
fake's shapes: opcheck); and what it refuses (dropout, float64).
"""
import math

import pytest
import torch

import mmkern
from mmkern import dispatch
from mmkern.verify import Case
from conftest import DTYPES, assert_backend_matches_oracle, forced, max_abs_err

D = mmkern.diffusion
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
# (x dtype, residual-stream dtype)
PAIRS = [(f32, f32), (f16, f16), (f16, f32), (bf16, bf16), (bf16, f32)]
PAIR_IDS = ["fp32-fp32", "fp16-fp16", "fp16-fp32", "bf16-bf16", "bf16-fp32"]


def _randn(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale).to(dtype)


# --------------------------------------------------------------------------- norms

def norm_case(shape, pair, rms, residual=True, prenorm=True, weight="x", bias=True, modulation=False,
              residual_in_fp32=False):
    """A verify.Case of layer_norm_residual / rms_norm_residual on x of `shape` (as in test_triton_norm.py).
    weight: "x" (x's dtype), "fp32" or None. With prenorm the first output is out + 0.5 * pre, so the gradient
    arriving on the returned stream is checked too."""
    x_dtype, stream_dtype = pair
    N = shape[-1]
    residual_fp32 = residual and stream_dtype == f32 and x_dtype != f32
    param_dtype = f32 if weight == "fp32" else torch.float64

    def make():
        inputs = dict(x=_randn(*shape))
        if residual:
            inputs["r"] = _randn(*shape, dtype=f32 if residual_fp32 else torch.float64)
        if weight:
            inputs["w"] = _randn(N, dtype=param_dtype, scale=0.5) + 1
            if bias and not rms:
                inputs["b"] = _randn(N, dtype=param_dtype)
        if modulation:
            inputs["shift"] = _randn(shape[0], N)
            inputs["scale"] = _randn(shape[0], N, scale=0.3)
        return inputs

    def run(x, r=None, w=None, b=None, shift=None, scale=None):
        kwargs = dict(weight=w, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
                      modulation=(shift, scale) if modulation else None)
        result = mmkern.rms_norm_residual(x, r, **kwargs) if rms else mmkern.layer_norm_residual(x, r, bias=b,
                                                                                                 **kwargs)
        if not prenorm:
            return (result,)
        out, pre = result
        return out + 0.5 * pre.to(out.dtype), out, pre

    names = make().keys()
    cast = tuple(n for n in names if not (n == "r" and residual_fp32) and not (n in "wb" and weight == "fp32"))
    label = f"{'rms' if rms else 'layer'}_norm_residual"
    return Case(label, f"{shape} {x_dtype}/{stream_dtype}", make, run, cast=cast, grad=tuple(names))


@pytest.mark.parametrize("shape", [(2, 3, 768), (1, 1, 1), (1, 1, 1000), (3, 5, 7), (2, 1, 4097)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_matches_oracle_prenorm_with_residual(shape, pair, rms):
    assert_backend_matches_oracle("torch", norm_case(shape, pair, rms), dtypes=[pair[0]])


VARIANTS = {
    "postnorm": dict(prenorm=False),
    "no_residual": dict(residual=False),
    "no_residual_stream_fp32": dict(residual=False, residual_in_fp32=True),
    "no_bias": dict(bias=False),
    "no_weight": dict(weight=None),
    "weight_fp32": dict(weight="fp32"),
    "modulation": dict(modulation=True),
    "modulation_postnorm_no_weight": dict(modulation=True, prenorm=False, weight=None),
}


def _reachable(variant, pair):
    """Without a residual the stream dtype is x's, or float32 with residual_in_fp32: only those pairs."""
    options = VARIANTS[variant]
    if options.get("residual", True):
        return True
    return pair[1] == (f32 if options.get("residual_in_fp32") else pair[0])


@pytest.mark.parametrize("variant,pair", [pytest.param(v, p, id=f"{v}-{i}") for v in VARIANTS
                                          for p, i in zip(PAIRS, PAIR_IDS) if _reachable(v, p)])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_matches_oracle_variants(variant, pair, rms):
    assert_backend_matches_oracle("torch", norm_case((2, 3, 1000), pair, rms, **VARIANTS[variant]),
                                  dtypes=[pair[0]])


def test_norm_modulation_with_one_row_per_sample_and_one_sample_for_all():
    for shape in [(9, 64), (1, 7, 300)]:
        case = Case("ln modulation", str(shape),
                    lambda: dict(x=_randn(*shape), shift=_randn(shape[0], shape[-1]),
                                 scale=_randn(shape[0], shape[-1], scale=0.3)),
                    lambda x, shift, scale: (mmkern.layer_norm_residual(x, modulation=(shift, scale)),),
                    cast=("x", "shift", "scale"), grad=("x", "shift", "scale"))
        assert_backend_matches_oracle("torch", case, dtypes=DTYPES)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("modulation", [False, True])
def test_norm_of_an_empty_batch(rms, modulation):
    """x (0, 3, N): every output and gradient empty (or zero: the reduced gradients), like the oracle's."""
    case = norm_case((0, 3, 33), (bf16, f32), rms, modulation=modulation)
    assert_backend_matches_oracle("torch", case, dtypes=[bf16])
    x, r = torch.zeros(0, 33, device=DEVICE), torch.zeros(0, 33, device=DEVICE)
    w = torch.ones(33, device=DEVICE, requires_grad=True)
    with forced("torch"):
        out, pre = mmkern.layer_norm_residual(x.requires_grad_(), r, w, prenorm=True)
        (dw,) = torch.autograd.grad(out.sum() + pre.sum(), (w,))
    assert out.shape == pre.shape == (0, 33) and torch.equal(dw, torch.zeros(33, device=DEVICE))


def _forward(backend, x, residual=None, weight=None, bias=None, residual_in_fp32=False, is_rms_norm=False):
    with mmkern.backend(backend):
        return torch.ops.mmkern.norm_residual_forward(x, residual, weight, bias, 1e-5, 0.0, None, residual_in_fp32,
                                                      is_rms_norm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_statistics_are_float32_and_match_the_oracle(dtype, rms):
    """mean and rstd: float32 (rows,), mean empty for RMSNorm; the statistics of the rows (in float32, so within
    float32 rounding of the float64 oracle's on the same rounded x)."""
    x = (_randn(5, 300) * 3 + 1).to(dtype)
    _, _, mean, rstd = _forward("torch", x, is_rms_norm=rms)
    _, _, ref_mean, ref_rstd = _forward("reference", x, is_rms_norm=rms)
    assert mean.dtype == rstd.dtype == f32 and rstd.shape == (5,) and mean.shape == ((0,) if rms else (5,))
    assert max_abs_err(rstd, ref_rstd) <= 1e-5 * ref_rstd.abs().max().item()
    if not rms:
        assert max_abs_err(mean, ref_mean) <= 1e-5 * (1 + ref_mean.abs().max().item())


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_norm_outputs_are_new_contiguous_tensors_of_the_contract_dtypes(pair):
    """Strided rows in (a slice of a wider buffer): out like x, pre in the stream dtype, both contiguous and new;
    without a residual, pre is a copy of x, never x itself."""
    x_dtype, stream_dtype = pair
    x = _randn(4, 40, dtype=x_dtype)[:, :33]
    residual = _randn(4, 33, dtype=stream_dtype) if stream_dtype != x_dtype else None
    out, pre, mean, rstd = _forward("torch", x, residual, residual_in_fp32=stream_dtype == f32)
    for t in (out, pre, mean, rstd):
        assert t.is_contiguous() and t.data_ptr() not in (x.data_ptr(), 0 if residual is None else residual.data_ptr())
    assert out.dtype == x_dtype and pre.dtype == stream_dtype and out.shape == pre.shape == (4, 33)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_opcheck_through_the_torch_backend(rms):
    x, r, w, b = _randn(3, 40, dtype=f32), _randn(3, 40, dtype=f32), _randn(40, dtype=f32), _randn(40, dtype=f32)
    shift, scale = _randn(3, 40, dtype=f32), _randn(3, 40, dtype=f32)
    with mmkern.backend("torch"):
        torch.library.opcheck(torch.ops.mmkern.norm_residual_forward,
                              (x.requires_grad_(), r, w.requires_grad_(), None if rms else b, 1e-5, 0.0, None, False,
                               rms, shift.requires_grad_(), scale.requires_grad_()),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        pre = (x + r).detach()
        torch.library.opcheck(torch.ops.mmkern.norm_residual_backward,
                              (_randn(3, 40, dtype=f32), _randn(3, 40, dtype=f32), pre, w.detach(),
                               None if rms else b, torch.empty(0, device=DEVICE), torch.empty(3, device=DEVICE),
                               1e-5, 0.0, None, rms, True, f32, shift.detach(), scale.detach()),
                              test_utils=("test_schema", "test_faketensor"))


def test_norm_dropout_is_refused_and_p_zero_is_taken():
    x = _randn(4, 16, dtype=f32)
    inputs = dict(x=x, residual=None, weight=None, bias=None, eps=1e-5, dropout_p=0.0, dropout_seed=None,
                  residual_in_fp32=False, is_rms_norm=False)
    problem = dispatch.problem("norm_residual_forward", **inputs)
    assert dispatch.not_supported_reasons("norm_residual_forward", "torch", problem) == []
    dropout = dispatch.problem("norm_residual_forward", **dict(inputs, dropout_p=0.1,
                                                               dropout_seed=torch.tensor([7])))
    (reason,) = dispatch.not_supported_reasons("norm_residual_forward", "torch", dropout)
    assert "dropout_p = 0.1 > 0" in reason and "seed" in reason
    with mmkern.backend("torch"), pytest.raises(mmkern.NoBackendError, match="torch: dropout_p = 0.5 > 0"):
        mmkern.layer_norm_residual(x, dropout_p=0.5)
    with forced("torch"):                           # dropout_p = 0: no dropout, the torch backend takes it
        out = mmkern.layer_norm_residual(x, dropout_p=0.0)
    assert max_abs_err(out, torch.nn.functional.layer_norm(x, (16,))) < 1e-6


def test_norm_float64_goes_to_the_reference():
    x = _randn(4, 16)
    problem = dispatch.problem("norm_residual_forward", x=x, residual=None, weight=None, bias=None, eps=1e-5,
                               dropout_p=0.0, dropout_seed=None, residual_in_fp32=False, is_rms_norm=False)
    assert "float64 x" in dispatch.not_supported_reasons("norm_residual_forward", "torch", problem)[0]
    with mmkern.backend("torch"), pytest.raises(mmkern.NoBackendError, match="float64 x"):
        mmkern.rms_norm_residual(x)


def test_norm_rms_backward_fallback_of_an_older_torch(monkeypatch):
    """Without aten._fused_rms_norm (torch < 2.9?) the RMSNorm forward is F.rms_norm and the backward the eager
    formula: the same criterion."""
    from mmkern.torch_backend import norm as torch_norm
    monkeypatch.setattr(torch_norm, "_FUSED_RMS_NORM", False)
    for pair in [(f32, f32), (bf16, f32)]:
        assert_backend_matches_oracle("torch", norm_case((2, 3, 257), pair, True), dtypes=[pair[0]])


# --------------------------------------------------------------------------- diffusion: noise schedule

T = 1000


def _ac(schedule="linear", table=torch.float32, **kw):
    return D.NoiseSchedule(beta_schedule=schedule, **kw).alphas_cumprod.to(table).to(DEVICE)


def _t(values):
    return torch.tensor(values, device=DEVICE, dtype=torch.int64)


_SIGMAS = torch.cat([torch.linspace(14.6, 0.03, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("op", ["add_noise", "get_velocity", "training_target_v", "euler_add_noise"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1, 1), (3,), (2, 1031), (0, 4)], ids=str)
@pytest.mark.parametrize("timesteps", ["per_sample", "single"])
@pytest.mark.parametrize("table", [torch.float32, torch.float64])
def test_noise_ops_match_oracle(op, shape, timesteps, table):
    if op == "euler_add_noise":
        ac, n_table = _SIGMAS.to(table).to(DEVICE), 11
    else:
        ac, n_table = _ac(table=table), T
    if timesteps == "per_sample":
        t = torch.randint(0, n_table, (shape[0],), device=DEVICE, dtype=torch.int32)
        if shape[0] > 1:
            t[0], t[-1] = 0, n_table - 1                 # both ends of the schedule
    else:
        t = torch.tensor(n_table - 1, device=DEVICE)
    fn = {"add_noise": D.add_noise, "get_velocity": D.get_velocity, "euler_add_noise": D.euler_add_noise,
          "training_target_v": lambda x, n, t, ac: D.training_target(x, n, t, ac, "v_prediction")}[op]
    case = Case(op, str(shape), lambda: dict(x=_randn(*shape), n=_randn(*shape)), lambda x, n: (fn(x, n, t, ac),),
                cast=("x", "n"))
    assert_backend_matches_oracle("torch", case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_ops_gradients_through_the_torch_backend(dtype):
    ac = _ac()
    x = _randn(3, 4, dtype=dtype).requires_grad_()
    n = _randn(3, 4, dtype=dtype).requires_grad_()
    t = _t([0, 10, 999])
    with forced("torch"):
        D.get_velocity(x, n, t, ac).backward(torch.ones(3, 4, dtype=dtype, device=DEVICE))
    a = ac.double()[t].view(-1, 1)
    assert torch.allclose(x.grad.double(), -(1 - a).sqrt().expand(3, 4), atol=1e-2)
    assert torch.allclose(n.grad.double(), a.sqrt().expand(3, 4), atol=1e-2)


# --------------------------------------------------------------------------- diffusion: loss

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("shape,timesteps", [((4, 3, 5, 7), [0, 1, 500, 999]), ((3, 1031), [999, 3, 7]),
                                              ((2,), 17), ((1, 40000), [600]), ((0, 4), [])], ids=str)
def test_loss_and_gradient_match_oracle(prediction_type, snr_gamma, shape, timesteps):
    ac = _ac(table=torch.float64 if snr_gamma else torch.float32)
    t = _t(timesteps) if isinstance(timesteps, list) else timesteps
    case = Case("diffusion_loss", str(shape), lambda: dict(mo=_randn(*shape), x0=_randn(*shape), n=_randn(*shape)),
                lambda mo, x0, n: (D.diffusion_loss(mo, x0, n, t, ac, prediction_type, snr_gamma),),
                cast=("mo", "x0", "n"), grad=("mo", "x0", "n"))
    assert_backend_matches_oracle("torch", case, reduced_elements=max(math.prod(shape), 1))


def test_loss_with_zero_terminal_snr_is_finite():
    """a_t = 0 at the last step of a zero-terminal-SNR schedule: the Min-SNR weights take their limits (1 for
    epsilon), no inf/NaN, as the oracle."""
    ac = _ac("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        case = Case("diffusion_loss zero snr", "(2, 3, 4)",
                    lambda: dict(mo=_randn(2, 3, 4), x0=_randn(2, 3, 4), n=_randn(2, 3, 4)),
                    lambda mo, x0, n: (D.diffusion_loss(mo, x0, n, _t([0, 999]), ac, prediction_type, 5.0),),
                    cast=("mo", "x0", "n"), grad=("mo",))
        assert_backend_matches_oracle("torch", case, dtypes=[f32], reduced_elements=24)


# --------------------------------------------------------------------------- diffusion: sampler steps

def _step_case(name, shape, run):
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
    # far from t = 0 (in bfloat16 a_t rounds to 1 up to t ~ 20: the eager baseline divides by 0 there)
    t, prev = _t([150, 300, 600, 999]), _t([50, 200, 500, 899])
    learned = variance_type.startswith("learned")

    def run(mo, s, n):
        if learned:   # the variance channels: positive for "learned", a fraction in [-1, 1] for learned_range
            v = mo.abs() * 0.01 if variance_type == "learned" else torch.tanh(mo)
            mo = torch.cat([mo, v], 1)
        return D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n, prediction_type=prediction_type,
                           variance_type=variance_type, **CLIP[clip])
    assert_backend_matches_oracle("torch", _step_case("ddpm_step", (4, 3, 5, 7), run),
                                  conditioning=2.0)   # x0 at t = 999 amplifies a rounding 156x (conftest)


@pytest.mark.parametrize("variance_type", ["fixed_large", "learned_range"])
def test_ddpm_step_at_t0_adds_no_noise(variance_type):
    """t = 0 (and t = 1, whose previous step is t = 0): the mean only where t = 0, even with a variance that is not
    ~0 there (fixed_large: beta_0; fixed_small's posterior variance vanishes at t = 0 anyway). Float32: in half
    precision a_t rounds to 1 near t = 0."""
    ac = _ac()
    t, prev = _t([0, 1, 500, 0]), _t([-1, 0, 400, -1])

    def run(mo, s, n):
        if variance_type == "learned_range":
            mo = torch.cat([mo, torch.tanh(mo)], 1)
        return D.ddpm_step(mo, t, s, ac, prev_timesteps=prev, noise=n * 100, variance_type=variance_type)
    assert_backend_matches_oracle("torch", _step_case("ddpm_step t0", (4, 2, 3), run), dtypes=[f32])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta,clip,clipped", [(0.0, "none", False), (0.5, "clip", True), (1.0, "threshold", False),
                                              (1.0, "threshold", True)])
def test_ddim_step_matches_oracle(prediction_type, eta, clip, clipped):
    ac = _ac("scaled_linear", beta_start=0.00085, beta_end=0.012)
    t, prev = _t([41, 60, 520, 999]), _t([-1, 40, 500, 979])      # (bfloat16 rounds a_t to 1 below t ~ 40)

    def run(mo, s, n):
        return D.ddim_step(mo, t, s, ac, prev, final_alpha_cumprod=ac[0].item(), eta=eta, noise=n,
                           prediction_type=prediction_type, use_clipped_model_output=clipped, **CLIP[clip])
    assert_backend_matches_oracle("torch", _step_case("ddim_step", (4, 2, 3, 11), run))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "original_sample"])
@pytest.mark.parametrize("churn", [{}, dict(s_churn=3.0, s_noise=1.01), dict(s_churn=3.0, s_tmin=0.5, s_tmax=4.0)])
def test_euler_step_and_scale_match_oracle(prediction_type, churn):
    sigmas = _SIGMAS.float().to(DEVICE)
    i = _t([0, 3, 9])

    def run(mo, s, n):
        return D.euler_step(mo, i, s, sigmas, noise=n if churn else None, prediction_type=prediction_type, **churn)
    assert_backend_matches_oracle("torch", _step_case("euler_step", (3, 4, 9), run))
    scale = Case("euler_scale_model_input", "(3, 4, 9)", lambda: dict(s=_randn(3, 4, 9)),
                 lambda s: (D.euler_scale_model_input(s, i, sigmas),), cast=("s",))
    assert_backend_matches_oracle("torch", scale)


@pytest.mark.parametrize("shape", [(0, 3), (1,), (2, 1031)], ids=str)
def test_steps_of_awkward_shapes_match_oracle(shape):
    """An empty batch, a batch of one 0-d... (B,) samples, odd sizes; one 0-d timestep for the batch."""
    ac, sigmas = _ac(), _SIGMAS.float().to(DEVICE)
    steps = {
        "ddpm_step": lambda mo, s, n: D.ddpm_step(mo, 500, s, ac, noise=n, variance_type="fixed_large"),
        "ddim_step": lambda mo, s, n: D.ddim_step(mo, 500, s, ac, 480, eta=1.0, noise=n, thresholding=True),
        "euler_step": lambda mo, s, n: D.euler_step(mo, 4, s, sigmas, noise=n, s_churn=2.0),
    }
    for name, run in steps.items():
        assert_backend_matches_oracle("torch", _step_case(name, shape, run))


def test_step_outputs_are_new_contiguous_tensors_and_euler_x0_is_float32():
    ac, sigmas = _ac(), _SIGMAS.float().to(DEVICE)
    mo, s = _randn(2, 6, dtype=bf16)[:, ::2], _randn(2, 3, dtype=bf16)
    with forced("torch"):
        results = [*D.ddpm_step(mo, 10, s, ac), *D.ddim_step(mo, 10, s, ac, 5),
                   *D.euler_step(mo, 3, s, sigmas, prediction_type="sample"), D.euler_scale_model_input(s, 3, sigmas),
                   D.euler_add_noise(s, s, 3, sigmas)]
    for r in results:
        assert r.is_contiguous() and r.shape == (2, 3) and r.data_ptr() not in (mo.data_ptr(), s.data_ptr())
    assert [r.dtype for r in results] == [bf16] * 5 + [f32] + [bf16] * 2     # euler's x0: at least float32


def test_diffusion_float64_goes_to_the_reference():
    x = _randn(2, 3)
    problem = dispatch.problem("add_noise", samples=x, noise=x, timesteps=_t(3), alphas_cumprod=_ac())
    assert "original_samples has dtype torch.float64" in dispatch.not_supported_reasons("add_noise", "torch",
                                                                                         problem)[0]
    with mmkern.backend("torch"), pytest.raises(mmkern.NoBackendError, match="sample has dtype torch.float64"):
        D.euler_scale_model_input(x, 3, _SIGMAS.float().to(DEVICE))
    with mmkern.dispatch_log() as log:            # auto: past torch, to the reference
        D.add_noise(x, x, 3, _ac())
    assert log.backends("add_noise") == {"reference"}


def test_diffusion_opcheck_through_the_torch_backend():
    ac, x, t = _ac(), _randn(3, 4, dtype=f32), _t([0, 5, 999])
    with mmkern.backend("torch"):
        for op, args in [(torch.ops.mmkern.add_noise, (x.requires_grad_(), x, t, ac)),
                         (torch.ops.mmkern.diffusion_loss, (x, x * 0.5, x.detach(), t, ac, "v_prediction", 5.0)),
                         (torch.ops.mmkern.ddpm_step, (x.detach(), x.detach(), t, t - 1, ac, x.detach(), "epsilon",
                                                       "fixed_small", 1.0, 0.0, 1.0)),
                         (torch.ops.mmkern.euler_step, (x.detach(), x.detach(), _t([0, 1, 2]),
                                                        _SIGMAS.float().to(DEVICE), None, "epsilon", 0.0, 0.0,
                                                        math.inf, 1.0))]:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                        "test_autograd_registration"))
