"""flash-attn's packed-input functions (flash_attn_qkvpacked_func, flash_attn_kvpacked_func and their varlen forms).

Each one takes its packed tensor apart with views and calls the same op as flash_attn_func /
flash_attn_varlen_func, so on the same views the results are bitwise the unpacked function's: out, lse, and
the gradient into the packed tensor is the stack of dq, dk, dv. Against contiguous copies of q, k, v (another
memory layout the kernels must read right) they agree to rounding.

Backends: the reference, and the ones a CPU user's auto picks: the C++ CPU kernels (`cpu`, where the extension is
built) and torch's own (`torch`). Not auto itself: under the tests' TRITON_INTERPRET=1 auto takes Triton, whose
interpreter is slow here and adds nothing (the packing happens above the op, the same on every backend).
"""
import inspect

import pytest
import torch

import mmkern
from mmkern.ops import attention as ops
from conftest import forced, randn

BACKENDS = ["reference", "cpu", "torch"]
# One backend for the tests that need only one: what auto takes on a CPU without the interpreter.
CPU_DEFAULT = "cpu" if "cpu" in mmkern.available_backends() else "torch"
OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window softcap alibi": dict(window_size=(2, 1), softcap=3.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
}


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def assert_identical(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want), (got - want).abs().max()


def run(fn, inputs, dout=None):
    """out, lse of fn(*inputs), the gradients of (out * dout).sum() into inputs, and dout (drawn when None)."""
    out, lse = fn(*inputs)
    dout = randn(*out.shape, dtype=out.dtype) if dout is None else dout
    return out, lse, torch.autograd.grad(out, inputs, dout), dout


def check_packed(packed_fn, unpacked_fn, packed, others, order, dim, backend):
    """packed_fn(packed, *others) against unpacked_fn on views of packed (bitwise: the very same op calls) and on
    contiguous copies of them (to rounding: another layout under the same op): out, lse and the gradients into
    packed and others. order(views, others) lists the views and the others as unpacked_fn takes them."""
    packed, others = leaf(packed), [leaf(t) for t in others]

    def unpacked(*tensors):
        n = packed.shape[dim]
        return unpacked_fn(*order(tensors[:n], tensors[n:]))

    with forced(backend):
        out, lse, (d_packed, *d_others), dout = run(packed_fn, (packed, *others))
        twin = leaf(packed)
        views = twin.unbind(dim)
        want_out, want_lse, want_grads, _ = run(unpacked, (*views, *map(leaf, others)), dout)
        copies = [leaf(t.contiguous()) for t in packed.unbind(dim)]
        c_out, c_lse, c_grads, _ = run(unpacked, (*copies, *map(leaf, others)), dout)
    n = len(views)
    assert d_packed.shape == packed.shape
    assert_identical(out, want_out)
    assert_identical(lse, want_lse)
    assert_identical(d_packed, torch.stack(want_grads[:n], dim))
    for got, want in zip(d_others, want_grads[n:]):
        assert_identical(got, want)
    torch.testing.assert_close(out, c_out)
    torch.testing.assert_close(lse, c_lse)
    torch.testing.assert_close(d_packed, torch.stack(c_grads[:n], dim))
    for got, want in zip(d_others, c_grads[n:]):
        torch.testing.assert_close(got, want)
    assert out.abs().sum() > 0


# --------------------------------------------------------------------------- dense

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", list(OPTIONS))
def test_qkvpacked_matches_flash_attn_func(backend, options):
    kw = OPTIONS[options]
    check_packed(lambda qkv: mmkern.flash_attn_qkvpacked_func(qkv, return_lse=True, **kw),
                 lambda q, k, v: mmkern.flash_attn_func(q, k, v, return_lse=True, **kw),
                 randn(2, 6, 3, 4, 8, dtype=torch.float32), [], lambda views, _: views, 2, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,H_kv,Lq,Lk", [(4, 4, 5, 5), (4, 2, 3, 7), (4, 1, 6, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_kvpacked_matches_flash_attn_func(backend, H, H_kv, Lq, Lk, causal):
    """MHA, GQA and MQA, cross-attention (Lq != Lk, bottom-right causal)."""
    check_packed(lambda kv, q: mmkern.flash_attn_kvpacked_func(q, kv, causal=causal, return_lse=True),
                 lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=causal, return_lse=True),
                 randn(2, Lk, 2, H_kv, 8, dtype=torch.float32), [randn(2, Lq, H, 8, dtype=torch.float32)],
                 lambda views, others: (others[0], *views), 2, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qkvpacked_half_dtypes(dtype):
    check_packed(lambda qkv: mmkern.flash_attn_qkvpacked_func(qkv, causal=True, return_lse=True),
                 lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True),
                 randn(1, 5, 3, 2, 16, dtype=dtype), [], lambda views, _: views, 2, CPU_DEFAULT)


