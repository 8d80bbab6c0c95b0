"""Parity of diffusers models patched with MMKernAttnProcessor against the unpatched originals.

    parity_rows(backend) -> list[mmkern.verify.Row]     (the `mmkern verify` model-parity hook)

Each row runs a tiny model (random weights, built from a config) three ways, with the same weights:
    oracle     the unpatched model (diffusers' default AttnProcessor2_0) in float64 on the CPU
    baseline   the unpatched model in the dtype under test (what a user runs today)
    patched    the model with MMKernAttnProcessor in every attention layer, `backend` forced
and passes when |patched - oracle| <= 2 |baseline - oracle| + 2 eps(dtype) max|oracle| (flash-attn's
criterion, as the kernel rows). dtype: float32 on the CPU; bfloat16 on a GPU when the backend runs there.
Rows:
    diffusers UNet2DConditionModel        self- and cross-attention, padded text (encoder_attention_mask)
    diffusers PixArtTransformer2DModel    transformer denoiser: self-, cross-attention with a text mask, adaLN
    diffusers DiTTransformer2DModel       transformer denoiser, class-conditional (self-attention only)
    diffusers DDIM loop                   3 DDIM steps: mmkern.diffusion.DDIMScheduler + the patched PixArt
                                          against diffusers.DDIMScheduler + the unpatched PixArt
A backend without an attention kernel (or a DDIM step kernel, for the loop) has no rows.
Importing this module raises ImportError when diffusers is missing.
"""
from __future__ import annotations

import copy

import diffusers  # noqa: F401  (ImportError here leaves the rows out of `mmkern verify`)
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

import mmkern
from mmkern.dispatch import backends
from mmkern.integrations.diffusers import apply_mmkern
from mmkern.verify import Row

TEXT_LEN, TEXT_DIM = 5, 16


def tiny_unet() -> UNet2DConditionModel:
    """A 52k-parameter UNet2DConditionModel: 4x4 latents, 2 levels, 8 attention layers (4 self, 4 cross)."""
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=4, norm_num_groups=4).eval()


def tiny_pixart(out_channels: int = 8) -> PixArtTransformer2DModel:
    """PixArt-alpha in miniature: 2 blocks (4 attention layers), 4x4 latents; out_channels=8 is the learned-sigma
    layout (noise | variance), 4 the plain noise prediction."""
    return PixArtTransformer2DModel(sample_size=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                    in_channels=4, out_channels=out_channels, patch_size=1, cross_attention_dim=16,
                                    caption_channels=TEXT_DIM, norm_num_groups=4).eval()


def tiny_dit() -> DiTTransformer2DModel:
    return DiTTransformer2DModel(sample_size=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 in_channels=4, out_channels=8, patch_size=1, num_embeds_ada_norm=10,
                                 norm_num_groups=4).eval()


def text_inputs(batch: int = 2, device="cpu"):
    """Text states (B, 5, 16) and a padding mask (B, 5): sample 1 has only 3 real tokens."""
    states = torch.randn(batch, TEXT_LEN, TEXT_DIM, dtype=torch.float64, device=device)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.float64, device=device)
    if batch > 1:
        mask[1, 3:] = 0
    return states, mask


