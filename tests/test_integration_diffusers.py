"""diffusers with MMKernAttnProcessor against diffusers' default processor: same weights, same outputs.

Criterion (mmkern.integrations.diffusers_parity.criterion): against the unpatched model in float64,
the patched model's error is at most 2x the unpatched model's own error in the same dtype + 2 eps.
float32 on the CPU for every usable backend (Triton through its interpreter); bfloat16 on a GPU.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import mmkern  # noqa: E402
from conftest import forced  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from mmkern.integrations import diffusers_parity as parity  # noqa: E402
from mmkern.integrations.diffusers import MMKernAttnProcessor, apply_mmkern, unsupported_reasons  # noqa: E402

BACKENDS = mmkern.available_backends()
MODELS = list(parity.model_cases())


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run ~50x faster on one thread on a busy 2-core machine (see parity.one_cpu_thread)."""
    with parity.one_cpu_thread():
        yield


def test_reference_and_triton_are_usable():
    assert {"reference", "triton"} <= set(BACKENDS), BACKENDS


def _skip_without_attention(backend):
    if not parity.has_kernels(backend, "attention_forward"):
        pytest.skip(f"backend {backend!r} has no attention kernel (its kernels: "
                    f"{sorted(mmkern.dispatch.backends()[backend].kernels)})")


def _model_parity(backend, model_name, device, dtype):
    make_model, make_inputs = parity.model_cases()[model_name]
    oracle_model, base_model, patched_model = parity.three_ways(make_model, dtype, device)
    assert all(isinstance(p, MMKernAttnProcessor) for p in _processors(patched_model))
    assert all(isinstance(p, AttnProcessor2_0) for p in _processors(base_model))
    inputs = make_inputs()
    oracle = parity.forward(oracle_model, inputs, torch.float64, "cpu")
    baseline = parity.forward(base_model, inputs, dtype, device)
    calls = []
    real = mmkern.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    with forced(backend), pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmkern, "scaled_dot_product_attention", counting)
        patched = parity.forward(patched_model, inputs, dtype, device)
    assert len(calls) == len(_processors(patched_model)), "every attention layer must run through mmkern"
    error, tolerance = parity.criterion(oracle, baseline, patched, dtype)
    assert error <= tolerance, f"{model_name} [{backend}, {dtype}]: error {error:.3e} > tolerance {tolerance:.3e}"


def _processors(model):
    return [m.processor for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_parity_fp32_cpu(backend, model_name):
    _skip_without_attention(backend)
    torch.manual_seed(0)
    _model_parity(backend, model_name, "cpu", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_loop_parity_fp32_cpu(backend):
    """3 DDIM steps: mmkern's drop-in DDIMScheduler + patched PixArt vs diffusers' scheduler + default PixArt."""
    _skip_without_attention(backend)
    if not parity.has_kernels(backend, "ddim_step"):
        pytest.skip(f"backend {backend!r} has no ddim_step kernel")
    with forced(backend):       # CPU tensors: Triton takes them through its interpreter only (skipped on a GPU)
        oracle, baseline, patched = parity.ddim_three_ways(torch.float32, "cpu", backend)
    error, tolerance = parity.criterion(oracle, baseline, patched, torch.float32)
    assert error <= tolerance, f"DDIM loop [{backend}]: error {error:.3e} > tolerance {tolerance:.3e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 parity runs on a GPU")
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_model_parity_bf16_gpu(backend, model_name):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} is not usable here")
    _skip_without_attention(backend)
    _model_parity(backend, model_name, "cuda", torch.bfloat16)


def test_parity_rows_hook():
    rows = parity.parity_rows("reference")
    assert {r.op for r in rows} == {f"diffusers {m}" for m in MODELS} | {"diffusers DDIM loop (3 steps, PixArt)"}
    assert all(r.passed and r.backend == "reference" and r.dtype == "float32" for r in rows), rows


