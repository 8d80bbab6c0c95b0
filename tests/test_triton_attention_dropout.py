"""Triton flash attention dropout against an independent model of its mask (tests/philox_model.py).

Why: the kernels' own test path, `mmkern.triton.attention.dropout_mask`, runs the same `dropout_keep` helper as
the forward and backward kernels, so an oracle fed that mask cannot notice a wrong mask (the same for every
batch entry or head, a wrong counter, a varlen sequence drawing another sequence's numbers). Here the mask
comes from numpy alone: Philox-4x32-10 (Triton's tl.rand) at the counters
((b * H + h) * max_seqlen_q + i) * max_seqlen_k + j, i and j positions within sequence b.

What: `dropout_mask` equals the model bit for bit; the forward (out, lse) and the gradients (dq, dk, dv) with
dropout, dense and varlen, in fp32/fp16/bf16, match the float64 oracle run with the MODEL's mask, each tensor on
its own by flash-attn's criterion (error <= 2 x eager PyTorch's error in the dtype + eps(dtype) max|oracle|; see
`judge` for the float32 gradients' yardstick); the masks differ across batch entries, heads and seeds, and the check rejects a mask repeated over
(batch, head), another seed's mask, and varlen draws at packed positions or from batch index 0.
Triton runs through its interpreter on a CPU (small shapes), natively on a GPU.
"""

import pytest
import torch

import mmkern
from mmkern import dispatch
from conftest import DTYPES, naive_attention_one, seed_drawn_after
from philox_model import attention_keep_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif("triton" not in dispatch.available_backends(),
                                reason="the triton backend is not usable here: "
                                       + "; ".join(dispatch.environment_reasons("triton")
                                                   if "triton" in dispatch.backends() else ["not registered"]))


# --------------------------------------------------------------------------- helpers

def model_mask(seed, B, H, Lq, Lk, p, lens_q=None, lens_k=None) -> torch.Tensor:
    """The independent model's keep mask, (B, H, Lq, Lk) torch bool on the CPU."""
    return torch.from_numpy(attention_keep_mask(seed, B, H, Lq, Lk, p, lens_q, lens_k))


def kernel_mask(seed, B, H, Lq, Lk, p) -> torch.Tensor:
    from mmkern.triton.attention import dropout_mask
    return dropout_mask(torch.tensor([seed], dtype=torch.int64), B, H, Lq, Lk, p, DEVICE).cpu()


def fresh_manual_seed() -> int:
    """A torch.manual_seed of this test's own (conftest seeds each test): fresh dropout seeds per test."""
    return int(torch.randint(0, 2**31 - 1, ()))


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, equal infinities (lse = -inf) exact, NaN infinitely wrong."""
    if a.numel() == 0:
        return 0.0
    a, b = a.double().cpu(), b.double().cpu()
    diff = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def tolerance(eager_error, oracle, dtype) -> float:
    """flash-attn's criterion for one tensor: 2 x eager PyTorch's error in `dtype` + eps(dtype) max|oracle|."""
    finite = oracle[torch.isfinite(oracle)]
    largest = finite.abs().max().item() if finite.numel() else 0.0
    return 2 * eager_error + torch.finfo(dtype).eps * largest


class Dense:
    """Sequence b of a (B, L, H, D) batch is row b; lse (B, H, Lq)."""
    def q_parts(self, t):
        return list(t)

    k_parts = q_parts

    def keep_parts(self, keep):
        return list(keep)

    def join(self, parts):
        return torch.stack(parts)

    join_lse = join


class Varlen:
    """Sequence b of a packed (total, H, D) batch is rows cu[b]:cu[b + 1]; lse (H, total_q); its dropout draws
    sit at keep[b, :, :len_q, :len_k]."""
    def __init__(self, lens_q, lens_k):
        self.lens_q, self.lens_k = list(lens_q), list(lens_k)

    def q_parts(self, t):
        return list(t.split(self.lens_q))

    def k_parts(self, t):
        return list(t.split(self.lens_k))

    def keep_parts(self, keep):
        return [keep[b, :, :lq, :lk] for b, (lq, lk) in enumerate(zip(self.lens_q, self.lens_k))]

    def join(self, parts):
        return torch.cat(parts)

    def join_lse(self, parts):
        return torch.cat(parts, 1)


def attention(layout, q, k, v, keep, p, causal):
    """(out, lse) from conftest's hand-written attention, sequence by sequence (autograd gives the gradients)."""
    outs, lses = zip(*(naive_attention_one(qb, kb, vb, causal=causal, keep=mb, dropout_p=p)
                       for qb, kb, vb, mb in zip(layout.q_parts(q), layout.k_parts(k), layout.k_parts(v),
                                                 layout.keep_parts(keep))))
    return layout.join(list(outs)), layout.join_lse(list(lses))


