"""Memory: the attention kernels never materialise the S x S score matrix.

CPU (Triton through its interpreter): torch's profiler records every allocation of forward + backward;
none may come near an S x S matrix, while the reference backend (which does materialise it) shows
that the probe sees such an allocation. GPU: peak memory of forward + backward grows linearly
from 2k to 16k tokens, and 1000 calls leak nothing.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import mmkern
from mmkern import dispatch
from conftest import forced, randn

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory scaling needs a GPU")
FLASH_BACKENDS = [b for b in mmkern.available_backends()
                  if b != "reference" and "attention_backward" in dispatch.backends()[b].kernels]


def _largest_allocation(backend, S, causal=True, with_lse=True):
    """Bytes of the largest CPU allocation during forward + backward of one (1, S, 1, 16) float32 attention
    (with_lse: the loss uses lse too, so the backward gets a gradient on it)."""
    q, k, v = (randn(1, S, 1, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    with forced(backend), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, lse = mmkern.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        (out.sum() + (lse.sum() if with_lse else 0)).backward()
    return max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), q.nbytes


def test_the_probe_sees_the_reference_backends_score_matrix():
    S = 256
    largest, _ = _largest_allocation("reference", S)
    assert largest >= S * S * 8                    # float64 (1, 1, S, S) scores


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
def test_flash_backends_allocate_no_score_matrix(backend):
    """The torch backend is checked without a gradient on lse, and for allocations that do not grow with S: torch's backward kernel takes none, so such a
    backward (and a mask's gradient, or non-finite inputs) runs its written-out float32 path, which materialises
    the scores (mmkern/torch_backend/attention.py); its own kernel path is what must stay linear."""
    if backend == "torch":
        # torch's kernel keeps fixed per-thread block buffers (2 MB here from S = 1024 on): they must not grow
        small, _ = _largest_allocation(backend, 1024, with_lse=False)
        large, _ = _largest_allocation(backend, 4096, with_lse=False)
        assert large <= 1.1 * small and large < 4096 * 4096 * 4 // 16, f"torch: {small} bytes at S 1024, {large} at 4096"
        return
    S = 256
    largest, q_bytes = _largest_allocation(backend, S)
    # every allocation is O(S): a few q-sized buffers (q is S x 16 floats), far below one S x S float32 matrix
    assert largest <= 8 * q_bytes and largest < S * S * 4 // 2, f"{backend}: an allocation of {largest} bytes, S = {S}"


@needs_gpu
@pytest.mark.parametrize("backend", FLASH_BACKENDS or ["auto"])
def test_peak_memory_grows_linearly_in_sequence_length(backend):
    """Forward + backward at 2k, 4k, 8k, 16k tokens (B1 H8 D64 fp16): peak memory above the inputs grows like
    S (x8 from 2k to 16k); an S x S matrix would make it grow x64."""
    peaks = {}
    with forced(backend):
        for S in (2048, 4096, 8192, 16384):
            q, k, v = (torch.randn(1, S, 8, 64, device="cuda", dtype=torch.float16, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn_like(q)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            mmkern.flash_attn_func(q, k, v, causal=True).backward(dout)
            torch.cuda.synchronize()
            peaks[S] = torch.cuda.max_memory_allocated() - base
            del q, k, v, dout
    for S in (4096, 8192, 16384):
        ratio = peaks[S] / peaks[2048]
        assert ratio <= (S / 2048) * 1.25, f"peak memory {peaks}: x{ratio:.1f} from 2048 to {S} tokens"


@needs_gpu
@pytest.mark.parametrize("backend", FLASH_BACKENDS or ["auto"])
def test_no_leak_over_1000_calls(backend):
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with forced(backend):
        def step():
            out = mmkern.flash_attn_func(q, k, v, causal=True)
            out.sum().backward()
            y = mmkern.layer_norm_residual(x, x)
            y.sum().backward()
            q.grad = k.grad = v.grad = x.grad = None
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(1000):
            step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