def test_two_line_swap_with_set_attn_processor():
    unet = parity.tiny_unet()
    inputs = parity.model_cases()["UNet2DConditionModel"][1]()
    expected = parity.forward(unet, inputs, torch.float32, "cpu")
    unet.set_attn_processor(MMKernAttnProcessor())
    with mmkern.backend("reference"):
        got = parity.forward(unet, inputs, torch.float32, "cpu")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _standalone_cases():
    """Attention layers exercising what AttnProcessor2_0 handles: group norm + residual + rescale on
    (B, C, H, W) input, cross-attention with norm_cross, spatial norm, several mask layouts."""
    torch.manual_seed(0)
    B, C, H, W, Lk = 2, 8, 3, 5, 7
    image = torch.randn(B, C, H, W)
    tokens, context = torch.randn(B, 6, C), torch.randn(B, Lk, 12)
    pad = torch.zeros(B, 1, Lk)
    pad[1, :, 4:] = -10000.0                             # UNet's bias for padded text
    return [
        ("group norm, residual, rescale, 4-D input",
         Attention(C, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0,
                   bias=True), dict(hidden_states=image)),
        ("cross-attention, layer-norm on the context, (B, 1, Lk) bias",
         Attention(C, cross_attention_dim=12, heads=2, dim_head=4, cross_attention_norm="layer_norm"),
         dict(hidden_states=tokens, encoder_hidden_states=context, attention_mask=pad)),
        ("cross-attention, (B*heads, Lq, Lk) bias",
         Attention(C, cross_attention_dim=12, heads=2, dim_head=4),
         dict(hidden_states=tokens, encoder_hidden_states=context,
              attention_mask=torch.randn(B * 2, 6, Lk))),
        ("spatial norm with temb",       # SpatialNorm's GroupNorm has 32 groups: 32 channels
         Attention(32, heads=2, dim_head=4, spatial_norm_dim=3, residual_connection=True),
         dict(hidden_states=torch.randn(B, 32, H, W), temb=torch.randn(B, 3, 2, 2))),
        ("q/k layer norms", Attention(C, heads=2, dim_head=4, qk_norm="layer_norm"), dict(hidden_states=tokens)),
        ("scale_qk=False (softmax scale 1)", Attention(C, heads=2, dim_head=4, scale_qk=False),
         dict(hidden_states=tokens)),
    ]


STANDALONE = ["group-norm-residual-rescale-4d", "cross-norm-cross-B1Lk-bias", "cross-BheadsLqLk-bias",
              "spatial-norm", "qk-norm", "scale-1"]


@pytest.mark.parametrize("case", range(len(STANDALONE)), ids=STANDALONE)
def test_attention_layer_features(case):
    name, layer, inputs = _standalone_cases()[case]
    layer.eval()
    with torch.no_grad():
        if layer.scale_qk:
            layer.set_processor(AttnProcessor2_0())
            expected = layer(**inputs)
        else:   # AttnProcessor2_0 ignores attn.scale; diffusers' classic AttnProcessor honours it
            from diffusers.models.attention_processor import AttnProcessor
            layer.set_processor(AttnProcessor())
            expected = layer(**inputs)
        layer.set_processor(MMKernAttnProcessor("layer"))
        with mmkern.backend("reference"):
            got = layer(**inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5, msg=name)


def test_padded_text_tokens_do_not_matter():
    """A masked (padded) text token has no effect on the patched UNet's output."""
    unet = apply_mmkern(parity.tiny_unet())
    inputs = parity.model_cases()["UNet2DConditionModel"][1]()
    with mmkern.backend("reference"):
        before = parity.forward(unet, inputs, torch.float32, "cpu")
        inputs["encoder_hidden_states"][1, 3:] = 100 * torch.randn(2, parity.TEXT_DIM, dtype=torch.float64)
        after = parity.forward(unet, inputs, torch.float32, "cpu")
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_unsupported_layer_is_named():
    class WithAddedKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.ModuleDict({"attn": Attention(8, heads=2, dim_head=4, added_kv_proj_dim=6)})

    model = WithAddedKV()
    with pytest.raises(ValueError, match=r"block\.attn.*added_kv_proj_dim=6"):
        apply_mmkern(model)
    assert not isinstance(model.block["attn"].processor, MMKernAttnProcessor), "apply_mmkern changed nothing"
    assert unsupported_reasons(model.block["attn"])
    model.block["attn"].set_processor(MMKernAttnProcessor("block.attn"))
    with pytest.raises(ValueError, match=r"cannot run attention layer 'block\.attn'.*added_kv_proj_dim"):
        model.block["attn"](torch.randn(1, 4, 8), encoder_hidden_states=torch.randn(1, 3, 6))


def test_bad_mask_and_model_errors():
    layer = Attention(8, cross_attention_dim=12, heads=2, dim_head=4)
    layer.set_processor(MMKernAttnProcessor("down.attn2"))
    with pytest.raises(ValueError, match=r"'down\.attn2'.*covers 5 keys.*over 7"):
        layer(torch.randn(2, 6, 8), encoder_hidden_states=torch.randn(2, 7, 12), attention_mask=torch.zeros(2, 1, 5))
    with pytest.raises(ValueError, match="no diffusers attention layers"):
        apply_mmkern(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expected a diffusers model"):
        apply_mmkern("unet")
