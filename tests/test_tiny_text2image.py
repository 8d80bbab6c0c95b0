"""The tiny text-to-image model: shapes, gradients, every attention and norm on mmkern's ops, sampling,
and the example script end to end: trained briefly, its samples take the colours their captions name."""
import importlib.util
import os

import pytest
import torch

import mmkern
from mmkern.models import DiTDenoiser, TextEncoder, TinyText2Image, WordTokenizer
from mmkern.models.text2image import classify_colours, colour_accuracy

CAPTIONS = ["a red square", "a blue circle", "a green triangle"]
SMALL = dict(dim=32, depth=2, heads=2, text_dim=16, text_layers=1, num_train_timesteps=100)
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_tiny_text2image.py")


@pytest.fixture(autouse=True)
def _reference_backend_one_thread():
    """The model on the reference backend, one thread: without a GPU the tests run Triton through its
    interpreter, where auto dispatch would pick it (minutes per training step); whether mmkern's ops
    are used does not depend on the backend, and each backend is checked against the reference op by op
    in the kernel tests (and on real models in test_integration_diffusers.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with mmkern.backend("reference"):
        yield
    torch.set_num_threads(threads)


def _op_counts(fn):
    """{profiler event name: count} while fn() runs (custom ops show as 'mmkern::<op>')."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def test_tokenizer():
    tok = WordTokenizer(CAPTIONS)
    ids, keep = tok(["a red square", "", "a purple square of red"], max_len=4)
    assert ids.shape == keep.shape == (3, 4) and ids.dtype == torch.int64
    assert keep.tolist() == [[True] * 4, [True, False, False, False], [True] * 4]
    assert ids[0, 0] == ids[1, 0] == tok.index["[CLS]"]
    assert ids[2, 2] == tok.index["[UNK]"]                     # "purple" was not in the captions
    assert ids[0, 1:].tolist() == [tok.index[w] for w in ("a", "red", "square")]
    with pytest.raises(TypeError, match="list of captions"):
        tok("a red square", 4)


def test_forward_backward_shapes():
    model = TinyText2Image(CAPTIONS, **SMALL)
    x_t = torch.randn(3, 3, 16, 16)
    out = model(x_t, torch.tensor([0, 50, 99]), ["a red square", "", "a blue circle"])
    assert out.shape == x_t.shape and out.dtype == torch.float32
    loss = model.loss(torch.rand(4, 3, 16, 16) * 2 - 1, CAPTIONS + ["a red circle"])
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name
    # adaLN-Zero: the output layer gets a gradient at once, and after one step so does the text encoder
    assert model.denoiser.out.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    model.loss(torch.rand(4, 3, 16, 16) * 2 - 1, CAPTIONS + ["a red circle"], cond_drop=0.0).backward()
    assert model.text_encoder.token.weight.grad.abs().sum() > 0
    assert model.denoiser.blocks[0].cross_attn.to_kv.weight.grad.abs().sum() > 0


def test_attention_and_norms_run_on_mmkern_ops(monkeypatch):
    model = TinyText2Image(CAPTIONS, **SMALL)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    holder, noised = {}, []
    real_add_noise = mmkern.diffusion.add_noise
    monkeypatch.setattr(mmkern.diffusion, "add_noise", lambda *a: noised.append(1) or real_add_noise(*a))
    fwd = _op_counts(lambda: holder.setdefault("loss", model.loss(images, CAPTIONS[:2])))
    assert noised == [1]
    depth, text_layers = SMALL["depth"], SMALL["text_layers"]
    # text: 1 self-attention per layer; denoiser: self + cross per block
    assert fwd.get("mmkern::attention_forward") == text_layers + 2 * depth, fwd
    # text: embedding norm + 2 per layer; denoiser: 3 per block + the final adaLN
    assert fwd.get("mmkern::norm_residual_forward") == 1 + 2 * text_layers + 3 * depth + 1, fwd
    assert fwd.get("mmkern::diffusion_loss") == 1, fwd
    for torch_op in ("aten::layer_norm", "aten::native_layer_norm", "aten::scaled_dot_product_attention",
                     "aten::_softmax", "aten::group_norm"):
        assert torch_op not in fwd, f"{torch_op} ran: an attention or norm is not on mmkern"
    bwd = _op_counts(lambda: holder["loss"].backward())
    assert bwd.get("mmkern::attention_backward") == text_layers + 2 * depth, bwd
    assert bwd.get("mmkern::norm_residual_backward") == 1 + 2 * text_layers + 3 * depth + 1, bwd
    assert bwd.get("mmkern::diffusion_loss_backward") == 1, bwd


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_sample_uses_mmkern_ddim(prediction_type):
    model = TinyText2Image(CAPTIONS, prediction_type=prediction_type, **SMALL).eval()
    assert model.sampling_timesteps(4) == [99, 74, 49, 24]
    holder = {}
    counts = _op_counts(lambda: holder.setdefault(
        "x", model.sample(CAPTIONS, steps=4, generator=torch.Generator().manual_seed(1))))
    x = holder["x"]
    assert x.shape == (3, 3, 16, 16) and x.abs().max() <= 1
    assert counts.get("mmkern::ddim_step") == 4, counts
    again = model.sample(CAPTIONS, steps=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, x, rtol=0, atol=0)