def test_without_return_lse_only_out():
    qkv = randn(1, 4, 3, 2, 8, dtype=torch.float32)
    with forced(CPU_DEFAULT):
        out = mmkern.flash_attn_qkvpacked_func(qkv)
        assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 2, 8)
        out = mmkern.flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:])
        assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 2, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_draws_the_same_mask(backend):
    """The packed function draws its seed as the unpacked one does: same torch.manual_seed, same mask."""
    qkv = randn(1, 6, 3, 2, 8, dtype=torch.float32)
    with forced(backend):
        torch.manual_seed(7)
        out = mmkern.flash_attn_qkvpacked_func(qkv, dropout_p=0.3)
        torch.manual_seed(7)
        want = mmkern.flash_attn_func(*qkv.unbind(2), dropout_p=0.3)
        no_dropout = mmkern.flash_attn_func(*qkv.unbind(2))
    assert_identical(out, want)
    assert not torch.equal(out, no_dropout)


def test_last_dim_not_contiguous():
    """A packed tensor whose last dimension is strided: the views are made last-dim contiguous (copied), and the
    result and the gradient (into the strided tensor, of its shape) are those of the contiguous tensor."""
    base = randn(2, 5, 3, 8, 4, dtype=torch.float32, requires_grad=True)
    qkv = base.transpose(-1, -2)
    assert qkv.stride(-1) != 1
    dense = leaf(qkv.contiguous())
    with forced(CPU_DEFAULT):
        out = mmkern.flash_attn_qkvpacked_func(qkv, causal=True)
        want = mmkern.flash_attn_qkvpacked_func(dense, causal=True)
        dout = randn(*out.shape, dtype=torch.float32)
        (d_base,) = torch.autograd.grad(out, base, dout)
        (d_dense,) = torch.autograd.grad(want, dense, dout)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(d_base.transpose(-1, -2), d_dense)


# --------------------------------------------------------------------------- varlen

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_qkvpacked_matches_flash_attn_varlen_func(backend, causal):
    lens = [3, 0, 5, 1]
    c, m = cu(lens), max(lens)
    check_packed(lambda qkv: mmkern.flash_attn_varlen_qkvpacked_func(qkv, c, m, causal=causal, return_lse=True),
                 lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, c, c, m, m, causal=causal, return_lse=True),
                 randn(sum(lens), 3, 4, 8, dtype=torch.float32), [], lambda views, _: views, 1, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_kvpacked_matches_flash_attn_varlen_func(backend, H, H_kv, causal):
    """Different lengths for queries and keys; a sequence with no queries and one with no keys (its queries give
    out 0, lse -inf)."""
    lens_q, lens_k = [2, 0, 4, 3], [3, 2, 0, 5]
    cq, ck = cu(lens_q), cu(lens_k)
    fn = lambda kv, q: mmkern.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                                               return_lse=True)
    check_packed(fn, lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k),
                                                                   causal=causal, return_lse=True),
                 randn(sum(lens_k), 2, H_kv, 8, dtype=torch.float32), [randn(sum(lens_q), H, 8, dtype=torch.float32)],
                 lambda views, others: (others[0], *views), 1, backend)
    q = randn(sum(lens_q), H, 8, dtype=torch.float32)
    with forced(backend):
        out, lse = fn(randn(sum(lens_k), 2, H_kv, 8, dtype=torch.float32), q)
    no_keys = slice(cq[2].item(), cq[3].item())
    assert torch.equal(out[no_keys], torch.zeros_like(out[no_keys]))
    assert torch.isneginf(lse[:, no_keys]).all()


# --------------------------------------------------------------------------- no copy, compile

def test_views_share_the_packed_storage():
    """The property the implementation relies on: unbind gives views at the packed tensor's own addresses."""
    qkv = randn(2, 4, 3, 2, 8, dtype=torch.float32)
    q, k, v = qkv.unbind(2)
    step = 2 * 8 * qkv.element_size()
    assert (q.data_ptr(), k.data_ptr(), v.data_ptr()) == (qkv.data_ptr(), qkv.data_ptr() + step, qkv.data_ptr() + 2 * step)
    assert q.stride(-1) == 1