def flash_backward_one(q, k, v, dout, out, keep, p, causal):
    """dq, dk, dv of one sequence by flash-attn's backward formulas, in eager PyTorch (float32 for float32 inputs;
    exact for float64 ones): P = exp(S - lse) recomputed, Delta = rowsum(dO * O) from the forward's output O,
    dS = P * (dropout(dP) - Delta), dQ = dS K scale, dK = dS^T Q scale, dV = dropout(P)^T dO.
    q (Lq, H, D), k/v (Lk, H_kv, D), out/dout (Lq, H, D), keep (H, Lq, Lk)."""
    Lq, H, D = q.shape
    Lk, H_kv = k.shape[0], k.shape[1]
    scale = D ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)       # float32 (float64 for a float64 check)
    dq = torch.zeros(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc)
    dv = torch.zeros(v.shape, dtype=acc)
    hidden = causal & (torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None] + (Lk - Lq))
    for h in range(H):
        g = h * H_kv // H
        s = ((q[:, h] @ k[:, g].T) * scale).to(acc).masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        prob = torch.where(torch.isfinite(lse), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)), 0.0)
        dp = (dout[:, h] @ v[:, g].T) * keep[h] / (1 - p)
        delta = (dout[:, h].to(acc) * out[:, h].to(acc)).sum(-1, keepdim=True)
        ds = (prob * (dp.to(acc) - delta)).to(q.dtype)
        dq[:, h] = (ds @ k[:, g]).to(acc) * scale
        dk[:, g] += (ds.T @ q[:, h]).to(acc) * scale
        dv[:, g] += ((prob.to(q.dtype) * keep[h] / (1 - p)).T @ dout[:, h]).to(acc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def flash_backward(layout, q, k, v, dout, out, keep, p, causal):
    parts = [flash_backward_one(*a, p, causal) for a in zip(layout.q_parts(q), layout.k_parts(k), layout.k_parts(v),
                                                            layout.q_parts(dout), layout.q_parts(out),
                                                            layout.keep_parts(keep))]
    return [layout.join([part[i] for part in parts]) for i in range(3)]


def with_grads(fn, inputs, dout):
    """(outputs..., d inputs...) of fn(*inputs) for the output gradient `dout` of the first output."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    grads = torch.autograd.grad(outputs[0], leaves, dout)
    return [o.detach() for o in outputs] + list(grads)


NAMES = ("out", "lse", "dq", "dk", "dv")


def judge(got, layout, inputs, dout, keep, p, causal, dtype):
    """The kernel's (out, lse, dq, dk, dv) against the float64 oracle run with mask `keep` on the same
    low-precision inputs (upcast), each tensor on its own: error <= 2 x eager's error + eps(dtype) max|oracle|,
    eager's error being that of the same math in eager PyTorch in `dtype` on the same inputs: conftest's attention
    and autograd through it. AssertionError naming the tensor otherwise.

    Float32 gradients only: eager's error is the larger of autograd's and that of flash-attn's backward formulas,
    which the kernels implement, run eagerly in float32 (flash_backward_one). The formulas form
    dS = P (dP - Delta) with Delta = rowsum(dO * O) from the stored output: the difference cancels (Delta is the
    P-weighted mean of dP) and carries O's rounding into every dS of the row, where autograd subtracts sum(P dP)
    formed from the P it kept. Eager float32 autograd sits ~1 ulp from the oracle, the formulas (eager, or the
    kernels) a few ulps: two of 25 draws of B2 H2 Lq23 Lk13 causal with dropout gave dk errors, in ulps of
    max|dk|, (autograd, eager formulas, kernel) = (1.7, 5.3, 5.3) and (1.4, 8.3, 3.4); with autograd alone,
    float32 dq or dk missed for 2 of MMKERN_TEST_SEED 0-6. In float16/bfloat16 the dtype's own rounding dominates,
    the kernels (float32 accumulation) stay within 2x autograd's error, and autograd, 1.5-2.4x more accurate than
    the eager formulas for dq and dk (medians over 10 draws), stays the yardstick."""
    f64 = [t.double().cpu() for t in inputs]
    oracle = with_grads(lambda *t: attention(layout, *t, keep, p, causal), f64, dout.double().cpu())
    low = [t.cpu() for t in inputs]
    eager = with_grads(lambda *t: attention(layout, *t, keep, p, causal), low, dout.cpu())
    eager_errors = [err(e, o) for e, o in zip(eager, oracle)]
    if dtype == torch.float32:
        formulas = flash_backward(layout, *low, dout.cpu(), eager[0], keep, p, causal)
        eager_errors[2:] = [max(a, err(f, o)) for a, f, o in zip(eager_errors[2:], formulas, oracle[2:])]
    for name, g, e, o in zip(NAMES, got, eager_errors, oracle):
        assert g.shape == o.shape, f"{name}: shape {tuple(g.shape)} != {tuple(o.shape)}"
        error, tol = err(g, o), tolerance(e, o, dtype)
        assert error <= tol, f"{name} [{dtype}]: error {error:.3e} > tolerance {tol:.3e} (eager {dtype} error {e:.3e})"


def run_kernel(fn, inputs, dout):
    with mmkern.backend("triton"):
        return with_grads(fn, [t.to(DEVICE) for t in inputs], dout.to(DEVICE))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """The launcher's outputs start as NaN, so an element the kernels never write shows as an error."""
    import mmkern.triton.attention as A
    monkeypatch.setattr(A, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))


