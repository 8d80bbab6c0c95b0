"""mmkern::attention_forward / attention_backward through torch's own CPU flash attention.

torch.nn.functional.scaled_dot_product_attention on CPU tensors runs
`aten._scaled_dot_product_flash_attention_for_cpu` (blocked, online softmax, fp32 accumulation, both
cores); this backend calls that op directly because it also returns the log-sum-exp that mmkern's
forward returns and its backward reuses. So a CPU user without the built extension gets torch's speed.

What this adds around torch's kernel, and why:
- flash-attn's layout (B, L, H, D) is handed over as a transposed view (no copy); GQA/MQA repeats k/v
  heads (torch's op has no GQA), and the backward sums dk/dv over each group;
- everything torch has no argument for becomes one float32 additive mask (B|1, H|1, Lq, Lk): bottom-right
  causal alignment (torch's is_causal is top-left), sliding windows, seqused_k (a KV cache), ALiBi, and the
  caller's bool/float attn_mask. Then memory is quadratic in the mask, as with SDPA and a mask;
- varlen batches run sequence by sequence (one host read of cu_seqlens, which the op reads anyway);
- the numerics contract (mmkern/ops/attention_problem.py): torch's kernel gives lse 0 for a row that sees
  no key, 0 for a row with a NaN score, and crashes on Lk = 0; rows that see no key get lse -inf here, and
  inputs holding a non-finite value take `_exact`, the same math in float32 through torch.logsumexp, which keeps
  NaN and +inf as the contract says (the forward looks at q, k, v only when torch's lse shows such a row).
A gradient on lse or on a float mask (torch's backward takes neither) runs `_exact_backward`, the written-out
backward in float32. Refused (reasons): dropout (mmkern's mask is a function of the seed, shared by every
backend; torch draws its own), softcap (no argument for it), CUDA tensors (there the Triton kernels take
every call), float64 (the reference's).
"""
from __future__ import annotations

import torch

from mmkern.ops.attention_problem import AttentionProblem
from mmkern.torch_backend.cache_gather import gathered_cache

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")


def _common_reasons(p: AttentionProblem) -> list[str]:
    reasons = []
    if p.device.type != "cpu":
        reasons.append("the torch backend's attention runs on CPU tensors (torch's CPU flash attention)")
    if p.dtype == torch.float64:
        reasons.append("q has dtype torch.float64; torch's CPU flash attention takes float32, bfloat16, float16")
    if p.dropout_p > 0:
        reasons.append(f"dropout_p = {p.dropout_p}: mmkern's dropout mask is a function of the seed, shared by every "
                       "backend; torch's SDPA draws its own")
    if p.softcap > 0:
        reasons.append(f"softcap = {p.softcap}; torch's SDPA has no softcap")
    return reasons


def forward_reasons(p: AttentionProblem) -> list[str]:
    return _common_reasons(p)


def backward_reasons(p: AttentionProblem) -> list[str]:
    return _common_reasons(p)


# --------------------------------------------------------------------------- one dense batch

