"""The memory-bound C++ CPU kernels (norms, diffusion) against this machine's memory bandwidth, side by side with
what a CPU user can also reach for, in one run (issue 21):

    copy               dst.copy_(src) of one tensor of the row's size into a buffer already mapped: the roof of
                       the row (2 tensors moved), measured in the same run as the ops
    mmkern_cpu         the op forced onto mmkern's cpu backend (C++ kernels, output buffers recycled:
                       csrc/common/cpu_output.h)
    mmkern_cpu_fresh   the same with the output cache off (every output a fresh allocation, huge pages asked
                       for from 8 MiB): what page faults cost, the first-touch figure
    torch_eager        the same expression in eager torch
    torch_compile      torch.compile of that expression (inductor's C++ kernels; compiled in the warm-up)
    diffusers          diffusers' DDPMScheduler.add_noise / DDIMScheduler.step (the diffusion ops; needs diffusers)

ops (S = bytes per tensor):
    layer_norm_residual  out, pre = LayerNorm(x + residual), pre  (no grad)  hidden 1024   moves 4 S
    rms_norm_residual    the same with RMSNorm                                              moves 4 S
    add_noise            sqrt(a_t) x0 + sqrt(1 - a_t) noise, per-sample t, samples (8, 4, n)   moves 3 S
    ddim_step            eta 0, epsilon prediction: prev sample and predicted x0               moves 4 S
Sizes: 1, 4, 32 and 256 MiB per tensor (MMKERN_BENCH_SIZES=quick: 1 and 32), float32, bfloat16, float16.
extra_info["GB/s"] counts those bytes at the median round, and "copy_fraction" divides it by the run's copy
ceiling (64 MiB, machine_info). The issue's goals (no timed assertion here): mmkern_cpu >= 1.0x torch_compile
in every row, at least 60% of the copy bandwidth from 32 MiB up, add_noise and ddim_step >= 2x diffusers.
A smoke run (--benchmark-disable, CI) calls the 1 MiB rows once each; the larger rows are for timed runs.
"""
import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import QUICK, skip_unless_backend

D = mmkern.diffusion
OPS = {"layer_norm_residual": 4, "rms_norm_residual": 4, "add_noise": 3, "ddim_step": 4}   # tensors moved
SIZES_MIB = [1, 32] if QUICK else [1, 4, 32, 256]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["copy", "mmkern_cpu", "mmkern_cpu_fresh", "torch_eager", "torch_compile", "diffusers"]
HIDDEN = 1024
T, STEPS, T_STEP = 1000, 50, 10           # the DDIM schedule: 50 of 1000 steps, the 10th


def _layer_norm_residual(x, residual, weight, bias):
    pre = x + residual
    return F.layer_norm(pre, (x.shape[-1],), weight, bias), pre


def _rms_norm_residual(x, residual, weight, bias):
    pre = x + residual
    return F.rms_norm(pre, (x.shape[-1],), weight, 1e-6), pre


def _add_noise(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _ddim_step(model_output, sample, t, prev, alphas_cumprod):
    a_t, a_prev = alphas_cumprod[t].to(sample.dtype), alphas_cumprod[prev].to(sample.dtype)
    x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * model_output, x0


EAGER = {"layer_norm_residual": _layer_norm_residual, "rms_norm_residual": _rms_norm_residual,
         "add_noise": _add_noise, "ddim_step": _ddim_step}
_COMPILED = {}


def _compiled(op):
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(EAGER[op])
    return _COMPILED[op]


def _schedule():
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64).square().neg().add(1).cumprod(0) \
        .to(torch.float32)