def test_bad_input():
    model = TinyText2Image(CAPTIONS, **SMALL)
    with pytest.raises(ValueError, match=r"x_t must be \(batch, 3, 16, 16\)"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1]), ["a red square"])
    with pytest.raises(ValueError, match="steps must be in 1..100"):
        model.sample(["a red square"], steps=0)
    with pytest.raises(ValueError, match="prediction_type"):
        TinyText2Image(CAPTIONS, prediction_type="x0")
    with pytest.raises(ValueError, match="multiple of patch"):
        DiTDenoiser(image_size=10, patch=4)
    with pytest.raises(ValueError, match="more than max_len"):
        TextEncoder(10, max_len=2)(torch.zeros(1, 3, dtype=torch.int64), torch.ones(1, 3, dtype=torch.bool))


def _load_example():
    pytest.importorskip("PIL.Image")      # the example draws with Pillow and shows tqdm progress
    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("train_tiny_text2image", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_colour_accuracy_reads_the_colour_of_the_shape():
    """The measure the learning test relies on: 1 on the training images themselves, 0 on blank canvases, and
    each drawn colour classified as itself whatever the shape."""
    example = _load_example()
    images, captions = example.draw_shapes(48, generator=torch.Generator().manual_seed(0))
    assert colour_accuracy(images, captions, example.COLOURS) == 1.0
    assert colour_accuracy(torch.full_like(images, -1.0), captions, example.COLOURS) == 0.0
    assert classify_colours(torch.full_like(images[:1], -1.0), example.COLOURS) == [None]
    wrong = [captions[(i + 1) % len(captions)] for i in range(len(captions))]     # captions of other images
    assert colour_accuracy(images, wrong, example.COLOURS) < 1.0
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        colour_accuracy(images[:2], captions[:1], example.COLOURS)


# 200 steps of the example's model (dim 96, depth 3, batch 32) with seed 0: ~40 s on one CPU thread (reference
# backend). Measured colour accuracy 24/24 at 200 steps for seeds 0-3 (0.75 and rising at 100 steps); chance is 1/4.
LEARN_STEPS, MIN_COLOUR_ACCURACY = 200, 0.75


def test_example_learns_the_colours_of_its_captions(tmp_path, capsys):
    """The example end to end, trained briefly with a fixed seed: its samples (2 per caption, 12 captions) have the
    colours their captions name, well above chance (README: "it learns the colours ..."), and it writes its PNGs."""
    Image = pytest.importorskip("PIL.Image")
    example = _load_example()
    images, captions = example.draw_shapes(5)
    assert images.shape == (5, 3, 16, 16) and images.min() == -1 and len(captions) == 5
    result = example.main(["--steps", str(LEARN_STEPS), "--seed", "0", "--sample-steps", "10",
                           "--samples-per-caption", "2", "--batch-size", "32", "--out", str(tmp_path)])
    assert result["steps"] == LEARN_STEPS
    chance = 1 / len(example.COLOURS)
    out = capsys.readouterr().out
    assert result["colour_accuracy"] >= MIN_COLOUR_ACCURACY, (
        f"colour accuracy {result['colour_accuracy']:.3f} of 24 samples after {LEARN_STEPS} steps (final loss "
        f"{result['final_loss']:.4f}) < {MIN_COLOUR_ACCURACY} (chance {chance:.2f})\n{out}")
    assert f"colour accuracy of the samples: {round(result['colour_accuracy'] * 24)}/24" in out, out
    for key in ("samples", "loss", "data"):
        with Image.open(result[key]) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    with Image.open(result["samples"]) as img:        # a row per caption: 12 rows of 16 * 4 px + padding
        assert img.height >= 12 * 64
    assert str(tmp_path) in out and "samples.png" in out and "loss.png" in out
