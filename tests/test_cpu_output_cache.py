"""The C++ CPU kernels' output buffers (csrc/common/cpu_output.h): freed outputs are recycled up to a limit,
the limit and release hold, and no kernel leaves an element of a (recycled, poisoned) output unwritten.

Why it matters: a recycled buffer holds the previous call's values, so a kernel that skips an element would
return stale numbers that look right. MMKERN_CPU_OUTPUT_POISON=1 fills every output with NaN bytes before the
kernel runs; the poison test runs every C++ CPU op under it (in a subprocess: the switch is read once) and
compares with the float64 reference, which has no NaN.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mmkern
from mmkern import native

pytestmark = pytest.mark.skipif("cpu" not in mmkern.available_backends(),
                                reason="needs the C++ CPU kernels (mmkern build --cpu-only)")


def _norm_on_cpu(x, residual):
    with mmkern.backend("cpu"):
        return mmkern.layer_norm_residual(x, residual, prenorm=True)


@pytest.fixture
def cache_limit():
    limit = native.cpu_output_cache()["limit_mib"]
    yield
    native.cpu_output_cache(limit_mib=limit)


def test_freed_outputs_are_reused_and_the_values_are_fresh(cache_limit):
    native.cpu_output_cache(limit_mib=64)
    x, residual = torch.randn(300, 512), torch.randn(300, 512)           # 600 KiB per output
    with torch.no_grad():
        first = [t.clone() for t in _norm_on_cpu(x, residual)]
        before = native.cpu_output_cache()
        x2, residual2 = torch.randn(300, 512), torch.randn(300, 512)
        second = _norm_on_cpu(x2, residual2)                               # reuses the first call's buffers
        after = native.cpu_output_cache()
    assert after["reuses"] >= before["reuses"] + 2 and after["fresh"] == before["fresh"]
    torch.testing.assert_close(second[1], x2 + residual2)                 # pre: this call's, not the last one's
    assert not torch.equal(second[0], first[0])


def test_the_cache_holds_no_more_than_its_limit_and_release_empties_it(cache_limit):
    native.release_cpu_output_cache()
    native.cpu_output_cache(limit_mib=1)
    with torch.no_grad():
        outputs = [_norm_on_cpu(torch.randn(256, 512), torch.randn(256, 512)) for _ in range(4)]   # 8 x 512 KiB
    del outputs
    held = native.cpu_output_cache()
    assert 0 < held["held_bytes"] <= 1 << 20, held
    native.cpu_output_cache(limit_mib=64)
    with torch.no_grad():
        kept = [_norm_on_cpu(torch.randn(256, 512), torch.randn(256, 512)) for _ in range(2)]
    del kept
    assert native.release_cpu_output_cache() >= 4 * (512 << 10)
    assert native.cpu_output_cache()["held_bytes"] == 0


def test_limit_zero_allocates_every_output(cache_limit):
    native.cpu_output_cache(limit_mib=0)
    with torch.no_grad():
        for _ in range(3):
            _norm_on_cpu(torch.randn(256, 512), torch.randn(256, 512))
    assert native.cpu_output_cache()["held_bytes"] == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_a_bad_limit_is_a_value_error(bad):
    with pytest.raises(ValueError, match="limit_mib"):
        native.cpu_output_cache(limit_mib=bad)


POISON_PRELUDE = textwrap.dedent("""
    import torch, mmkern
    D = mmkern.diffusion
    torch.manual_seed(0)

    def both(fn, *tensors, grads=True):
        # fn on the cpu backend and on the float64 reference; outputs (and gradients) compared
        results = []
        for backend in ("cpu", "reference"):
            leaves = [t.detach().clone().requires_grad_(grads and t.is_floating_point()) for t in tensors]
            with mmkern.backend(backend):
                out = fn(*leaves)
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                if grads:
                    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
                    outs += torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
            results.append([o.detach().float() for o in outs])
        for mine, ref in zip(*results):
            assert not mine.isnan().any(), (fn, "an element the kernel did not write")
            torch.testing.assert_close(mine, ref, atol=5e-2, rtol=5e-2)
