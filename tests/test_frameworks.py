"""mmkern's ops inside PyTorch's frameworks: torch.compile with dynamic shapes (no recompile per
sequence length), torch.autocast (the dtypes torch's own SDPA / layer_norm give), torch.func.vmap
(no op registers a batching rule: torch's per-sample fallback must give the right answer, never a
wrong one), bitwise-reproducible backward passes, and CUDA-graph capture / replay (GPU only).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import mmkern
from mmkern import dispatch
from conftest import forced, max_abs_err, randn

BACKENDS = mmkern.available_backends()


def backends_with(op: str) -> list[str]:
    """The usable backends that implement `op` (a C++ backend may implement only some op families)."""
    return [b for b in mmkern.available_backends() if op in dispatch.backends()[b].kernels]


# the attention tests also run a norm (the compile test): backends with both families
ATTN = [b for b in backends_with("attention_backward") if b in backends_with("norm_residual_backward")]
NORM = backends_with("norm_residual_backward")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


class CompileCounter:
    """A torch.compile backend that counts the graphs dynamo hands it (one per (re)compilation)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


# --------------------------------------------------------------------------- torch.compile, dynamic shapes

def _attention_block(x, w):
    h = mmkern.layer_norm_residual(x, weight=w)
    B, L, _ = h.shape
    q = h.view(B, L, 2, 8)
    return mmkern.flash_attn_func(q, q, q, causal=True).reshape(B, L, 16)


def _sdpa(q, k, v):
    return mmkern.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("backend", ATTN)
