"""mmkern.apply_rotary_emb (mmkern::rotary_embedding): the reference against an independent complex-number
formula, every backend against the float64 reference (flash-attn's criterion per output and gradient), the
backward against finite differences, RoPE's relative-position property, the in-place and strided forms, and
bad input. The Triton kernel runs under the interpreter here; `cpu` is the C++ kernel of mmkern._C."""
import pytest
import torch

import mmkern
from conftest import assert_backend_matches_oracle, forced
from mmkern import verify

BACKENDS = ["torch", "triton", "cpu"]


def rope_tables(positions, rotary_dim, base=10000.0, dtype=torch.float32):
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def random_tables(positions, rotary_dim):
    """Arbitrary tables (not unit-norm pairs): a kernel that assumes cos^2 + sin^2 = 1 shows."""
    return torch.randn(positions, rotary_dim // 2, dtype=torch.float64), torch.randn(positions, rotary_dim // 2,
                                                                                    dtype=torch.float64)


def complex_rotary(x, cos, sin, positions, interleaved):
    """x (..., L, H, D) float64 rotated as complex numbers: pair (a, b) -> (a + ib)(cos + i sin) at each token's
    position (positions: (..., L) long); the features past rotary_dim copied."""
    rd = 2 * cos.shape[1]
    out = x.clone()
    c, s = cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)
    first, second = (slice(0, rd, 2), slice(1, rd, 2)) if interleaved else (slice(0, rd // 2), slice(rd // 2, rd))
    z = torch.complex(x[..., first], x[..., second]) * torch.complex(c, s)
    out[..., first], out[..., second] = z.real, z.imag
    return out


# --------------------------------------------------------------------------- the oracle itself

@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["int", "tensor"])
def test_reference_is_the_complex_rotation(interleaved, offsets):
    B, L, H, D, rd = 3, 6, 2, 20, 12
    x = torch.randn(B, L, H, D, dtype=torch.float64)
    cos, sin = random_tables(16, rd)
    per_batch = torch.tensor([0, 4, 10]) if offsets == "tensor" else torch.full((B,), 7)
    with mmkern.backend("reference"):
        got = mmkern.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=per_batch if offsets == "tensor" else 7)
    want = complex_rotary(x, cos, sin, per_batch[:, None] + torch.arange(L), interleaved)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_reference_varlen_is_the_complex_rotation_per_sequence():
    lens, H, D, rd = [3, 0, 5, 1], 2, 16, 16
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    offsets = torch.tensor([2, 9, 0, 6])
    x = torch.randn(sum(lens), H, D, dtype=torch.float64)
    cos, sin = random_tables(12, rd)
    with mmkern.backend("reference"):
        got = mmkern.apply_rotary_emb(x, cos, sin, True, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=5)
    want = torch.cat([complex_rotary(x[a:a + n], cos, sin, offsets[i] + torch.arange(n), True)
                      for i, (a, n) in enumerate(zip(cu.tolist(), lens))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_backward_matches_finite_differences():
    """The backward is the op again with sin negated: checked against finite differences, not against itself
    (the oracle's gradient runs through the same backward, so the criterion tests cannot see a wrong one)."""
    cos, sin = random_tables(10, 6)
    x = torch.randn(2, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([1, 5])
    with mmkern.backend("reference"):
        for interleaved in (False, True):
            assert torch.autograd.gradcheck(lambda x: mmkern.apply_rotary_emb(x, cos, sin, interleaved,
                                                                              seqlen_offsets=offsets), (x,))
            assert torch.autograd.gradgradcheck(lambda x: mmkern.apply_rotary_emb(x, cos, sin, interleaved), (x,))


# --------------------------------------------------------------------------- every backend against the oracle

def _case(name, x_shape, positions, rotary_dim, **kwargs):
    """A verify.Case: x of x_shape rotated with RoPE tables of `positions` rows (float32) and kwargs."""
    tables = rope_tables(positions, rotary_dim)
    return verify.Case(f"apply_rotary_emb {name}", str(x_shape),
                       lambda: dict(x=torch.randn(*x_shape, dtype=torch.float64)),
                       lambda x: (mmkern.apply_rotary_emb(x, *tables, **kwargs),),
                       cast=("x",), grad=("x",), ops=("rotary_embedding",))


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


CASES = {
    "verify cases": None,
    "neox full D160 (pairs across feature blocks)": lambda: _case("neox D160", (2, 5, 2, 160), 8, 160),
    "interleaved full D8": lambda: _case("interleaved D8", (1, 3, 4, 8), 3, 8, interleaved=True),
    "neox partial odd L37 D80/32, int offset": lambda: _case("neox L37", (2, 37, 1, 80), 50, 32, seqlen_offsets=13),
    "length 1 decode, tensor offsets": lambda: _case("decode", (3, 1, 4, 64), 40, 64,
                                                     seqlen_offsets=torch.tensor([0, 17, 39], dtype=torch.int32)),
    "empty batch": lambda: _case("empty batch", (0, 4, 2, 16), 4, 16),
    "varlen with empty sequences, int64 offsets": lambda: _case(
        "varlen", (9, 3, 24), 20, 10, interleaved=True, seqlen_offsets=torch.tensor([4, 0, 11, 2]),
        cu_seqlens=_cu([0, 6, 0, 3]), max_seqlen=6),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_oracle(backend, case):
    cases = [c for c in verify.cases() if "rotary" in c.op] if CASES[case] is None else [CASES[case]()]
    assert cases
    for c in cases:
        if c.make()["x"].numel() == 0:          # nothing to measure: the output must still be the right empty tensor
            x = c.make()["x"].float()
            with forced(backend):
                out, = c.run(x)
            assert out.shape == x.shape and out.dtype == x.dtype
            continue
        with forced(backend):
            assert_backend_matches_oracle(backend, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conjugate_undoes_the_rotation(backend):
    """The op with conjugate=True is the inverse rotation for RoPE tables (what the backward runs)."""
    x = torch.randn(2, 7, 3, 32)
    cos, sin = rope_tables(12, 32)
    op = torch.ops.mmkern.rotary_embedding
    with forced(backend):
        for interleaved in (False, True):
            rotated = op(x, cos, sin, None, None, 5, 0, interleaved, False)
            back = op(rotated, cos, sin, None, None, 5, 0, interleaved, True)
            torch.testing.assert_close(back, x, rtol=0, atol=2e-6)
            assert (rotated - x).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_relative_position(backend, interleaved):
    """RoPE's defining property: q at position m and k at position n score q . k through m - n only."""
    D, positions = 16, 24
    cos, sin = rope_tables(positions, D)
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float32), torch.randn(1, 1, 1, D, dtype=torch.float32)

    def score(m, n):
        rq = mmkern.apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets=m)
        rk = mmkern.apply_rotary_emb(k, cos, sin, interleaved, seqlen_offsets=n)
        return (rq * rk).sum().item()

    with forced(backend):
        for delta in (0, 3, 9):
            scores = [score(n + delta, n) for n in (0, 5, 11)]
            assert max(scores) - min(scores) < 1e-4, (delta, scores)
        assert abs(score(3, 0) - score(0, 3)) > 1e-3 or abs(score(9, 0) - score(0, 0)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_unrotated_features_are_copied_bit_for_bit_and_x_is_untouched(backend):
    x = torch.randn(2, 5, 3, 40, dtype=torch.bfloat16)
    before = x.clone()
    cos, sin = rope_tables(5, 24)
    with forced(backend):
        out = mmkern.apply_rotary_emb(x, cos, sin)
    assert out.is_contiguous() and out.dtype == x.dtype
    assert torch.equal(out[..., 24:], x[..., 24:]) and torch.equal(x, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_x_and_inplace(backend):
    """x as a (B, H, L, D) tensor transposed to (B, L, H, D) (a strided view, as q from a fused projection);
    inplace=True writes into it and returns it."""
    base = torch.randn(2, 3, 6, 16)
    x = base.transpose(1, 2)
    cos, sin = rope_tables(6, 16)
    want = complex_rotary(x.double(), cos.double(), sin.double(), torch.arange(6).expand(2, 6), False)
    with forced(backend):
        out = mmkern.apply_rotary_emb(x, cos, sin)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
        returned = mmkern.apply_rotary_emb(x, cos, sin, inplace=True)
    assert returned is x
    torch.testing.assert_close(base.transpose(1, 2).double(), want, rtol=0, atol=1e-5)


def test_tables_in_x_dtype_or_float32():
    x = torch.randn(1, 4, 2, 8, dtype=torch.float16)
    cos, sin = rope_tables(4, 8)
    a = mmkern.apply_rotary_emb(x, cos, sin)
    b = mmkern.apply_rotary_emb(x, cos.half(), sin.half())
    assert a.dtype == b.dtype == torch.float16
    assert (a.float() - b.float()).abs().max() < 1e-2


def test_compile_fullgraph_and_gradient_through_the_op():
    cos, sin = rope_tables(10, 8)
    x = torch.randn(2, 5, 2, 8, requires_grad=True)

    def f(x, offsets):
        return mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets).square().sum()

    offsets = torch.tensor([0, 5], dtype=torch.int32)
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, offsets)
    loss.backward()
    g = x.grad.clone()
    x.grad = None
    f(x, offsets).backward()
    torch.testing.assert_close(g, x.grad)
    # the rotation is orthogonal for RoPE tables: |rot(x)|^2 = |x|^2, so d/dx = 2x
    torch.testing.assert_close(g, 2 * x.detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input

def _bad_calls():
    x = torch.randn(2, 5, 3, 16)
    cos, sin = rope_tables(8, 16)
    cu = _cu([2, 3])
    return {
        "rotary_dim over head_dim": (lambda: mmkern.apply_rotary_emb(x, *rope_tables(8, 18)), ValueError, "rotary_dim"),
        "cos without columns": (lambda: mmkern.apply_rotary_emb(x, cos[:, :0], sin[:, :0]), ValueError, "rotary_dim"),
        "sin shape": (lambda: mmkern.apply_rotary_emb(x, cos, sin[:, :4]), ValueError, "sin"),
        "table dtype": (lambda: mmkern.apply_rotary_emb(x, cos.half(), sin.half()), TypeError, "cos"),
        "x ndim": (lambda: mmkern.apply_rotary_emb(x[0], cos, sin), ValueError, "x"),
        "table too short for the int offset": (lambda: mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=4),
                                               ValueError, "cos and sin hold 8 positions"),
        "table too short for the tensor offsets": (lambda: mmkern.apply_rotary_emb(
            x, cos, sin, seqlen_offsets=torch.tensor([0, 4])), ValueError, "cos and sin hold 8 positions"),
        "negative offset": (lambda: mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=-1), ValueError,
                            "seqlen_offsets"),
        "negative tensor offset": (lambda: mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, -1])),
                                   ValueError, "seqlen_offsets"),
        "float offsets": (lambda: mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0.0, 1.0])),
                          TypeError, "seqlen_offsets"),
        "offsets shape": (lambda: mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 1, 2])),
                          ValueError, "seqlen_offsets"),
        "offsets as a float": (lambda: mmkern.apply_rotary_emb(x, cos, sin, seqlen_offsets=1.5), ValueError,
                               "seqlen_offsets"),
        "varlen without max_seqlen": (lambda: mmkern.apply_rotary_emb(x[0], cos, sin, cu_seqlens=cu), ValueError,
                                      "max_seqlen"),
        "max_seqlen too small": (lambda: mmkern.apply_rotary_emb(x[0], cos, sin, cu_seqlens=cu, max_seqlen=2),
                                 ValueError, "max_seqlen"),
        "cu_seqlens not ending at total": (lambda: mmkern.apply_rotary_emb(x[0], cos, sin, cu_seqlens=_cu([2, 2]),
                                                                           max_seqlen=3), ValueError, "cu_seqlens"),
        "cu_seqlens int64": (lambda: mmkern.apply_rotary_emb(x[0], cos, sin, cu_seqlens=cu.long(), max_seqlen=3),
                             TypeError, "cu_seqlens"),
        "varlen table too short": (lambda: mmkern.apply_rotary_emb(x[0], cos, sin, seqlen_offsets=6, cu_seqlens=cu,
                                                                   max_seqlen=3), ValueError, "hold 8 positions"),
        "x not a tensor": (lambda: mmkern.apply_rotary_emb(x.tolist(), cos, sin), TypeError, "x"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_names_the_argument(name):
    call, error, match = _bad_calls()[name]
    with pytest.raises(error, match=match):
        call()
