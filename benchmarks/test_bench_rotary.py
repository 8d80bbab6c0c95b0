"""Rotary embedding: mmkern.apply_rotary_emb against what a transformers user runs, side by side:

    device_copy     x.clone(): the copy bandwidth of this device, the roof of this memory-bound op
    mmkern_cpu, mmkern_triton, mmkern_torch
                    mmkern.apply_rotary_emb forced onto each backend (mmkern_cpu: the C++ kernel of mmkern._C;
                    mmkern_torch: torch's formula behind mmkern's op, on the positions gathered per call)
    torch_eager     Hugging Face's apply_rotary_pos_emb written out: x * cos + rotate_half(x) * sin with the
                    (L, D) cos/sin tables already expanded to the full head dim outside the timed call
    torch_compile   torch_eager under torch.compile (inductor)

Rows (GPT-NeoX pairs, full rotary_dim = D = 128, float32 tables):
    prefill  (B, L, H, D) = (4, 2048, 32, 128), offset 0
    decode   (64, 1, 32, 128), per-sequence offsets (a KV cache's lengths, a (B,) tensor)
extra_info["GB/s"] counts x read once and out written once (2 x numel x itemsize). On a CPU a small smoke
size (4 MiB of x in fp32: the C++ kernel against the formula at a size where the op's overhead does not
decide). Goal (GPU): at least the device_copy's rate within 15%, ahead of torch_eager and torch_compile.
"""
import pytest
import torch

import mmkern
from conftest import DEVICE, ON_GPU, skip_unless_backend

SHAPES = {"prefill": (4, 2048, 32, 128), "decode": (64, 1, 32, 128)} if ON_GPU else \
    {"prefill": (4, 512, 8, 64), "decode": (8, 1, 4, 64)}
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
IMPLS = ["device_copy", "mmkern_cpu", "mmkern_triton", "mmkern_torch", "torch_eager", "torch_compile"]
MAX_POSITION = 4096


def _tables(rotary_dim):
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=DEVICE) / rotary_dim)
    angles = torch.arange(MAX_POSITION, dtype=torch.float32, device=DEVICE)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary(x, cos_full, sin_full):
    """transformers' apply_rotary_pos_emb: cos_full, sin_full (B or 1, L, 1, D) in x's dtype."""
    return x * cos_full + _rotate_half(x) * sin_full


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).replace("torch.", "") for d in DTYPES])
@pytest.mark.parametrize("row", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary(bench, benchmark, impl, row, dtype):
    shape = SHAPES[row]
    B, L, H, D = shape
    benchmark.group = f"rotary {row} {'x'.join(map(str, shape))} {dtype}"
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    cos, sin = _tables(D)
    offsets = torch.randint(0, MAX_POSITION - L, (B,), device=DEVICE, dtype=torch.int32) if row == "decode" else 0
    numel_bytes = x.numel() * x.element_size()
    info = dict(bytes=2 * numel_bytes, shape=str(shape), dtype=str(dtype), op=f"rotary {row}", impl=impl,
                series=f"rotary {row} {str(dtype).replace('torch.', '')}", x=x.numel(), x_label="elements")
    if impl == "device_copy":
        bench(lambda x: x.clone(), x, **info)
        return
    if impl.startswith("mmkern_"):
        backend = impl[len("mmkern_"):]
        skip_unless_backend(backend)
        if backend == "cpu" and ON_GPU:
            pytest.skip("the C++ rotary kernel runs on CPU tensors (the GPU rows: mmkern_triton)")

        def fn(x):
            with mmkern.backend(backend):
                return mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
        bench(fn, x, **info)
        return
    positions = (offsets[:, None] if row == "decode" else 0) + torch.arange(L, device=DEVICE)
    positions = positions.expand(B, L) if row == "decode" else positions[None]
    cos_full = torch.cat((cos, cos), dim=-1)[positions].unsqueeze(2).to(dtype)
    sin_full = torch.cat((sin, sin), dim=-1)[positions].unsqueeze(2).to(dtype)
    fn = eager_rotary
    if impl == "torch_compile":
        torch._dynamo.reset()
        fn = torch.compile(eager_rotary)
    bench(fn, x, cos_full, sin_full, **info)