class _Dense:
    """One dense (B, Lq, H, D) x (B, Lk, H_kv, D) problem in torch's terms: the (B, H, L, D) views, the
    additive mask (or None and is_causal), and which query rows see at least one key."""

    def __init__(self, p: AttentionProblem, q, k, v, seqused_k, alibi_slopes, attn_mask):
        B, Lq, H, _ = q.shape
        Lk = k.shape[1]
        self.group = H // k.shape[2]
        self.dtype = q.dtype
        # float16 runs torch's float32 kernel: on this kind of CPU (no fp16 arithmetic) torch converts inside
        # anyway, at the same speed (L 256..2048, H12 D64 causal: 0.97-1.0x), and its float16 path scales q
        # in float16 first, which put lse ~5e-5 off (40-60 float32 ulps); bfloat16 keeps its own (AMX) path.
        compute = torch.float32 if q.dtype == torch.float16 else q.dtype
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        self.q, self.k, self.v = q.transpose(1, 2), _repeat(k, self.group), _repeat(v, self.group)
        self.scale = p.softmax_scale
        self.is_causal = False
        self.mask = None
        self.sees_a_key = None          # (B|1, H|1, Lq) bool, None = every row sees a key
        if seqused_k is None and p.left < 0 and attn_mask is None and alibi_slopes is None:
            if p.right < 0:
                return                                          # no mask at all
            if p.right == 0 and (Lq == Lk or not p.causal_bottom_right):
                self.is_causal = True                           # torch's own causal mask (top-left)
                return
        i = torch.arange(Lq).view(1, 1, Lq, 1)
        j = torch.arange(Lk).view(1, 1, 1, Lk)
        k_len = Lk if seqused_k is None else seqused_k.long().view(B, 1, 1, 1)      # valid keys per sequence
        aligned = i + (k_len - Lq if p.causal_bottom_right else 0)   # the key position query i lines up with
        visible = j < k_len
        if p.right >= 0:
            visible = visible & (j <= aligned + p.right)
        if p.left >= 0:
            visible = visible & (j >= aligned - p.left)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        mask = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, NEG_INF)
        if alibi_slopes is not None:
            slopes = alibi_slopes.view(1, H, 1, 1) if alibi_slopes.dim() == 1 else alibi_slopes.view(B, H, 1, 1)
            # ALiBi is bottom-right aligned whatever the causal alignment (flash-attn's)
            mask = mask - slopes * (i + (k_len - Lq) - j).abs().float()
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            mask = mask + attn_mask.float()
            visible = visible & (attn_mask != NEG_INF)
        self.mask = mask
        self.sees_a_key = visible.any(-1)

    def finite_inputs(self) -> bool:
        tensors = [self.q, self.k, self.v] + ([self.mask] if self.mask is not None else [])
        return all(bool(torch.isfinite(t[t != NEG_INF] if t is self.mask else t).all()) for t in tensors)

    def forward(self):
        """(out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) float32), per the numerics contract."""
        if self.k.shape[2] == 0:
            return _exact(self)
        out, lse = _flash(self.q, self.k, self.v, 0.0, self.is_causal, attn_mask=self.mask, scale=self.scale)
        # torch's kernel gives a row with a NaN score lse 0 (and out 0), a row with a +inf score lse NaN: such
        # rows send the call to the exact path, once its inputs are seen to hold a non-finite value (a finite row
        # whose lse is exactly 0 costs that one check). One pass over lse, not three over q, k, v.
        suspect = (lse == 0) | torch.isnan(lse)
        if self.sees_a_key is not None:
            suspect &= self.sees_a_key
            lse = lse.masked_fill(~self.sees_a_key, NEG_INF)
        if bool(suspect.any()) and not self.finite_inputs():
            return _exact(self)
        return out.to(self.dtype), lse

    def backward(self, dout, out, lse, dlse, mask_grad: bool):
        """(dq, dk, dv) in (B, L, H, D), dk/dv summed over each GQA group, and the float mask's gradient (or
        None). torch's backward takes no dlse and returns no mask gradient: those calls, and inputs holding a
        non-finite value, take `_exact_backward`. torch's kernel wants its own lse convention: 0, not -inf, for
        a row that sees no key (its out and p are 0 either way)."""
        if self.k.shape[2] == 0 or dlse is not None or mask_grad or not self.finite_inputs():
            dq, dk, dv, d_mask = _exact_backward(self, dout, dlse)
        else:
            lse = lse.masked_fill(lse == NEG_INF, 0.0)
            compute = self.q.dtype
            dq, dk, dv = _flash_backward(dout.to(compute), self.q, self.k, self.v, out.to(compute), lse, 0.0,
                                         self.is_causal, attn_mask=self.mask, scale=self.scale)
            d_mask = None
        dq, dk, dv = dq.to(self.dtype), dk.to(self.dtype), dv.to(self.dtype)
        return dq.transpose(1, 2), _unrepeat(dk, self.group), _unrepeat(dv, self.group), d_mask


def _repeat(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, L, H_kv, D) -> (B, H, L, D) view, k/v heads repeated for GQA (a copy only when group > 1)."""
    t = t.transpose(1, 2)
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _unrepeat(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, L, D) gradient -> (B, L, H_kv, D), summed over the query heads sharing a k/v head."""
    B, H, L, D = t.shape
    if group > 1:
        t = t.view(B, H // group, group, L, D).sum(2)
    return t.transpose(1, 2)


def _exact_scores(d: _Dense) -> torch.Tensor:
    """(B, H, Lq, Lk) float32 scores with every mask added (-inf where a key is hidden)."""
    s = torch.einsum("bhqd,bhkd->bhqk", d.q.float(), d.k.float()) * d.scale
    if d.is_causal:
        Lq, Lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), NEG_INF)
    if d.mask is not None:
        s = s + d.mask
    return s