# --------------------------------------------------------------------------- the mask itself

@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 7, 2**62 - 1])
@pytest.mark.parametrize("B,H,Lq,Lk", [(2, 3, 19, 45), (1, 2, 33, 7), (3, 1, 1, 70), (2, 2, 64, 31)])
def test_dropout_mask_is_the_models_bit_for_bit(seed, B, H, Lq, Lk):
    p = 0.3
    want = model_mask(seed, B, H, Lq, Lk, p)
    got = kernel_mask(seed, B, H, Lq, Lk, p)
    assert got.dtype == torch.bool and got.shape == (B, H, Lq, Lk)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {want.numel()} entries differ from the model"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_keep_rate_and_threshold(p):
    seed, B, H, Lq, Lk = 99, 2, 2, 37, 41
    keep = model_mask(seed, B, H, Lq, Lk, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    assert torch.equal(kernel_mask(seed, B, H, Lq, Lk, p), keep)


def test_masks_differ_across_batch_heads_and_seeds():
    """Every (batch, head) draws its own mask, and another seed another mask: model and kernel. (A kernel mask
    repeated over (batch, head) fails the bit-for-bit test above, since these model masks differ.)"""
    B, H, Lq, Lk, p = 3, 4, 19, 23, 0.3
    for masks in (model_mask(5, B, H, Lq, Lk, p), kernel_mask(5, B, H, Lq, Lk, p)):
        flat = masks.reshape(B * H, Lq * Lk)
        for i in range(B * H):
            for j in range(i):
                assert not torch.equal(flat[i], flat[j]), f"(b, h) #{i} and #{j} draw the same mask"
    assert not torch.equal(model_mask(5, B, H, Lq, Lk, p), model_mask(6, B, H, Lq, Lk, p))
    assert not torch.equal(kernel_mask(5, B, H, Lq, Lk, p), kernel_mask(6, B, H, Lq, Lk, p))


# --------------------------------------------------------------------------- forward and backward, dense

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("Lq,Lk,H_kv,causal", [(19, 19, 2, True), (13, 23, 1, False), (23, 13, 2, True)],
                         ids=["self-causal", "cross-mqa", "cross-causal-empty-rows"])
def test_forward_and_gradients_match_the_oracle_with_the_model_mask(dtype, Lq, Lk, H_kv, causal, poisoned_outputs):
    B, H, D, p = 2, 2, 16, 0.3
    q = torch.randn(B, Lq, H, D).to(dtype)
    k, v = (torch.randn(B, Lk, H_kv, D).to(dtype) for _ in range(2))
    dout = torch.randn(B, Lq, H, D).to(dtype)
    manual = fresh_manual_seed()
    keep = model_mask(seed_drawn_after(manual), B, H, Lq, Lk, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.08

    torch.manual_seed(manual)           # the public function draws the seed `keep` was built from
    got = run_kernel(lambda q, k, v: mmkern.flash_attn_func(q, k, v, dropout_p=p, causal=causal, return_lse=True),
                     (q, k, v), dout)
    args = (Dense(), (q, k, v), dout)

    # The check can fail: the same mask for every (batch, head), or another seed's mask, is rejected.
    assert not all(torch.equal(keep[b, h], keep[0, 0]) for b in range(B) for h in range(H))
    for wrong in (keep[:1, :1].expand_as(keep), model_mask(seed_drawn_after(manual) + 1, B, H, Lq, Lk, p)):
        with pytest.raises(AssertionError, match="^out"):
            judge(got, *args, wrong, p, causal, dtype)
    judge(got, *args, keep, p, causal, dtype)


# --------------------------------------------------------------------------- varlen

LENS_Q, LENS_K = [7, 19, 0, 1, 12], [11, 4, 5, 19, 12]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def test_varlen_model_mask_is_the_dense_layout_at_positions_within_each_sequence():
    seed, H, p = 4242, 3, 0.3
    B, Lq, Lk = len(LENS_Q), max(LENS_Q), max(LENS_K)
    varlen = model_mask(seed, B, H, Lq, Lk, p, LENS_Q, LENS_K)
    dense = kernel_mask(seed, B, H, Lq, Lk, p)
    for b, (lq, lk) in enumerate(zip(LENS_Q, LENS_K)):
        assert torch.equal(varlen[b, :, :lq, :lk], dense[b, :, :lq, :lk])
        assert not varlen[b, :, lq:].any() and not varlen[b, :, :, lk:].any()
    # sequences 1 and 4 share no draws although their lengths overlap (the batch index is in the counter)
    assert not torch.equal(varlen[1, :, :12, :4], varlen[4, :, :12, :4])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_forward_and_gradients_match_the_oracle_with_the_model_mask(dtype, causal, poisoned_outputs):
    H, H_kv, D, p = 2, 1, 16, 0.25
    B, Lq, Lk = len(LENS_Q), max(LENS_Q), max(LENS_K)
    q = torch.randn(sum(LENS_Q), H, D).to(dtype)
    k, v = (torch.randn(sum(LENS_K), H_kv, D).to(dtype) for _ in range(2))
    dout = torch.randn(sum(LENS_Q), H, D).to(dtype)
    cu_q, cu_k = _cu(LENS_Q).to(DEVICE), _cu(LENS_K).to(DEVICE)
    manual = fresh_manual_seed()
    keep = model_mask(seed_drawn_after(manual), B, H, Lq, Lk, p, LENS_Q, LENS_K)

    torch.manual_seed(manual)
    got = run_kernel(lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, cu_q, cu_k, Lq, Lk, dropout_p=p,
                                                                   causal=causal, return_lse=True),
                     (q, k, v), dout)
    args = (Varlen(LENS_Q, LENS_K), (q, k, v), dout)

    # The check can fail: sequences drawing at packed positions (row cu_q[b] + i instead of i), or all from
    # batch index 0's draws, are rejected.
    packed = model_mask(seed_drawn_after(manual), 1, H, sum(LENS_Q), sum(LENS_K), p)[0]
    first = model_mask(seed_drawn_after(manual), 1, H, Lq, Lk, p)[0]
    wrong_packed, wrong_first = torch.zeros_like(keep), torch.zeros_like(keep)
    for b, (lq, lk) in enumerate(zip(LENS_Q, LENS_K)):
        sq, sk = sum(LENS_Q[:b]), sum(LENS_K[:b])
        wrong_packed[b, :, :lq, :lk] = packed[:, sq:sq + lq, sk:sk + lk]
        wrong_first[b, :, :lq, :lk] = first[:, :lq, :lk]
    for wrong in (wrong_packed, wrong_first):
        with pytest.raises(AssertionError, match="^out"):
            judge(got, *args, wrong, p, causal, dtype)
    judge(got, *args, keep, p, causal, dtype)
