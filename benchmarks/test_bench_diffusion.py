"""Diffusion ops: mmkern's fused Triton kernels against what a diffusers user runs, side by side:

    device_copy     x.clone(): the copy bandwidth of this device, the roof for these memory-bound ops
    mmkern_cuda, mmkern_triton, mmkern_torch
                    mmkern.diffusion.* forced onto each of mmkern's backends (mmkern_torch: torch's eager
                    formulas behind mmkern's op, the per-call cost of the op layer on torch's arithmetic)
    diffusers_eager diffusers' own scheduler methods when diffusers is installed, else the same code
                    written out here (diffusers' arithmetic, timestep given as a Python int)
    torch_compile   the written-out eager code under torch.compile (inductor)

ops: add_noise (per-sample timesteps), loss forward+backward (epsilon, Min-SNR-5, d model_output),
ddpm_step (fixed_small, clip, noise given), ddim_step (eta = 0), euler_step (no churn).
extra_info["GB/s"] counts the minimum bytes, every tensor read or written once:
    add_noise 3N, loss 5N (fwd: model_output, noise; bwd: model_output, noise, d model_output),
    ddpm_step 5N (model_output, sample, noise -> prev, x0), ddim_step / euler_step 4N
with N = numel * itemsize. Sizes on a GPU: 64x4x128x128 and 16x16x256x256 in bf16 and fp32 (the
issue's goal on an H200: >= 85% of device_copy, >= 3x diffusers' eager step); on a CPU a tiny
smoke-test size, with mmkern_triton only where the Triton backend is usable (TRITON_INTERPRET=1).
MMKERN_BENCH_SIZES=quick (gpu_check.sh) keeps the larger shape. Rates, the L2 flush between rounds and
device-time clocks come from the `bench` fixture (conftest.py).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import mmkern
from conftest import DEVICE, ON_GPU, QUICK, skip_unless_backend

D = mmkern.diffusion
SHAPES = [(64, 4, 128, 128), (16, 16, 256, 256)] if ON_GPU else [(2, 4, 16, 16)]
if ON_GPU and QUICK:
    SHAPES = [(16, 16, 256, 256)]
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
IMPLS = ["device_copy", "mmkern_cuda", "mmkern_triton", "mmkern_torch", "diffusers_eager", "torch_compile"]
OPS = {"add_noise": 3, "loss_fwd_bwd": 5, "ddpm_step": 5, "ddim_step": 4, "euler_step": 4}
T_STEP, PREV_STEP = 501, 481          # a DDIM/DDPM step of a 50-step schedule
GAMMA = 5.0


def _schedule():
    return D.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# ---------------------------------------------------------------- diffusers' arithmetic, written out

def eager_add_noise(x0, noise, t, ac):
    a = ac.to(x0.dtype)[t].flatten().view(-1, *([1] * (x0.dim() - 1)))
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def eager_loss(pred, noise, t, ac):     # train_text_to_image.py with --snr_gamma, epsilon
    a = ac[t]
    snr = a / (1 - a)
    w = torch.stack([snr, GAMMA * torch.ones_like(t, dtype=snr.dtype)], dim=1).min(dim=1)[0] / snr
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.dim()))) * w).mean()


def eager_ddpm_step(mo, s, noise, ac):
    a, a_prev = ac[T_STEP], ac[PREV_STEP]
    b, b_prev = 1 - a, 1 - a_prev
    cur_alpha = a / a_prev
    x0 = ((s - b ** 0.5 * mo) / a ** 0.5).clamp(-1, 1)
    prev = (a_prev ** 0.5 * (1 - cur_alpha) / b) * x0 + (cur_alpha ** 0.5 * b_prev / b) * s
    variance = torch.clamp(b_prev / b * (1 - cur_alpha), min=1e-20)
    return prev + variance ** 0.5 * noise, x0


def eager_ddim_step(mo, s, ac):
    a, a_prev = ac[T_STEP], ac[PREV_STEP]
    b = 1 - a
    x0 = (s - b ** 0.5 * mo) / a ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * mo, x0


def eager_euler_step(mo, s, sigmas):
    sample = s.to(torch.float32)
    sigma, sigma_next = sigmas[3], sigmas[4]
    x0 = sample - sigma * mo
    prev = sample + (sample - x0) / sigma * (sigma_next - sigma)
    return prev.to(mo.dtype), x0


# ---------------------------------------------------------------- the implementations

def _impls(op, ac, sigmas, sigmas_cpu):
    t_dev = lambda x: torch.tensor(T_STEP, device=x.device)            # noqa: E731
    mm = {
        "add_noise": lambda x0, noise, t: D.add_noise(x0, noise, t, ac),
        "loss_fwd_bwd": lambda pred, noise, t: torch.autograd.grad(D.diffusion_loss(pred, pred, noise, t, ac,
                                                                                    snr_gamma=GAMMA), pred),
        "ddpm_step": lambda mo, s, noise: D.ddpm_step(mo, t_dev(s), s, ac, prev_timesteps=t_dev(s) - 20, noise=noise,
                                                      clip_sample=True),
        "ddim_step": lambda mo, s, _: D.ddim_step(mo, t_dev(s), s, ac, t_dev(s) - 20),
        "euler_step": lambda mo, s, _: D.euler_step(mo, 3, s, sigmas),
    }[op]
    eager = {
        "add_noise": lambda x0, noise, t: eager_add_noise(x0, noise, t, ac.float()),
        "loss_fwd_bwd": lambda pred, noise, t: torch.autograd.grad(eager_loss(pred, noise, t, ac.float()), pred),
        "ddpm_step": lambda mo, s, noise: eager_ddpm_step(mo, s, noise, ac.float()),
        "ddim_step": lambda mo, s, _: eager_ddim_step(mo, s, ac.float()),
        "euler_step": lambda mo, s, _: eager_euler_step(mo, s, sigmas_cpu),
    }[op]
    return mm, eager


def _diffusers_impl(op):
    """diffusers' own method, or None when diffusers is not installed."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    import diffusers
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if op == "add_noise":
        s = diffusers.DDPMScheduler(**config)
        return lambda x0, noise, t: s.add_noise(x0, noise, t)
    if op == "ddpm_step":
        s = diffusers.DDPMScheduler(**config)
        s.set_timesteps(50)
        return lambda mo, x, noise: s.step(mo, int(s.timesteps[9]), x).prev_sample
    if op == "ddim_step":
        s = diffusers.DDIMScheduler(**config)
        s.set_timesteps(50)
        return lambda mo, x, _: s.step(mo, int(s.timesteps[25]), x).prev_sample
    if op == "euler_step":
        s = diffusers.EulerDiscreteScheduler(**config)
        s.set_timesteps(50)

        def step(mo, x, _):
            s._step_index = 3
            return s.step(mo, s.timesteps[3], x).prev_sample
        return step
    return None     # the loss lives in diffusers' training scripts: the written-out eager code is it


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).replace("torch.", "") for d in DTYPES])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", IMPLS)
def test_diffusion_op(bench, benchmark, impl, op, shape, dtype):
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {dtype}"
    schedule = _schedule()
    ac = schedule.alphas_cumprod.float().to(DEVICE)
    sigmas_cpu = torch.cat([torch.linspace(14.6, 0.03, 50), torch.zeros(1)])
    sigmas = sigmas_cpu.to(DEVICE)
    a, b = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2))
    if op == "loss_fwd_bwd":
        a.requires_grad_()
    third = torch.randint(0, 1000, (shape[0],), device=DEVICE) if op in ("add_noise", "loss_fwd_bwd") else \
        torch.randn(shape, device=DEVICE, dtype=dtype)
    numel_bytes = a.numel() * a.element_size()
    bytes_moved = OPS[op] * numel_bytes
    info = dict(bytes=bytes_moved, shape=str(shape), dtype=str(dtype), op=op, impl=impl,
                series=f"{op} {str(dtype).replace('torch.', '')}", x=a.numel(), x_label="elements")
    if impl == "device_copy":
        bench(lambda x: x.detach().clone(), a, **dict(info, bytes=2 * numel_bytes))
        return
    mm, eager = _impls(op, ac, sigmas, sigmas_cpu)
    if impl.startswith("mmkern_"):
        backend = impl[len("mmkern_"):]
        skip_unless_backend(backend)
        kernel = {"loss_fwd_bwd": "diffusion_loss"}.get(op, op)
        if kernel not in mmkern.dispatch.backends()[backend].kernels:
            pytest.skip(f"mmkern's {backend} backend has no {kernel} kernel yet")

        def fn(*args):
            with mmkern.backend(backend):
                return mm(*args)
    elif impl == "diffusers_eager":
        fn = _diffusers_impl(op) or eager
        info["source"] = "diffusers" if _diffusers_impl(op) else "written out"
    else:
        torch._dynamo.reset()
        fn = torch.compile(eager)
    bench(fn, a, b, third, **info)
