"""torch.compile(fullgraph=True) of one training step of each wrapped model (issue 10, frameworks).

A training step here is: forward, loss, backward through the compiled graph (AOT autograd compiles the
backward too), then an optimizer step. fullgraph=True makes any graph break (a data-dependent branch, a
host read inside mmkern's wrappers, an op without a fake implementation) an error. Each compiled step
is compared with the same step run eagerly from the same weights: loss and every parameter's gradient.
backend="aot_eager" traces exactly what inductor would receive (dynamo + AOT autograd + the ops' fake
implementations) without inductor's C++ compile time, which on a 2-core CI machine would dominate.
Models are tiny, with random weights (no downloads); float32 on the CPU, on the default backend.
"""
import copy

import pytest
import torch

import mmkern


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step_twice_and_compare(model, loss_fn, *inputs):
    """Runs loss_fn(model, *inputs) + backward eagerly and compiled (fullgraph), from the same weights, then
    one SGD step each: losses, gradients and the updated weights must agree."""
    eager_model, compiled_model = model, copy.deepcopy(model)
    results = []
    for m, fn in ((eager_model, loss_fn), (compiled_model, torch.compile(loss_fn, fullgraph=True,
                                                                        backend="aot_eager"))):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad(set_to_none=True)
        loss = fn(m, *inputs)
        loss.backward()
        grads = _grads(m)
        opt.step()
        results.append((loss.detach(), grads, {n: p.detach().clone() for n, p in m.named_parameters()}))
    (loss_e, grads_e, weights_e), (loss_c, grads_c, weights_c) = results
    assert torch.isfinite(loss_e) and loss_e.item() != 0.0
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for name in weights_e:
        torch.testing.assert_close(weights_c[name], weights_e[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_bert_masked_lm_training_step():
    pytest.importorskip("transformers")
    from mmkern.integrations import transformers_parity as tp
    from mmkern.integrations.transformers import apply_mmkern

    model = apply_mmkern(tp.tiny_bert().float().train())
    batch = tp.bert_batch()
    _step_twice_and_compare(model, lambda m, b: m(**b).loss, batch)


def test_compiled_gpt2_causal_lm_training_step():
    pytest.importorskip("transformers")
    from mmkern.integrations import transformers_parity as tp
    from mmkern.integrations.transformers import apply_mmkern

    model = apply_mmkern(tp.tiny_gpt2().float().train())
    model.loss_type = "ForCausalLM"   # unset, transformers logs a warning_once: a graph break of its own
    batch = tp.gpt2_batch()
    _step_twice_and_compare(model, lambda m, b: m(**b).loss, batch)


def test_compiled_diffusers_unet_training_step():
    pytest.importorskip("diffusers")
    from mmkern.integrations import diffusers_parity as dp
    from mmkern.integrations.diffusers import apply_mmkern

    make_model, make_inputs = dp.model_cases()["UNet2DConditionModel"]
    model = apply_mmkern(make_model().float().train())
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in make_inputs().items()}
    x0, noise = torch.randn_like(inputs["sample"]), torch.randn_like(inputs["sample"])
    alphas_cumprod = mmkern.diffusion.NoiseSchedule(1000).alphas_cumprod.float()

    def loss_fn(m, x0, noise, t, states, mask):
        x_t = mmkern.diffusion.add_noise(x0, noise, t, alphas_cumprod)
        pred = m(sample=x_t, timestep=t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        return mmkern.diffusion.diffusion_loss(pred, x0, noise, t, alphas_cumprod, "epsilon")
    _step_twice_and_compare(model, loss_fn, x0, noise, inputs["timestep"], inputs["encoder_hidden_states"],
                            inputs["encoder_attention_mask"])


def test_compiled_tiny_text2image_training_step():
    from mmkern.models import TinyText2Image

    model = TinyText2Image(["a red square", "a blue circle"], image_size=8, patch=4, dim=32, depth=2, heads=2,
                           text_dim=16, text_layers=1).train()
    states_ids, keep = model.tokenizer(["a red square", "a blue circle"], model.max_text_len)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    noise, t = torch.randn_like(images), torch.tensor([3, 900])

    def loss_fn(m, images, noise, t, ids, keep):
        x_t = mmkern.diffusion.add_noise(images, noise, t, m.alphas_cumprod)
        states, pooled = m.text_encoder(ids, keep)
        pred = m.denoiser(x_t, t, states, keep, pooled)
        return mmkern.diffusion.diffusion_loss(pred, images, noise, t, m.alphas_cumprod, m.prediction_type)
    _step_twice_and_compare(model, loss_fn, images, noise, t, states_ids, keep)