def _exact_probabilities(s: torch.Tensor):
    """(p, lse): torch.logsumexp gives -inf for a row that sees no key (p 0 there), NaN for a NaN score, +inf
    for a +inf score (p NaN at that key: inf - inf), as the numerics contract says."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.where((lse == NEG_INF).unsqueeze(-1), torch.zeros_like(p), p), lse


def _exact(d: _Dense):
    """The same math, materialised in float32 (quadratic memory), for inputs torch's kernel mishandles
    (non-finite values, no keys)."""
    p, lse = _exact_probabilities(_exact_scores(d))
    out = torch.einsum("bhqk,bhkd->bhqd", p, d.v.float())
    return out.to(d.dtype), lse


def _exact_backward(d: _Dense, dout: torch.Tensor, dlse: torch.Tensor | None):
    """The backward of `_exact`, written out (autograd through a row of -inf scores gives NaN):
        dV = P^T dO,  dP = dO V^T,  D = rowsum(dO * O),  dS = P (dP - D + dlse),  dQ = scale dS K,
        dK = scale dS^T Q;  the float mask's gradient is dS. Returns (B, H, L, D) gradients and dS."""
    s = _exact_scores(d)
    p, _ = _exact_probabilities(s)
    dout = dout.float()
    v = d.v.float()
    out = torch.einsum("bhqk,bhkd->bhqd", p, v)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, dout)
    dp = torch.einsum("bhqd,bhkd->bhqk", dout, v)
    row = (dout * out).sum(-1)
    if dlse is not None:
        row = row - dlse.float()
    ds = p * (dp - row.unsqueeze(-1))
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, d.k.float()) * d.scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, d.q.float()) * d.scale
    return dq, dk, dv, ds


# --------------------------------------------------------------------------- the backend kernels

def _sequences(p: AttentionProblem):
    """Yields (q, k, v, seqused_k, alibi_slopes, attn_mask, q_rows) per dense piece: the whole batch, or
    each varlen sequence as a batch of one (q_rows: its slice of the packed rows)."""
    if not p.varlen:
        yield p.q, p.k, p.v, p.seqused_k, p.alibi_slopes, p.attn_mask, slice(None)
        return
    cu_q, cu_k = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
    for b in range(p.batch):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        slopes = p.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b:b + 1]
        yield (p.q[rows].unsqueeze(0), p.k[keys].unsqueeze(0), p.v[keys].unsqueeze(0), None, slopes, None, rows)


def forward(p: AttentionProblem):
    if p.paged or p.leftpad_k is not None:
        p = p.with_dense_cache(*gathered_cache(p))           # a dense copy of the cache (cache_gather.py)
    if not p.varlen and p.q.numel() and p.k.shape[1]:
        o, l = _Dense(p, p.q, p.k, p.v, p.seqused_k, p.alibi_slopes, p.attn_mask).forward()
        return o.transpose(1, 2).contiguous(), l.contiguous()   # torch's out is (B, L, H, D) in memory already
    out = torch.empty(p.q.shape, dtype=p.q.dtype)
    lse = torch.empty(p.lse_shape, dtype=torch.float32)
    for q, k, v, seqused_k, slopes, mask, rows in _sequences(p):
        if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:
            continue
        o, l = _Dense(p, q, k, v, seqused_k, slopes, mask).forward()
        if p.varlen:
            out[rows] = o[0].transpose(0, 1)
            lse[:, rows] = l[0]
        else:
            out.copy_(o.transpose(1, 2))
            lse.copy_(l)
    return out, lse


def backward(p: AttentionProblem):
    dq, dk, dv = torch.zeros_like(p.q), torch.zeros_like(p.k), torch.zeros_like(p.v)
    mask_grad = p.attn_mask_needs_grad and p.attn_mask is not None and p.attn_mask.dtype != torch.bool
    d_mask = torch.zeros_like(p.attn_mask) if mask_grad else p.q.new_empty((0,))
    cu_k = p.cu_seqlens_k.tolist() if p.varlen else None
    for b, (q, k, v, seqused_k, slopes, mask, rows) in enumerate(_sequences(p)):
        if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:
            continue
        dense = _Dense(p, q, k, v, seqused_k, slopes, mask)
        if p.varlen:
            dout, out = p.dout[rows].unsqueeze(0).transpose(1, 2), p.out[rows].unsqueeze(0).transpose(1, 2)
            lse = p.lse[:, rows].unsqueeze(0)
            dlse = None if p.dlse is None else p.dlse[:, rows].unsqueeze(0)
        else:
            dout, out, lse, dlse = p.dout.transpose(1, 2), p.out.transpose(1, 2), p.lse, p.dlse
        g_q, g_k, g_v, g_mask = dense.backward(dout, out, lse.float(), dlse, mask_grad)
        if p.varlen:
            keys = slice(cu_k[b], cu_k[b + 1])
            dq[rows], dk[keys], dv[keys] = g_q[0], g_k[0], g_v[0]
        else:
            dq, dk, dv = g_q.contiguous(), g_k.contiguous(), g_v.contiguous()
            if mask_grad:
                d_mask = g_mask.to(p.attn_mask.dtype).contiguous()
    return dq, dk, dv, d_mask
