"""On a GPU: whole sampling loops and a training step run without one host synchronisation
(torch.cuda.set_sync_debug_mode("error") turns any into an error) and a sampling step can be
captured in a CUDA graph. Skipped without a GPU (the interpreter has no stream to stall)."""
import pytest
import torch

import mmkern

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D = mmkern.diffusion
SHAPE = (2, 4, 16, 16)


def _model(x, t):
    return torch.tanh(x) * 0.5 + 0.01 * t.float()


def _loops(ac, sigmas, generator):
    """Three 10-step loops (DDPM with thresholding, DDIM eta = 1, Euler with churn) on device tables."""
    ts = torch.arange(999, -1, -100, device="cuda")
    prev = ts - 100
    index = torch.arange(len(sigmas), device="cuda")
    x = torch.randn(SHAPE, device="cuda", generator=generator)
    for i in range(len(ts)):             # ts[i]: a 0-d view of a device tensor, no copy, no sync
        noise = torch.randn(SHAPE, device="cuda", generator=generator)
        x, _ = D.ddpm_step(_model(x, ts[i]), ts[i], x, ac, prev_timesteps=prev[i], noise=noise, thresholding=True,
                           dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
        x, _ = D.ddim_step(_model(x, ts[i]), ts[i], x, ac, prev[i], eta=1.0, noise=noise, clip_sample=True)
        xi = D.euler_scale_model_input(x, index[i], sigmas)
        x, _ = D.euler_step(_model(xi, ts[i]), index[i], x, sigmas, noise=noise, s_churn=1.0)
    return x


@pytest.mark.parametrize("table", [torch.float32, torch.float64])
def test_sampling_loops_and_training_step_never_synchronise(table):
    ac = D.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    ac = ac.to("cuda", table)
    sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)]).cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    x0 = torch.randn(SHAPE, device="cuda")
    pred = torch.randn(SHAPE, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (SHAPE[0],), device="cuda")

    def train_step():
        noise = torch.randn(SHAPE, device="cuda", generator=generator)
        x_t = D.add_noise(x0, noise, t, ac)
        loss = D.diffusion_loss(pred * x_t, x0, noise, t, ac, "v_prediction", snr_gamma=5.0)
        loss.backward()
        return loss

    _loops(ac, sigmas, generator), train_step()          # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _loops(ac, sigmas, generator)
        loss = train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all() and torch.isfinite(loss)


def test_sampling_step_captures_in_a_cuda_graph():
    ac = D.NoiseSchedule().alphas_cumprod.cuda()
    sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)]).cuda()
    x, noise = torch.randn(SHAPE, device="cuda"), torch.randn(SHAPE, device="cuda")
    t, prev, i = torch.tensor([500, 900], device="cuda"), torch.tensor([400, 800], device="cuda"), \
        torch.tensor(3, device="cuda")

    def step(x, noise):
        y, _ = D.ddim_step(_model(x, t), t, x, ac, prev, eta=0.5, noise=noise, thresholding=True)
        y, _ = D.ddpm_step(_model(y, t), t, y, ac, prev_timesteps=prev, noise=noise, variance_type="fixed_large")
        y, _ = D.euler_step(_model(y, t), i, y, sigmas, noise=noise, s_churn=1.0)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(x, noise)                                   # warm up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(x, noise)
    x.copy_(torch.randn(SHAPE, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, step(x, noise), rtol=0, atol=0)


def test_drop_in_scheduler_loop_never_synchronises():
    diffusers = pytest.importorskip("diffusers")     # not installed on the GPU test machine: skipped there
    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        scheduler = getattr(mmkern.diffusion, name).from_config(getattr(diffusers, name)().config)
        scheduler.set_timesteps(10, device="cuda")
        if name == "EulerDiscreteScheduler":
            scheduler.set_begin_index(0)                  # else diffusers searches the timesteps once (a sync)
        x = torch.randn(SHAPE, device="cuda")
        generator = torch.Generator("cuda").manual_seed(0)
        timesteps = list(scheduler.timesteps.unbind())    # 0-d device views
        for _ in range(2):                                # the first pass compiles the kernels
            torch.cuda.set_sync_debug_mode("error" if _ else "default")
            try:
                sample = x
                for t in timesteps:
                    model_input = scheduler.scale_model_input(sample, t)
                    sample = scheduler.step(_model(model_input, t), t, sample, generator=generator).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if name == "EulerDiscreteScheduler":
                scheduler.set_begin_index(0)
                scheduler._step_index = None              # start the loop again (the device tables stay)
        assert torch.isfinite(sample).all()
