"""Every public function's bad inputs, in one table (tests/test_bad_input.py's CASES plus the rows below):
each call raises the documented exception (ValueError / TypeError, NoBackendError for a backend that
cannot run) with a message naming the argument, on every usable backend; and the whole table run
in a child process on every backend ends normally (no crash, abort or hang of the process).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import mmkern
from conftest import randn
from test_bad_input import CASES as BASE_CASES

f32 = dict(dtype=torch.float32)
x4 = randn(2, 4, **f32)
ac = torch.linspace(0.99, 0.01, 10)
sig = torch.linspace(1.0, 0.0, 10)
q, k, v = randn(2, 5, 4, 16, **f32), randn(2, 5, 2, 16, **f32), randn(2, 5, 2, 16, **f32)
cu5 = torch.tensor([0, 5], dtype=torch.int32)
p5 = randn(5, 2, 8, **f32)

EXTRA_CASES = {
    # attention functions
    "sdpa not a tensor": (lambda: mmkern.scaled_dot_product_attention("q", k, v), TypeError,
                          r"query must be a torch.Tensor, got str"),
    "sdpa dropout": (lambda: mmkern.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)),
                                                                 dropout_p=1.5), ValueError, r"dropout_p must be"),
    "sdpa scale type": (lambda: mmkern.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)),
                                                                    scale="x"), TypeError, r"softmax_scale must be"),
    "varlen alibi batch": (lambda: mmkern.flash_attn_varlen_func(p5, p5, p5, cu5, cu5, 5, 5,
                                                                 alibi_slopes=torch.zeros(2, 2)), ValueError,
                           r"alibi_slopes must have shape \(heads,\) = \(2,\) or \(batch, heads\) = \(1, 2\)"),
    "varlen max_seqlen negative": (lambda: mmkern.flash_attn_varlen_func(p5, p5, p5, cu5, cu5, -1, 5), ValueError,
                                   r"max_seqlen_q must be an int >= 0, got -1"),
    "varlen cu 2-D": (lambda: mmkern.flash_attn_varlen_func(p5, p5, p5, cu5.view(1, 2), cu5, 5, 5), ValueError,
                      r"cu_seqlens_q must have 1 dimensions"),
    "kvcache seqlens batch": (lambda: mmkern.flash_attn_with_kvcache(q[:, :1], k, v,
                                                                     cache_seqlens=torch.tensor([1, 2, 3],
                                                                                                dtype=torch.int32)),
                              ValueError, r"cache_seqlens.shape\[0\] \(batch\) must be 2"),
    "kvcache strided cache": (lambda: mmkern.flash_attn_with_kvcache(q[:, :1], randn(2, 5, 2, 32, **f32)[..., ::2], v),
                              ValueError, r"k_cache is updated in place and must have a contiguous last dimension"),
    "kvcache seqlens dtype": (lambda: mmkern.flash_attn_with_kvcache(q[:, :1], k, v,
                                                                     cache_seqlens=torch.tensor([1.0, 2.0])),
                              TypeError, r"cache_seqlens must have dtype int32, int64"),
    "kvcache q rank": (lambda: mmkern.flash_attn_with_kvcache(q[0], k, v), ValueError, r"q must have 4 dimensions"),
    "kvcache new v dtype": (lambda: mmkern.flash_attn_with_kvcache(q[:, :1], k, v, k[:, :1], v[:, :1].half(),
                                                                   cache_seqlens=0),
                            ValueError, r"v must have shape .* and dtype torch.float32 like the cache"),
    "flash softcap type": (lambda: mmkern.flash_attn_func(q, k, v, softcap="1"), ValueError, r"softcap must be"),
    "flash window bools": (lambda: mmkern.flash_attn_func(q, k, v, window_size=(True, 0)), ValueError,
                           r"window_size must be a pair of ints"),
    # norms and modules
    "norm x not a tensor": (lambda: mmkern.layer_norm_residual("x"), TypeError, r"x must be a torch.Tensor, got str"),
    "norm residual dtype": (lambda: mmkern.rms_norm_residual(x4, x4.long()), TypeError, r"residual must have dtype"),
    "rms module shape": (lambda: mmkern.nn.RMSNormResidual(8)(x4), ValueError,
                         r"RMSNormResidual: x must end in normalized_shape \(8,\), got \(2, 4\)"),
    "module dropout": (lambda: mmkern.nn.LayerNormResidual(4, dropout_p=1.0), ValueError,
                       r"dropout_p must be a float in \[0, 1\)"),
    "module normalized_shape": (lambda: mmkern.nn.LayerNormResidual(0), ValueError,
                                r"normalized_shape must be a positive size"),
    # diffusion
    "euler_scale step range": (lambda: mmkern.diffusion.euler_scale_model_input(x4, 5, torch.ones(4)), ValueError,
                               r"step_index must lie in \[0, 3\]"),
    "euler_add_noise step range": (lambda: mmkern.diffusion.euler_add_noise(x4, x4, torch.tensor([0, 9]),
                                                                            torch.ones(4)),
                                   ValueError, r"step_index must lie in \[0, 3\]"),
    "euler_add_noise without noise": (lambda: mmkern.diffusion.euler_add_noise(x4, None, 0, sig), ValueError,
                                      r"noise must be a tensor like original_samples, got None"),
    "euler sigmas type": (lambda: mmkern.diffusion.euler_step(x4, 0, x4, [1.0, 0.0]), TypeError,
                          r"sigmas must be a torch.Tensor, got list"),
    "ddim final alpha": (lambda: mmkern.diffusion.ddim_step(x4, 1, x4, ac, 0, final_alpha_cumprod=2.0), ValueError,
                         r"final_alpha_cumprod must be a float in \[0.0, 1.0\], got 2.0"),
    "loss noise dtype": (lambda: mmkern.diffusion.diffusion_loss(x4, x4, x4.half(), 0, ac), ValueError,
                         r"noise must have the shape and dtype of original_samples"),
    "make_betas schedule": (lambda: mmkern.diffusion.make_betas(10, beta_schedule="nope"), ValueError,
                            r"beta_schedule must be one of linear, scaled_linear, squaredcos_cap_v2, sigmoid"),
    # dispatch
    "backend name": (lambda: mmkern.backend("gpu"), ValueError, r"unknown backend 'gpu'; known backends: auto"),
    "forced cuda on cpu": (lambda: _forced("cuda", lambda: mmkern.flash_attn_func(q, k, v)), mmkern.NoBackendError,
                           r"the forced backend 'cuda' cannot run it for attention_forward on cpu tensors"),
}


def _forced(name, call):
    with mmkern.backend(name):
        return call()


# Rows added when the bugs they exposed were fixed (hardening, issue 10).
FIXED_CASES = {
    "flash head_dim 0": (lambda: mmkern.flash_attn_func(q[..., :0], k[..., :0], v[..., :0]), ValueError,
                         r"head_dim .* must be in 1..256, got 0"),
    "sdpa head_dim 0": (lambda: mmkern.scaled_dot_product_attention(*(t[..., :0].transpose(1, 2) for t in (q, q, q))),
                        ValueError, r"head_dim .* must be in 1..256, got 0"),
    "training_target timestep range": (lambda: mmkern.diffusion.training_target(x4, x4, torch.tensor([0, 1000]), ac,
                                                                                "epsilon"),
                                       ValueError, r"timesteps must lie in \[0, 9\]"),
    "euler churn without noise": (lambda: mmkern.diffusion.euler_step(x4, 0, x4, sig, s_churn=1.0), ValueError,
                                  r"s_churn = 1.0 > 0 needs noise"),
    "euler churn type": (lambda: mmkern.diffusion.euler_step(x4, 0, x4, sig, s_churn="1"), TypeError,
                         r"s_churn must be a float, got str"),
}

CASES = {**BASE_CASES, **EXTRA_CASES, **FIXED_CASES}
BACKENDS = mmkern.available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_clear_error(name, backend):
    call, error, pattern = CASES[name]
    with mmkern.backend(backend), pytest.raises(error, match=pattern):
        call()


def test_learned_variance_with_zero_channels_is_accepted():
    """(B, 2C) with C = 0 is (B, 0): a learned variance of an empty sample is a valid (empty) step."""
    empty = torch.zeros(2, 0)
    prev, x0 = mmkern.diffusion.ddpm_step(empty, 3, empty, ac, variance_type="learned")
    assert prev.shape == (2, 0) and x0.shape == (2, 0)


def test_learned_variance_needs_twice_the_channels():
    with pytest.raises(ValueError, match=r"variance_type 'learned' needs model_output of shape \(B, 2C, ...\)"):
        mmkern.diffusion.ddpm_step(torch.zeros(2, 3, 5), 3, torch.zeros(2, 3, 5), ac, variance_type="learned")


def test_the_table_never_crashes_the_process():
    """Every row on every usable backend in a child process: each raises the expected error and the
    process exits normally (a segfault, abort or hang in a kernel would show here, not kill pytest)."""
    script = textwrap.dedent("""
        import os, sys, torch
        sys.path.insert(0, "tests")
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        import mmkern
        import pytest
        from test_errors_table import CASES
        ran = 0
        for backend in mmkern.available_backends():
            for name, (call, error, pattern) in CASES.items():
                with mmkern.backend(backend), pytest.raises(error, match=pattern):
                    call()
                ran += 1
        print("ran", ran)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ran {len(CASES) * len(BACKENDS)}" in proc.stdout