def _inputs(op, mib, dtype):
    """The op's arguments for `mib` MiB per tensor, and the mmkern call on them."""
    numel = mib * 2**20 // dtype.itemsize
    if op in ("layer_norm_residual", "rms_norm_residual"):
        x, residual = (torch.randn(numel // HIDDEN, HIDDEN, dtype=dtype) for _ in range(2))
        weight, bias = torch.randn(HIDDEN, dtype=dtype), torch.randn(HIDDEN, dtype=dtype)
        if op == "layer_norm_residual":
            args = (x, residual, weight, bias)
            mine = lambda: mmkern.layer_norm_residual(x, residual, weight, bias, prenorm=True)  # noqa: E731
        else:
            args = (x, residual, weight, None)
            mine = lambda: mmkern.rms_norm_residual(x, residual, weight, eps=1e-6, prenorm=True)  # noqa: E731
        return args, mine
    a, b = (torch.randn(8, 4, numel // 32, dtype=dtype) for _ in range(2))
    alphas_cumprod = _schedule()
    if op == "add_noise":
        t = torch.randint(0, T, (8,))
        return (a, b, t, alphas_cumprod), lambda: D.add_noise(a, b, t, alphas_cumprod)
    t = T - 1 - T_STEP * (T // STEPS)
    prev = t - T // STEPS
    return (a, b, t, prev, alphas_cumprod), lambda: D.ddim_step(a, t, b, alphas_cumprod, prev, eta=0.0)


def _diffusers_call(op, args):
    diffusers = pytest.importorskip("diffusers")
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=T)
    if op == "add_noise":
        scheduler = diffusers.DDPMScheduler(**config)
        x0, noise, t, _ = args
        return lambda: scheduler.add_noise(x0, noise, t)
    scheduler = diffusers.DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(STEPS)
    model_output, sample, t, _, _ = args
    return lambda: scheduler.step(model_output, t, sample, eta=0.0)


def _row(benchmark, op, mib, dtype, impl, smallest) -> dict:
    """Skips what this run does not time, names the row's group; returns its extra_info."""
    if benchmark.disabled and mib > smallest:
        pytest.skip("the smoke run (--benchmark-disable) calls the smallest rows; the larger ones are timed runs")
    if impl.startswith("mmkern"):
        skip_unless_backend("cpu")
    name = str(dtype).replace("torch.", "")
    benchmark.group = f"cpu bandwidth {op} {mib}MiB {name}"
    torch.manual_seed(0)
    return dict(op=op, impl=impl, series=f"cpu bandwidth {op} {name}", x=mib, x_label="MiB per tensor",
                shape=f"{mib}MiB", dtype=name, threads=torch.get_num_threads())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mib", SIZES_MIB, ids=lambda m: f"{m}MiB")
@pytest.mark.parametrize("op,impl", [(op, impl) for op in OPS for impl in IMPLS
                                     if impl != "diffusers" or op in ("add_noise", "ddim_step")])
def test_cpu_bandwidth(bench, benchmark, op, mib, dtype, impl):
    info = _row(benchmark, op, mib, dtype, impl, SIZES_MIB[0])
    args, mine = _inputs(op, mib, dtype)
    if impl == "copy":
        src = args[0]
        dst = torch.empty_like(src).copy_(src)                 # mapped before the clock starts
        bench(dst.copy_, src, bytes=2 * src.nbytes, device="cpu", **info)
        return
    bytes_moved = OPS[op] * args[0].nbytes
    if impl in ("mmkern_cpu", "mmkern_cpu_fresh"):
        from mmkern import native
        limit = native.cpu_output_cache()["limit_mib"]

        def fn():
            with mmkern.backend("cpu"):
                return mine()
        try:
            if impl == "mmkern_cpu_fresh":
                native.cpu_output_cache(limit_mib=0)
            with torch.no_grad():
                bench(fn, bytes=bytes_moved, device="cpu", **info)
        finally:
            native.cpu_output_cache(limit_mib=limit)
        return
    if impl == "diffusers":
        fn = _diffusers_call(op, args)
    else:
        target = EAGER[op] if impl == "torch_eager" else _compiled(op)
        fn = lambda: target(*args)  # noqa: E731
    with torch.no_grad():
        bench(fn, bytes=bytes_moved, device="cpu", **info)



# --------------------------------------------------------------------------- the other ops and variants

# The rest of the norm and diffusion ops, forward and backward, with dropout and adaLN modulation, at 1 MiB
# (the smoke run's row) and 32 MiB per tensor (the bandwidth goal's size), against eager and torch.compile of the
# same expression (diffusers' get_velocity too). "+ backward" rows time the forward and torch.autograd.grad of
# it together: a training step's work. Tensors moved (S = bytes per tensor):
#   layer_norm_dropout        LayerNorm(dropout(x, 0.1) + residual), pre                        4 S
#   layer_norm_modulation     adaLN: LayerNorm(x + residual) * (1 + scale[b]) + shift[b], pre    4 S
#   layer_norm_backward       out = LayerNorm(x + residual), + its gradients in x and residual   4 S + 3 S
#   rms_norm_backward         the same with RMSNorm                                               4 S + 3 S
#   get_velocity              sqrt(a_t) noise - sqrt(1 - a_t) x                                  3 S
#   ddpm_step                 epsilon, fixed_small, with noise: prev sample and predicted x0     5 S
#   euler_step                epsilon, no churn: prev sample and predicted x0                    4 S
#   diffusion_loss_backward   mean((model_output - noise)^2) and its gradient in model_output    3 S + 3 S
# (the eager rows' temporaries move more; the bytes are the fused op's.) The torch rows' dropout draws its own
# mask. Timed runs: MMKERN_BENCH_SIZES=quick keeps these to 1 MiB; the full run adds 32 MiB.
VARIANTS = {"layer_norm_dropout": 4, "layer_norm_modulation": 4, "layer_norm_backward": 7, "rms_norm_backward": 7,
            "get_velocity": 3, "ddpm_step": 5, "euler_step": 4, "diffusion_loss_backward": 6}
VARIANT_SIZES_MIB = [1] if QUICK else [1, 32]
T_DDPM, EULER_STEP = 500, 10


def _norm_inputs(numel, dtype, grad):
    x, residual = (torch.randn(numel // HIDDEN, HIDDEN, dtype=dtype, requires_grad=grad) for _ in range(2))
    weight, bias = torch.randn(HIDDEN, dtype=dtype), torch.randn(HIDDEN, dtype=dtype)
    return x, residual, weight, bias


def _variant(op, mib, dtype):
    """(mmkern call, eager expression, its arguments, diffusers call or None) for one variant row."""
    numel = mib * 2**20 // dtype.itemsize
    if op == "layer_norm_dropout":
        x, residual, weight, bias = _norm_inputs(numel, dtype, False)

        def eager(x, residual, weight, bias):
            pre = F.dropout(x, 0.1) + residual
            return F.layer_norm(pre, (HIDDEN,), weight, bias), pre
        mine = lambda: mmkern.layer_norm_residual(x, residual, weight, bias, 0.1, prenorm=True)  # noqa: E731
        return mine, eager, (x, residual, weight, bias), None
    if op == "layer_norm_modulation":
        x, residual = (torch.randn(8, numel // HIDDEN // 8, HIDDEN, dtype=dtype) for _ in range(2))
        weight, bias = torch.randn(HIDDEN, dtype=dtype), torch.randn(HIDDEN, dtype=dtype)
        shift, scale = torch.randn(8, HIDDEN, dtype=dtype), torch.randn(8, HIDDEN, dtype=dtype)

        def eager(x, residual, weight, bias, shift, scale):
            pre = x + residual
            out = F.layer_norm(pre, (HIDDEN,), weight, bias)
            return out * (1 + scale[:, None]) + shift[:, None], pre
        mine = lambda: mmkern.layer_norm_residual(x, residual, weight, bias, prenorm=True,  # noqa: E731
                                                  modulation=(shift, scale))
        return mine, eager, (x, residual, weight, bias, shift, scale), None
    if op in ("layer_norm_backward", "rms_norm_backward"):
        x, residual, weight, bias = _norm_inputs(numel, dtype, True)
        dout = torch.randn_like(x)
        rms = op == "rms_norm_backward"

        def forward(x, residual, weight, bias):
            pre = x + residual
            return F.rms_norm(pre, (HIDDEN,), weight, 1e-6) if rms else F.layer_norm(pre, (HIDDEN,), weight, bias)

        def mine():
            out = (mmkern.rms_norm_residual(x, residual, weight, 1e-6) if rms
                   else mmkern.layer_norm_residual(x, residual, weight, bias))
            return torch.autograd.grad(out, (x, residual), dout)
        return mine, forward, (x, residual, weight, bias), dout
    a, b = (torch.randn(8, 4, numel // 32, dtype=dtype) for _ in range(2))
    alphas_cumprod = _schedule()
    if op == "get_velocity":
        t = torch.randint(0, T, (8,))

        def eager(x, noise, t, alphas_cumprod):
            s = alphas_cumprod[t].to(x.dtype).view(-1, 1, 1)
            return s.sqrt() * noise - (1 - s).sqrt() * x

        def with_diffusers():
            diffusers = pytest.importorskip("diffusers")
            scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                num_train_timesteps=T)
            return lambda: scheduler.get_velocity(a, b, t)
        return lambda: D.get_velocity(a, b, t, alphas_cumprod), eager, (a, b, t, alphas_cumprod), with_diffusers
    if op == "ddpm_step":
        noise = torch.randn_like(a)
        t = torch.tensor(T_DDPM)

        def eager(model_output, sample, noise, t, alphas_cumprod):
            a_t, a_prev = alphas_cumprod[t].to(sample.dtype), alphas_cumprod[t - 1].to(sample.dtype)
            alpha_t = a_t / a_prev
            x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
            mean = (a_prev.sqrt() * (1 - alpha_t) * x0 + alpha_t.sqrt() * (1 - a_prev) * sample) / (1 - a_t)
            variance = ((1 - a_prev) / (1 - a_t) * (1 - alpha_t)).clamp(min=1e-20)
            return mean + variance.sqrt() * noise, x0
        mine = lambda: D.ddpm_step(a, T_DDPM, b, alphas_cumprod, noise=noise)  # noqa: E731
        return mine, eager, (a, b, noise, t, alphas_cumprod), None
    if op == "euler_step":
        sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt().flip(0)[::T // STEPS] \
            .float().contiguous()
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        i = torch.tensor(EULER_STEP)

        def eager(model_output, sample, i, sigmas):
            sigma, sigma_next = sigmas[i].to(sample.dtype), sigmas[i + 1].to(sample.dtype)
            x0 = sample - sigma * model_output
            return sample + (sample - x0) / sigma * (sigma_next - sigma), x0
        return lambda: D.euler_step(a, EULER_STEP, b, sigmas), eager, (a, b, i, sigmas), None
    noise = torch.randn_like(a)
    model_output = a.requires_grad_()
    t = torch.randint(0, T, (8,))

    def loss(model_output, noise):
        return F.mse_loss(model_output.float(), noise.float())

    def mine():
        return torch.autograd.grad(D.diffusion_loss(model_output, b, noise, t, alphas_cumprod), model_output)
    return mine, loss, (model_output, noise), "loss"


def _torch_variant(op, expression, args, extra):
    """The eager or compiled call of a variant row (extra: dout of a norm backward, "loss" for the loss)."""
    if op in ("layer_norm_backward", "rms_norm_backward"):
        x, residual = args[:2]
        return lambda: torch.autograd.grad(expression(*args), (x, residual), extra)
    if op == "diffusion_loss_backward":
        return lambda: torch.autograd.grad(expression(*args), args[0])
    return lambda: expression(*args)


_COMPILED_VARIANTS = {}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mib", VARIANT_SIZES_MIB, ids=lambda m: f"{m}MiB")
@pytest.mark.parametrize("op,impl", [(op, impl) for op in VARIANTS
                                     for impl in ("mmkern_cpu", "torch_eager", "torch_compile", "diffusers")
                                     if impl != "diffusers" or op == "get_velocity"])
def test_cpu_bandwidth_variants(bench, benchmark, op, mib, dtype, impl):
    info = _row(benchmark, op, mib, dtype, impl, VARIANT_SIZES_MIB[0])
    mine, expression, args, extra = _variant(op, mib, dtype)
    bytes_moved = VARIANTS[op] * mib * 2**20
    grad = op.endswith("_backward")
    if impl == "mmkern_cpu":
        def fn():
            with mmkern.backend("cpu"):
                return mine()
    elif impl == "diffusers":
        fn = extra()
    else:
        if impl == "torch_compile":
            expression = _COMPILED_VARIANTS.setdefault(op, torch.compile(expression))
        fn = _torch_variant(op, expression, args, extra)
    with torch.enable_grad() if grad else torch.no_grad():
        bench(fn, bytes=bytes_moved, device="cpu", **info)