def _calls():
    f32 = dict(dtype=torch.float32)
    qkv, kv, q = randn(2, 4, 3, 2, 8, **f32), randn(2, 5, 2, 1, 8, **f32), randn(2, 4, 2, 8, **f32)
    vqkv, vkv, vq = randn(6, 3, 2, 8, **f32), randn(7, 2, 1, 8, **f32), randn(6, 2, 8, **f32)
    cq, ck = cu([4, 2]), cu([3, 4])
    return {
        "qkvpacked": (lambda: mmkern.flash_attn_qkvpacked_func(qkv, causal=True), qkv, (qkv,) * 3),
        "kvpacked": (lambda: mmkern.flash_attn_kvpacked_func(q, kv), kv, (q, kv, kv)),
        "varlen_qkvpacked": (lambda: mmkern.flash_attn_varlen_qkvpacked_func(vqkv, cq, 4), vqkv, (vqkv,) * 3),
        "varlen_kvpacked": (lambda: mmkern.flash_attn_varlen_kvpacked_func(vq, vkv, cq, ck, 4, 4), vkv, (vq, vkv, vkv)),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_the_op_gets_views_not_copies(name, monkeypatch):
    """Wrap ops.attention: the q, k, v it receives live in the storage of the caller's tensors."""
    call, packed, owners = _calls()[name]
    seen = []

    def spy(q, k, v, **arguments):
        seen.append((q, k, v))
        return real(q, k, v, **arguments)

    real = ops.attention
    monkeypatch.setattr(ops, "attention", spy)
    with forced(CPU_DEFAULT):
        call()
    ((q, k, v),) = seen
    for t, owner in zip((q, k, v), owners):
        assert t.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()
    packed_dim = 2 if packed.dim() == 5 else 1
    first = 0 if owners[0] is packed else 1    # kvpacked: k and v are the packed tensor's slots 0 and 1
    step = packed.stride(packed_dim) * packed.element_size()
    views = (q, k, v)[first:]
    assert [t.data_ptr() for t in views] == [packed.data_ptr() + i * step for i in range(len(views))]


@pytest.mark.parametrize("name", ["qkvpacked", "varlen_kvpacked"])
def test_compile_fullgraph(name):
    """Forward and backward under torch.compile(fullgraph=True): no graph break, the eager result (the same op
    calls). Equal to rounding, not bitwise: on the `torch` backend (where mmkern._C is not built) the traced
    backward hands torch's CPU flash backward its gradient in another layout, which sums in another order (seen with
    torch 2.11: 3e-7 apart)."""
    f32 = dict(dtype=torch.float32)
    if name == "qkvpacked":
        packed, others = randn(2, 4, 3, 2, 8, **f32, requires_grad=True), []
        fn = lambda qkv: mmkern.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(2, -1), return_lse=True)
    else:
        cq, ck = cu([4, 0, 2]), cu([3, 4, 1])
        packed, others = randn(8, 2, 1, 8, **f32, requires_grad=True), [randn(6, 2, 8, **f32, requires_grad=True)]
        fn = lambda kv, q: mmkern.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 4, 4, causal=True, return_lse=True)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with forced(CPU_DEFAULT):
        out, lse = compiled(packed, *others)
        want_out, want_lse = fn(packed, *others)
        dout = randn(*out.shape, **f32)
        got = torch.autograd.grad(out, (packed, *others), dout)
        want = torch.autograd.grad(want_out, (packed, *others), dout)
    assert_identical(out, want_out)
    assert_identical(lse, want_lse)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the API

PACKED = ["flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
          "flash_attn_varlen_kvpacked_func"]


@pytest.mark.parametrize("name", PACKED)
def test_exported(name):
    assert name in mmkern.__all__ and getattr(mmkern, name) is getattr(mmkern.attention, name)