def test_compile_dynamic_sequence_length_does_not_recompile(backend):
    """mark_dynamic on the sequence length: lengths 5, 9, 12 run through one graph, and match eager."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(_attention_block, fullgraph=True, backend=counter)
    w = randn(16, dtype=torch.float32)
    with forced(backend):
        for L in (5, 9, 12):
            x = randn(2, L, 16, dtype=torch.float32)
            torch._dynamo.mark_dynamic(x, 1)
            assert max_abs_err(compiled(x, w), _attention_block(x, w)) < 1e-5
    assert counter.graphs == 1, f"recompiled: {counter.graphs} graphs for 3 sequence lengths"


@pytest.mark.parametrize("backend", ATTN)
def test_compile_dynamic_sdpa_lengths_and_backward(backend):
    """SDPA drop-in with dynamic Lq = Lk, forward and backward through aot_eager, one graph."""
    torch._dynamo.reset()
    counter = CompileCounter()

    def loss(q, k, v):
        return _sdpa(q, k, v).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    with forced(backend):
        for L in (4, 7, 10):
            q, k, v = (randn(1, 2, L, 8, dtype=torch.float32, requires_grad=True) for _ in range(3))
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
            compiled(q, k, v).backward()
            got = [t.grad.clone() for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
            loss(q, k, v).backward()
            assert max(max_abs_err(g, t.grad) for g, t in zip(got, (q, k, v))) < 1e-5
    assert counter.graphs == 1


# --------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("backend", ATTN)
def test_autocast_attention_gives_torch_sdpa_dtype(backend):
    """Under CPU autocast (bf16) torch's SDPA computes and returns bf16: so do mmkern's attention functions,
    gradients flow back to the float32 leaves in float32, and the values match the oracle at bf16 precision."""
    q, k, v = (randn(2, 3, 6, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    mask = randn(6, 6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_dtype = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).dtype
        with forced(backend):
            out = mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            flash = mmkern.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                           alibi_slopes=torch.rand(3))
    assert want_dtype == torch.bfloat16 and out.dtype == want_dtype and flash.dtype == want_dtype
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    with mmkern.backend("reference"):
        oracle = mmkern.scaled_dot_product_attention(*(t.detach().bfloat16().double() for t in (q, k, v)),
                                                     attn_mask=mask.bfloat16().double())
    assert max_abs_err(out, oracle) <= 4 * torch.finfo(torch.bfloat16).eps * oracle.abs().max().item()


@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("rms", [False, True])
def test_autocast_norm_keeps_torch_layer_norm_dtype(backend, rms):
    """CPU autocast leaves torch's layer_norm / rms_norm in their input dtype (float32 in -> float32 out;
    bf16 activations from an autocast linear -> bf16 out, float32 weights allowed): the same here."""
    x = randn(4, 32, dtype=torch.float32, requires_grad=True)
    w = randn(32, dtype=torch.float32, requires_grad=True)
    lin = torch.nn.Linear(32, 32)
    norm = (lambda t: mmkern.rms_norm_residual(t, weight=w)) if rms else \
        (lambda t: mmkern.layer_norm_residual(t, weight=w))
    torch_norm = (lambda t: F.rms_norm(t, (32,), w)) if rms else (lambda t: F.layer_norm(t, (32,), w))
    with torch.autocast("cpu", dtype=torch.bfloat16), forced(backend):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        for inp in (x, h):
            out = norm(inp)
            assert out.dtype == torch_norm(inp).dtype == inp.dtype
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


# --------------------------------------------------------------------------- torch.func

def test_vmap_falls_back_to_per_sample_calls_with_the_right_answer(capfd):
    """No mmkern op registers a vmap batching rule (none claims one); torch's fallback runs the op once
    per sample, with a warning. It must give exactly the per-sample results, never a wrong answer.
    (torch 2.14 raises the fallback's warning as a Python UserWarning; torch 2.11 prints it from C++ to
    stderr, where Python's warnings never see it: either shows that the fallback ran.)"""
    x = randn(3, 2, 5, 2, 8, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.func.vmap(lambda t: mmkern.flash_attn_func(t, t, t, causal=True))(x)
    told = [str(w.message) for w in caught] + [capfd.readouterr().err]
    assert any("batching rule for mmkern::attention_forward" in text for text in told), told
    want = torch.stack([mmkern.flash_attn_func(t, t, t, causal=True) for t in x])
    assert torch.equal(got, want)
    y = randn(3, 4, 16, dtype=torch.float32)
    w = randn(16, dtype=torch.float32)
    got = torch.func.vmap(lambda t: mmkern.rms_norm_residual(t, weight=w))(y)
    assert torch.equal(got, torch.stack([mmkern.rms_norm_residual(t, weight=w) for t in y]))


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_attention_backward_is_bitwise_reproducible(backend, dtype):
    q = randn(2, 21, 4, 24, dtype=dtype)
    k, v = randn(2, 35, 2, 24, dtype=dtype), randn(2, 35, 2, 24, dtype=dtype)
    dout = randn(2, 21, 4, 24, dtype=dtype)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        out = mmkern.flash_attn_func(*leaves, dropout_p=0.1, causal=True, deterministic=True)
        out.backward(dout)
        return [t.grad for t in leaves]

    with forced(backend):
        first, second = grads(), grads()
    for a, b in zip(first, second):
        bits = torch.int16 if a.element_size() == 2 else torch.int32
        assert torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("rms", [False, True])
def test_norm_backward_is_bitwise_reproducible(backend, rms):
    x, r = randn(12, 130, dtype=torch.float32), randn(12, 130, dtype=torch.float32)
    w = randn(130, dtype=torch.float32)
    b = None if rms else randn(130, dtype=torch.float32)
    dout = randn(12, 130, dtype=torch.float32)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (x, r, w)] + ([] if rms else [b.clone().requires_grad_()])
        kw = dict(dropout_p=0.2, prenorm=True)
        torch.manual_seed(3)
        out, _ = (mmkern.rms_norm_residual(*leaves[:3], **kw) if rms else
                  mmkern.layer_norm_residual(*leaves, **kw))
        out.backward(dout)
        return [t.grad for t in leaves]

    with forced(backend):
        first, second = grads(), grads()
    for a, c in zip(first, second):
        assert torch.equal(a.view(torch.int32), c.view(torch.int32))


# --------------------------------------------------------------------------- CUDA graphs (GPU only)

@needs_gpu
@pytest.mark.parametrize("backend", [b for b in ATTN if b != "reference"] or ["auto"])
def test_cuda_graph_capture_and_replay_attention_forward_backward(backend):
    dev = "cuda"
    q, k, v = (torch.randn(2, 128, 4, 64, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 128, 4, 64, device=dev, dtype=torch.float16)

    def step():
        for t in (q, k, v):
            t.grad = None
        out = mmkern.flash_attn_func(q, k, v, causal=True)
        out.backward(dout)
        return out

    with forced(backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):                                     # warm-up: compile kernels, settle allocations
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        for t in (q, k, v):
            t.grad = None
        with torch.cuda.graph(graph):
            out = mmkern.flash_attn_func(q, k, v, causal=True)
            out.backward(dout)
        grads = [t.grad for t in (q, k, v)]
        with torch.no_grad():
            for t in (q, k, v):
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        eager_out = step()
    assert max_abs_err(out, eager_out) < 1e-3
    for g, t in zip(grads, (q, k, v)):
        assert max_abs_err(g, t.grad) < 1e-2


@needs_gpu
@pytest.mark.parametrize("backend", [b for b in NORM if b != "reference"] or ["auto"])
def test_cuda_graph_capture_and_replay_norm(backend):
    dev = "cuda"
    x, r = (torch.randn(64, 1024, device=dev, dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(1024, device=dev, dtype=torch.float32)
    with forced(backend):
        for _ in range(3):
            mmkern.layer_norm_residual(x, r, w, prenorm=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, pre = mmkern.layer_norm_residual(x, r, w, prenorm=True)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        want, want_pre = mmkern.layer_norm_residual(x, r, w, prenorm=True)
    assert torch.equal(out, want) and torch.equal(pre, want_pre)
