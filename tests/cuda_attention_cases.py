"""What the GPU tests of the CUDA C++ flash attention share (tests/test_cuda_attention.py for the forward,
tests/test_cuda_attention_backward.py for the backward): the skip without a GPU, the check that the cuda
backend is usable, float64 inputs on the GPU, and the dense shapes both walk through."""
import pytest
import torch

import mmkern

DEVICE = "cuda"
HALF = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 96, 128]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="needs a CUDA GPU (the CUDA kernels of mmkern._C run only there); "
                                         "scripts/gpu_check.sh runs this module")


@pytest.fixture(scope="module")
def cuda_backend():
    assert "cuda" in mmkern.available_backends(), \
        "the cuda backend is not usable on this GPU machine: " + "; ".join(
            mmkern.dispatch.backends()["cuda"].environment_reasons())


def r(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


# name -> (B, Lq, Lk, H, H_kv, causal)
DENSE = {
    "dense 129": (2, 129, 129, 4, 4, False),
    "dense L1": (3, 1, 1, 2, 2, False),
    "causal 129": (2, 129, 129, 4, 4, True),
    "cross 17x129": (2, 17, 129, 4, 4, False),
    "cross causal 17x129": (2, 17, 129, 4, 4, True),
    "cross causal 129x17 (rows without keys)": (2, 129, 17, 4, 4, True),
    "GQA 4/2 causal 65x200": (2, 65, 200, 4, 2, True),
    "MQA 8/1 1x257": (2, 1, 257, 8, 1, False),
    "no keys 5x0": (2, 5, 0, 2, 2, False),
}