@pytest.mark.parametrize("name,leading", [
    ("flash_attn_qkvpacked_func", ["qkv"]),
    ("flash_attn_kvpacked_func", ["q", "kv"]),
    ("flash_attn_varlen_qkvpacked_func", ["qkv", "cu_seqlens", "max_seqlen"]),
    ("flash_attn_varlen_kvpacked_func", ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]),
])
def test_signature_is_flash_attns(name, leading):
    """flash-attn 2's positional arguments, then flash_attn_func's options with its defaults."""
    params = list(inspect.signature(getattr(mmkern, name)).parameters.values())
    assert [p.name for p in params[:len(leading)]] == leading
    assert all(p.default is inspect.Parameter.empty for p in params[:len(leading)])
    options = list(inspect.signature(mmkern.flash_attn_func).parameters.values())[3:]
    assert [(p.name, p.default) for p in params[len(leading):]] == [(p.name, p.default) for p in options]


# --------------------------------------------------------------------------- bad input

_q, _qkv, _kv = randn(2, 4, 2, 8), randn(2, 4, 3, 2, 8), randn(2, 4, 2, 2, 8)
_vq, _vqkv, _vkv, _cu = randn(6, 2, 8), randn(6, 3, 2, 8), randn(6, 2, 2, 8), cu([2, 4])
BAD = {
    "qkv rank": (lambda: mmkern.flash_attn_qkvpacked_func(_qkv[0]), ValueError,
                 r"flash_attn_qkvpacked_func: qkv must have shape \(batch, seqlen, 3, heads, head_dim\); got \(4, 3, 2, 8\)"),
    "qkv packed dim": (lambda: mmkern.flash_attn_qkvpacked_func(_kv), ValueError,
                       r"qkv must have shape \(batch, seqlen, 3, heads, head_dim\); got \(2, 4, 2, 2, 8\)"),
    "qkv not a tensor": (lambda: mmkern.flash_attn_qkvpacked_func(_qkv.tolist()), TypeError,
                         r"qkv must be a torch.Tensor, got list"),
    "qkv int": (lambda: mmkern.flash_attn_qkvpacked_func(_qkv.long()), TypeError, r"qkv must have dtype .*got torch.int64"),
    "kv rank": (lambda: mmkern.flash_attn_kvpacked_func(_q, _kv[:, :, 0]), ValueError,
                r"flash_attn_kvpacked_func: kv must have shape \(batch, seqlen_k, 2, kv_heads, head_dim\)"),
    "kv packed dim": (lambda: mmkern.flash_attn_kvpacked_func(_q, _qkv), ValueError,
                      r"kv must have shape \(batch, seqlen_k, 2, kv_heads, head_dim\); got \(2, 4, 3, 2, 8\)"),
    "kvpacked q not a tensor": (lambda: mmkern.flash_attn_kvpacked_func(None, _kv), TypeError,
                                r"q must be a torch.Tensor, got NoneType"),
    "varlen qkv dense layout": (lambda: mmkern.flash_attn_varlen_qkvpacked_func(_qkv, _cu, 4), ValueError,
                                r"flash_attn_varlen_qkvpacked_func: qkv must have shape \(total, 3, heads, head_dim\)"),
    "varlen qkv packed dim": (lambda: mmkern.flash_attn_varlen_qkvpacked_func(_vkv, _cu, 4), ValueError,
                              r"qkv must have shape \(total, 3, heads, head_dim\); got \(6, 2, 2, 8\)"),
    "varlen kv dense layout": (lambda: mmkern.flash_attn_varlen_kvpacked_func(_vq, _kv, _cu, _cu, 4, 4), ValueError,
                               r"flash_attn_varlen_kvpacked_func: kv must have shape \(total_k, 2, kv_heads, head_dim\)"),
    "varlen kv packed dim": (lambda: mmkern.flash_attn_varlen_kvpacked_func(_vq, _vqkv, _cu, _cu, 4, 4), ValueError,
                             r"kv must have shape \(total_k, 2, kv_heads, head_dim\); got \(6, 3, 2, 8\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_the_op(case, monkeypatch):
    call, exc, pattern = BAD[case]

    def not_reached(*args, **kwargs):
        raise AssertionError("ops.attention was called with bad input")

    monkeypatch.setattr(ops, "attention", not_reached)
    with pytest.raises(exc, match=pattern):
        call()


def test_what_the_op_checks_is_checked_once_by_the_op():
    """What the packed function passes on (here a head_dim of kv unlike q's) is the op's to check, on the views:
    its message names k, the view of kv."""
    with pytest.raises(ValueError, match=r"k.shape\[-1\] \(head_dim, as q\) must be 8"):
        mmkern.flash_attn_kvpacked_func(_q, randn(2, 4, 2, 2, 16))