def model_cases():
    """name -> (make model, make float64 inputs, run(model, inputs, dtype) -> output)."""
    def unet_inputs():
        states, mask = text_inputs()
        return dict(sample=torch.randn(2, 4, 4, 4, dtype=torch.float64), timestep=torch.tensor([10, 700]),
                    encoder_hidden_states=states, encoder_attention_mask=mask)

    def pixart_inputs():
        states, mask = text_inputs()
        return dict(hidden_states=torch.randn(2, 4, 4, 4, dtype=torch.float64), timestep=torch.tensor([10, 700]),
                    encoder_hidden_states=states, encoder_attention_mask=mask,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    def dit_inputs():
        return dict(hidden_states=torch.randn(2, 4, 4, 4, dtype=torch.float64), timestep=torch.tensor([10, 700]),
                    class_labels=torch.tensor([1, 3]))

    return {"UNet2DConditionModel": (tiny_unet, unet_inputs),
            "PixArtTransformer2DModel": (tiny_pixart, pixart_inputs),
            "DiTTransformer2DModel": (tiny_dit, dit_inputs)}


def _cast(inputs: dict, dtype, device) -> dict:
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@torch.no_grad()
def forward(model, inputs: dict, dtype, device) -> torch.Tensor:
    return model(**_cast(inputs, dtype, device)).sample.double().cpu()


def three_ways(make_model, dtype, device):
    """(oracle, baseline, patched) copies of one random model: float64 CPU default processor (on the dtype's
    weights, upcast: the oracle sees the same rounded values), `dtype` default processor, `dtype`
    MMKernAttnProcessor."""
    # nn.Module.to, not ModelMixin.to: the latter warns about modules to keep in float32 (there are none here)
    baseline = torch.nn.Module.to(make_model().double(), device=device, dtype=dtype)
    oracle = torch.nn.Module.to(copy.deepcopy(baseline), device="cpu", dtype=torch.float64)
    patched = apply_mmkern(copy.deepcopy(baseline))
    return oracle, baseline, patched


def rounded(inputs: dict, dtype) -> dict:
    """The inputs' floating tensors rounded to dtype and back to float64 (what the oracle gets)."""
    return {k: v.to(dtype).double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def ddim_loop(model, scheduler, start: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, steps: int = 3):
    """diffusers' sampling loop (as PixArtAlphaPipeline's): set_timesteps, then model -> scheduler.step."""
    scheduler.set_timesteps(steps)
    sample = start
    no_resolution = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(sample, encoder_hidden_states=text, timestep=t.expand(sample.shape[0]),
                        encoder_attention_mask=mask, added_cond_kwargs=no_resolution).sample
            sample = scheduler.step(eps, t, sample).prev_sample
    return sample.double().cpu()


def ddim_three_ways(dtype, device, backend: str, steps: int = 3):
    """(oracle, baseline, patched) final samples of a DDIM loop with the tiny PixArt (linear betas, 1000 train
    steps). PixArt, not the UNet: 4 attention layers instead of 8 keeps the interpreted Triton run short."""
    from mmkern.diffusion import DDIMScheduler as MMKernDDIM
    oracle_model, base_model, patched_model = three_ways(lambda: tiny_pixart(out_channels=4), dtype, device)
    start = torch.randn(2, 4, 4, 4, dtype=torch.float64).to(dtype).double()   # rounded: the oracle's inputs too
    text, mask = (t.to(dtype).double() if t.is_floating_point() else t for t in text_inputs())
    config = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)

    def run(model, scheduler, dt, dev):
        return ddim_loop(model, scheduler, start.to(dev, dt), text.to(dev, dt), mask.to(dev, dt), steps)
    oracle = run(oracle_model, diffusers.DDIMScheduler(**config), torch.float64, "cpu")
    baseline = run(base_model, diffusers.DDIMScheduler(**config), dtype, device)
    with mmkern.backend(backend):
        patched = run(patched_model, MMKernDDIM(**config), dtype, device)
    return oracle, baseline, patched


def criterion(oracle, baseline, patched, dtype) -> tuple[float, float]:
    """(error, tolerance): max|patched - oracle| against 2 max|baseline - oracle| + 2 eps(dtype) max|oracle|."""
    error = (patched - oracle).abs().max().item()
    base = (baseline - oracle).abs().max().item()
    return error, 2 * base + 2 * torch.finfo(dtype).eps * max(oracle.abs().max().item(), 1e-3)


def settings(backend: str) -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs to check `backend` on: float32 on the CPU, bfloat16 on a GPU, where it runs."""
    b = backends()[backend]
    out = []
    if b.device_reason(torch.device("cpu")) is None:
        out.append(("cpu", torch.float32))
    if torch.cuda.is_available() and b.device_reason(torch.device("cuda")) is None:
        out.append(("cuda", torch.bfloat16))
    return out


def has_kernels(backend: str, *ops: str) -> bool:
    return all(op in backends()[backend].kernels for op in ops)


class one_cpu_thread:
    """Run tiny models on one CPU thread: their ops are far too small to share out, and on a busy machine
    extra threads spin and wait (a 4x4 UNet forward takes 0.04 s on one thread, up to 2 s on two)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def parity_rows(backend: str) -> list[Row]:
    with one_cpu_thread():
        return _parity_rows(backend)


def _parity_rows(backend: str) -> list[Row]:
    rows = []
    if not has_kernels(backend, "attention_forward"):
        return rows
    for device, dtype in settings(backend):
        name = str(dtype).replace("torch.", "")
        for model_name, (make_model, make_inputs) in model_cases().items():
            torch.manual_seed(0)
            oracle_model, base_model, patched_model = three_ways(make_model, dtype, device)
            inputs = make_inputs()
            oracle = forward(oracle_model, rounded(inputs, dtype), torch.float64, "cpu")
            baseline = forward(base_model, inputs, dtype, device)
            with mmkern.backend(backend):
                patched = forward(patched_model, inputs, dtype, device)
            error, tol = criterion(oracle, baseline, patched, dtype)
            rows.append(Row(f"diffusers {model_name}", backend, name, str(tuple(oracle.shape)), error, tol))
        if has_kernels(backend, "ddim_step"):
            torch.manual_seed(0)
            oracle, baseline, patched = ddim_three_ways(dtype, device, backend)
            error, tol = criterion(oracle, baseline, patched, dtype)
            rows.append(Row("diffusers DDIM loop (3 steps, PixArt)", backend, name, str(tuple(oracle.shape)), error,
                            tol))
    return rows
