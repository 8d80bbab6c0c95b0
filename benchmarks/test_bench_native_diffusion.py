"""The diffusion ops' C++ CPU kernels (mmkern._C, the `cpu` backend) against diffusers' eager scheduler methods, on
the CPU (issue 6's goal: >= 2x diffusers' eager `add_noise` and `step`).

    diffusers_eager   diffusers' DDPMScheduler / DDIMScheduler: add_noise(x0, noise, t (B,)), step(...)
    mmkern_scheduler  mmkern.diffusion's drop-in subclass of the same scheduler, forced onto the cpu backend
                      (the same call as diffusers'; DDPM draws its noise with the same generator call)
    mmkern_op         the fused op itself (mmkern.diffusion.add_noise / ddpm_step / ddim_step, noise given)

ops: add_noise (per-sample timesteps), ddpm_step (fixed_small, clip_sample, noise drawn), ddim_step (eta 0).
Sizes: a 64x64 latent batch (4x4x64x64) and a larger one (8x4x128x128), float32, on every thread torch uses.
extra_info["GB/s"] counts each tensor read or written once (add_noise 3N, ddpm_step 5N, ddim_step 4N bytes).
"""
import pytest
import torch

import mmkern

D = mmkern.diffusion
SHAPES = [(4, 4, 64, 64), (8, 4, 128, 128)]
IMPLS = ["diffusers_eager", "mmkern_scheduler", "mmkern_op"]
BYTES_PER_ELEMENT = {"add_noise": 3, "ddpm_step": 5, "ddim_step": 4}


@pytest.fixture(scope="module", autouse=True)
def extension():
    from mmkern import build
    build.ensure_built()


def _schedulers(name, impl, **config):
    diffusers = pytest.importorskip("diffusers")
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **config)
    theirs = getattr(diffusers, name)(**config)
    scheduler = theirs if impl == "diffusers_eager" else getattr(D, name).from_config(theirs.config)
    scheduler.set_timesteps(50)
    return scheduler


def _in_cpu_backend(fn):
    def run(*args, **kwargs):
        with mmkern.backend("cpu"):
            return fn(*args, **kwargs)
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(BYTES_PER_ELEMENT))
def test_native_diffusion_cpu(bench, benchmark, op, shape, impl):
    benchmark.group = f"cpu {op} {'x'.join(map(str, shape))} float32"
    torch.manual_seed(0)
    mo, sample, noise = (torch.randn(shape) for _ in range(3))
    nbytes = BYTES_PER_ELEMENT[op] * mo.numel() * mo.element_size()
    if op == "add_noise":
        scheduler = _schedulers("DDPMScheduler", impl)
        t = torch.randint(0, 1000, (shape[0],))
        if impl == "mmkern_op":
            ac = scheduler.alphas_cumprod
            fn, args = _in_cpu_backend(D.add_noise), (sample, noise, t, ac)
        else:
            fn = scheduler.add_noise if impl == "diffusers_eager" else _in_cpu_backend(scheduler.add_noise)
            args = (sample, noise, t)
    else:
        name = "DDPMScheduler" if op == "ddpm_step" else "DDIMScheduler"
        scheduler = _schedulers(name, impl, clip_sample=op == "ddpm_step")
        t = scheduler.timesteps[10]
        if impl == "mmkern_op":
            ac, prev = scheduler.alphas_cumprod, t - 1000 // 50
            if op == "ddpm_step":
                fn = _in_cpu_backend(lambda: D.ddpm_step(mo, int(t), sample, ac, prev_timesteps=int(prev), noise=noise,
                                                         clip_sample=True))
            else:
                fn = _in_cpu_backend(lambda: D.ddim_step(mo, int(t), sample, ac, int(prev), eta=0.0))
        else:
            generator = torch.Generator().manual_seed(0)
            step = (lambda: scheduler.step(mo, t, sample, generator=generator)) if op == "ddpm_step" else \
                (lambda: scheduler.step(mo, t, sample, eta=0.0))
            fn = step if impl == "diffusers_eager" else _in_cpu_backend(step)
        args = ()
    bench(fn, *args, bytes=nbytes, device="cpu", impl=impl, shape=list(shape), dtype="float32",
          threads=torch.get_num_threads())