""")

# family -> (the C++ ops it needs, the calls: every C++ CPU op of the family, odd sizes, fp32 and bf16)
POISONED_CALLS = {
    "norm": (("norm_forward", "norm_backward"), """
        for dtype in (torch.float32, torch.bfloat16):
            x, r = torch.randn(3, 37, 80, dtype=dtype), torch.randn(3, 37, 80, dtype=dtype)
            w, b = torch.randn(80, dtype=dtype), torch.randn(80, dtype=dtype)
            shift, scale = torch.randn(3, 80, dtype=dtype), torch.randn(3, 80, dtype=dtype) * 0.1
            both(lambda x, r, w, b: mmkern.layer_norm_residual(x, r, w, b, prenorm=True), x, r, w, b)
            both(lambda x, r, w, s, c: mmkern.rms_norm_residual(x, r, w, prenorm=True, modulation=(s, c)),
                 x, r, w, shift, scale)
    """),
    "diffusion": (("diffusion_add_noise", "diffusion_ddim_step", "diffusion_loss"), """
        for dtype in (torch.float32, torch.bfloat16):
            s, n, mo = (torch.randn(3, 4, 9, 11, dtype=dtype) for _ in range(3))
            t, ac = torch.tensor([0, 500, 999]), torch.linspace(0.9999, 0.01, 1000)
            both(lambda s, n: D.add_noise(s, n, t, ac), s, n)
            both(lambda s, n: D.get_velocity(s, n, t, ac), s, n)
            both(lambda m, s, n: D.diffusion_loss(m, s, n, t, ac, prediction_type="v_prediction", snr_gamma=5.0),
                 mo, s, n)
            both(lambda m, s: D.ddim_step(m, 700, s, ac, 680, eta=0.0), mo, s, grads=False)
            both(lambda m, s, n: D.ddpm_step(m, 700, s, ac, noise=n, clip_sample=True), mo, s, n, grads=False)
            sigmas = torch.linspace(14.6, 0.0, 11)
            both(lambda m, s: D.euler_step(m, 3, s, sigmas), mo, s, grads=False)
            both(lambda s: D.euler_scale_model_input(s, 3, sigmas), s, grads=False)
            both(lambda s, n: D.euler_add_noise(s, n, 3, sigmas), s, n, grads=False)
    """),
    "attention": (("cpu_attention_forward", "cpu_attention_backward", "cpu_rotary_embedding"), """
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(2, 37, 3, 40, dtype=dtype) for _ in range(3))
            both(lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True), q, k, v)
            cos, sin = torch.randn(50, 12), torch.randn(50, 12)      # rotary_dim 24 of 40: the tail copied
            both(lambda q: mmkern.apply_rotary_emb(q, cos, sin, seqlen_offsets=torch.tensor([0, 13])), q)
            both(lambda q: mmkern.apply_rotary_emb(q.flatten(0, 1), cos, sin, True, cu_seqlens=torch.tensor(
                [0, 30, 30, 74], dtype=torch.int32), max_seqlen=44), q)
            pages, table = torch.randn(6, 16, 3, 40, dtype=dtype), torch.tensor([[4, 1, 2], [0, 5, 3]], dtype=torch.int32)
            both(lambda q, kp, vp: mmkern.flash_attn_with_kvcache(     # paged, left-padded, one empty cache
                q[:, :3], kp, vp, cache_seqlens=torch.tensor([40, 0], dtype=torch.int32), block_table=table,
                cache_leftpad=torch.tensor([5, 0], dtype=torch.int32), causal=True, return_lse=True),
                q, pages, pages.clone(), grads=False)
    """),
}


@pytest.mark.parametrize("family", list(POISONED_CALLS))
def test_every_cpu_kernel_writes_all_of_a_poisoned_output(family):
    ops, calls = POISONED_CALLS[family]
    missing = native.missing_op_reasons(*ops, device="cpu")
    if missing:     # scripts/mutants.py builds one family per copy
        pytest.skip("; ".join(missing))
    script = POISON_PRELUDE + textwrap.dedent(calls) + '\nprint("poisoned outputs: all written")\n'
    env = dict(os.environ, MMKERN_CPU_OUTPUT_POISON="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all written" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
