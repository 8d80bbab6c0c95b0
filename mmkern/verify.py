"""`mmkern verify`: every op on every usable backend against the float64 reference.

flash-attn's criterion, for each case (an op with a small, awkward shape), backend and dtype d, applied
to each output tensor (and each gradient) on its own:
    inputs    = fresh float64 draws rounded to d: the backend, the yardstick and the oracle all see them
    oracle    = the reference math in float64 on those rounded inputs (upcast)
    error     = max |backend(inputs) - oracle|
    baseline  = max |eager PyTorch in p - oracle|   (the reference math run in p)
    tolerance = 2 * baseline + eps(p) * max |oracle|      (gradients judged at float32: 3 eps(p) * max |oracle|)
where p, the precision an output is judged at, is d, or float32 for an output the op returns in float32
whatever d is (the lse; the residual stream with residual_in_fp32): a kernel that rounds such an
output to d fails. The last term, one unit in the last place of the largest output, keeps the criterion
meaningful for tiny tensors, where the baseline's error can be zero by luck. Where eager PyTorch in d is
not finite (it overflows where the kernel, computing in float32, does not), the baseline is the
float32 yardstick's scaled by eps(d) / eps(float32), and the row says so. A row whose tolerance is not
finite fails: a check with an infinite bound is no check.
Float32 gradients get a floor of 3 ulps (FLOAT32_GRADIENT_ULPS): a flash attention backward recomputes
P = e^(s - lse) from the forward's float32 lse with scores from another GEMM call (another blocking, another
summation order: one ulp of s apart), and that ulp is a relative error of every P of the row, coherent in
dV; torch's own CPU flash attention lands 2-3 ulps from the oracle for the same reason (on an AMD EPYC,
MKL), while the materialised-softmax yardstick is often within an ulp by luck (flash-attn 3's tests add
twice the reference's rounding, dq_atol, for the same reason; the fuzz suite's floor is 4 ulps).
Rows "reference vs torch" check the oracle itself against torch's own float64 implementations.
Backends that cannot run in this process but could in another (Triton on a machine without a
GPU: through its interpreter) are verified in a subprocess and their rows merged in.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import mmkern
from mmkern import dispatch
from mmkern.reference.precision import compute_in

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    shape: str
    error: float
    tolerance: float
    note: str = ""              # how the bound was derived, where it is not the plain criterion
    gradient: bool = False      # the row judges a gradient (not an output of the forward)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.tolerance) and self.error <= self.tolerance


@dataclass
class Case:
    op: str                                   # what the row names
    shape: str
    make: Callable[[], dict]                  # fresh float64 inputs, by argument name
    run: Callable[..., tuple]                 # the public function; returns a tuple of outputs
    cast: tuple[str, ...]                     # inputs converted to the dtype under test
    grad: tuple[str, ...] = ()                # inputs whose gradients are checked too
    torch_impl: Callable[..., tuple] | None = None   # torch's own float64 implementation, if any
    ops: tuple[str, ...] = field(default=())  # the dispatcher ops it exercises
    outputs: tuple[str, ...] = ()             # names of run's outputs in the rows (default out, out1, ...)

    def output_names(self, n: int) -> list[str]:
        names = list(self.outputs) + [f"out{i}" if i else "out" for i in range(len(self.outputs), n)]
        return names[:n] + [f"d{name}" for name in self.grad]


@dataclass
class Comparison:
    """One output tensor of a case judged against the oracle (the numbers a Row is made of)."""
    name: str                 # "<case.op> <output>", e.g. "flash_attn_func causal gqa dq"
    error: float              # max |backend - oracle|
    baseline: float           # max |eager in `judged_at` - oracle| (scaled, see note)
    ulp: float                # eps(judged_at) * max |oracle|
    judged_at: torch.dtype
    gradient: bool
    note: str = ""
    ran: bool = True          # some op of the case ran on the backend judged (mmkern.dispatch_log)

    def tolerance(self, ulps: float = 1.0) -> float:
        return 2 * self.baseline + ulps * self.ulp


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, counting equal infinities (lse = -inf) and NaN where the other has NaN too (the mean loss of
    an empty batch) as exact, and any other NaN as infinitely wrong."""
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return math.inf if torch.isnan(diff).any() else diff.max().item()


def _largest(tensors) -> float:
    finite = [t.double().abs()[torch.isfinite(t)] for t in tensors if t.numel()]
    return max([t.max().item() for t in finite if t.numel()], default=0.0)


def _execute(case: Case, inputs: dict, dout_seed: int, dout_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Outputs of the case, then the gradients of its `grad` inputs (with a fixed random dout, rounded to
    `dout_dtype` when given, so the oracle gets the same output gradient as the backend)."""
    inputs = {n: (t.clone().requires_grad_(n in case.grad) if isinstance(t, torch.Tensor) else t)
              for n, t in inputs.items()}
    outputs = case.run(**inputs)
    results = [o.detach() for o in outputs]
    if case.grad:
        generator = torch.Generator().manual_seed(dout_seed)
        douts = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(dout_dtype or o.dtype).to(o.dtype)
                 for o in outputs[:1]]
        grads = torch.autograd.grad(outputs[:1], [inputs[n] for n in case.grad], douts)
        results += list(grads)
    return results


def _cast(case: Case, inputs: dict, dtype: torch.dtype) -> dict:
    return {n: (t.to(dtype) if n in case.cast else t) for n, t in inputs.items()}


def rounded_inputs(case: Case, inputs: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """(the inputs in `dtype`, the same values upcast to float64): what the backend and the oracle get."""
    low = _cast(case, inputs, dtype)
    return low, {n: (t.double() if n in case.cast else t) for n, t in low.items()}


# Backends whose attention lse of a half-precision call is judged at the call's dtype, not at float32: the
# `torch` backend is torch's own CPU flash attention, whose bfloat16 path (oneDNN/AMX) rounds inside and gives
# lse 3e-5..6e-5 off the oracle at L <= 20 (40-60 float32 ulps; its out and gradients meet the criterion).
# It is torch's numerics, which that backend stands for; mmkern's own kernels are judged at float32.
HALF_PRECISION_LSE = ("torch",)


def _judged_at(output_dtype: torch.dtype, dtype: torch.dtype, backend: str = "", output: str = "") -> torch.dtype:
    """The precision an output is judged at: d, or float32 for a float32 output of a half-precision call (the
    output's dtype as the op defines it, the reference's: never the judged backend's own), except the lse of
    the backends in HALF_PRECISION_LSE."""
    if output_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16):
        if output == "lse" and backend in HALF_PRECISION_LSE:
            return dtype
        return torch.float32
    return dtype


def compare(case: Case, backend: str, dtype: torch.dtype) -> list[Comparison]:
    """Each output (then each gradient) of `case` on `backend` in `dtype`, against the oracle on the same
    rounded inputs, with its yardstick (see the module docstring)."""
    low, upcast = rounded_inputs(case, case.make(), dtype)
    yardsticks: dict[torch.dtype, list[torch.Tensor]] = {}

    def baseline(precision: torch.dtype) -> list[torch.Tensor]:
        """Eager PyTorch (the reference math) computed in `precision`, on the rounded inputs held in
        `precision` (so a float32 yardstick's outputs are float32: its error is the computation's alone,
        not the rounding of a half-precision output)."""
        if precision not in yardsticks:
            with mmkern.backend("reference"), compute_in(precision):
                yardsticks[precision] = _execute(case, _cast(case, low, precision), 0)
        return yardsticks[precision]

    with mmkern.backend("reference"):
        oracle = _execute(case, upcast, 0, dout_dtype=dtype)
    baseline(dtype)
    with mmkern.backend(backend), mmkern.dispatch_log() as log:
        got = _execute(case, low, 0)
    n_out = len(oracle) - len(case.grad)
    comparisons = []
    for i, (name, g, o) in enumerate(zip(case.output_names(n_out), got, oracle)):
        promised = baseline(dtype)[i].dtype           # the dtype the op returns for these inputs (the reference's)
        precision = _judged_at(promised, dtype, backend, name)
        base, note = _err(baseline(precision)[i], o), ""
        if not math.isfinite(base) and precision != torch.float32:
            base = _err(baseline(torch.float32)[i], o) * torch.finfo(precision).eps / torch.finfo(torch.float32).eps
            note = f"eager {str(precision).replace('torch.', '')} not finite: float32 yardstick x eps ratio"
        ulp = torch.finfo(precision).eps * max(_largest([o]), 1e-3)
        if precision != dtype:
            note = note or "float32 output: judged at float32"
        elif promised != dtype:
            note = note or f"torch's lse: judged at {str(dtype).replace('torch.', '')} (verify.HALF_PRECISION_LSE)"
        error = _err(g, o)
        if g.dtype != promised:       # e.g. a float32 residual stream returned in half: wrong whatever its values
            error, note = math.inf, f"returned {g.dtype}, the op returns {promised}"
        comparisons.append(Comparison(f"{case.op} {name}", error, base, ulp, precision, i >= n_out, note,
                                      log.ran(backend)))
    return comparisons


FLOAT32_GRADIENT_ULPS = 3.0   # see the module docstring


def row_ulps(c: Comparison) -> float:
    """The floor of a row's tolerance, in ulps of its largest oracle value."""
    return FLOAT32_GRADIENT_ULPS if c.gradient and c.judged_at == torch.float32 else 1.0


def measure(case: Case, backend: str, dtype: torch.dtype) -> list[Row]:
    """The rows of `case` on `backend` in `dtype`: one per output tensor and per gradient."""
    label = str(dtype).replace("torch.", "")
    return [Row(c.name, backend, label, case.shape, c.error if c.ran else math.inf, c.tolerance(row_ulps(c)),
                c.note if c.ran else f"no op ran on {backend}", c.gradient) for c in compare(case, backend, dtype)]


def measure_oracle_against_torch(case: Case) -> Row:
    inputs = case.make()
    with mmkern.backend("reference"):
        oracle = _execute(case, inputs, 0)
    theirs = _execute(Case(case.op, case.shape, case.make, case.torch_impl, case.cast, case.grad), inputs, 0)
    error = max(_err(a, b) for a, b in zip(oracle, theirs))
    return Row(case.op, "reference vs torch", "float64", case.shape, error, 1e-10)


# --------------------------------------------------------------------------- the cases

def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


_sigmas = torch.cat([torch.linspace(14.6, 0.03, 10), torch.zeros(1)])      # an Euler schedule (N = 10 steps)


def _linear_alphas_cumprod(T=1000):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


def _rotary_tables(positions: int, rotary_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's float32 (cos, sin) tables: (positions, rotary_dim / 2), angle p * base^(-2i / rotary_dim)."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def cases() -> list[Case]:
    lens_q, lens_k = [5, 1, 0, 9], [7, 4, 3, 9]
    ac = _linear_alphas_cumprod()
    return [
        Case("flash_attn_func causal gqa", "B2 Lq13 Lk17 H4/2 D40",
             lambda: dict(q=_randn(2, 13, 4, 40), k=_randn(2, 17, 2, 40), v=_randn(2, 17, 2, 40)),
             lambda q, k, v: mmkern.flash_attn_func(q, k, v, causal=True, return_lse=True),
             cast=("q", "k", "v"), grad=("q", "k", "v"), ops=("attention_forward", "attention_backward"),
             outputs=("out", "lse")),
        Case("flash_attn_func window+softcap+alibi", "B2 L11 H3 D24",
             lambda: dict(q=_randn(2, 11, 3, 24), k=_randn(2, 11, 3, 24), v=_randn(2, 11, 3, 24),
                          slopes=torch.rand(3)),
             lambda q, k, v, slopes: mmkern.flash_attn_func(q, k, v, window_size=(4, 2), softcap=2.0,
                                                             alibi_slopes=slopes, return_lse=True),
             cast=("q", "k", "v"), grad=("q", "k", "v"), ops=("attention_forward", "attention_backward"),
             outputs=("out", "lse")),
        Case("flash_attn_varlen_func causal", f"lens_q {lens_q} lens_k {lens_k} H2 D32",
             lambda: dict(q=_randn(sum(lens_q), 2, 32), k=_randn(sum(lens_k), 2, 32), v=_randn(sum(lens_k), 2, 32)),
             lambda q, k, v: mmkern.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q),
                                                            max(lens_k), causal=True, return_lse=True),
             cast=("q", "k", "v"), grad=("q", "k", "v"), ops=("attention_forward", "attention_backward"),
             outputs=("out", "lse")),
        Case("flash_attn_with_kvcache decode", "B3 Lq1 cache 33 +1 H4/1 D64",
             lambda: dict(q=_randn(3, 1, 4, 64), k_cache=_randn(3, 33, 1, 64), v_cache=_randn(3, 33, 1, 64),
                          k=_randn(3, 1, 1, 64), v=_randn(3, 1, 1, 64)),
             lambda q, k_cache, v_cache, k, v: (mmkern.flash_attn_with_kvcache(
                 q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([0, 17, 32], dtype=torch.int32),
                 causal=True),),
             cast=("q", "k_cache", "v_cache", "k", "v"), ops=("kvcache_append", "attention_forward")),
        Case("flash_attn_with_kvcache paged decode", "B3 Lq1 pages 7x16 (2 per sequence, shuffled) +1 H4/2 D48",
             lambda: dict(q=_randn(3, 1, 4, 48), k_cache=_randn(7, 16, 2, 48), v_cache=_randn(7, 16, 2, 48),
                          k=_randn(3, 1, 2, 48), v=_randn(3, 1, 2, 48)),
             lambda q, k_cache, v_cache, k, v: (mmkern.flash_attn_with_kvcache(
                 q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([0, 16, 29], dtype=torch.int32),
                 block_table=torch.tensor([[5, 2], [0, 6], [3, 1]], dtype=torch.int32), causal=True),),
             cast=("q", "k_cache", "v_cache", "k", "v"), ops=("kvcache_append", "attention_forward")),
        Case("scaled_dot_product_attention mask", "B2 H3 Lq7 Lk10 D16",
             lambda: dict(q=_randn(2, 3, 7, 16), k=_randn(2, 3, 10, 16), v=_randn(2, 3, 10, 16), mask=_randn(7, 10)),
             lambda q, k, v, mask: (mmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask),),
             cast=("q", "k", "v", "mask"), grad=("q", "k", "v", "mask"),
             torch_impl=lambda q, k, v, mask: (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),),
             ops=("attention_forward", "attention_backward")),
        Case("layer_norm_residual prenorm", "rows 6 N 100",
             lambda: dict(x=_randn(6, 100), r=_randn(6, 100), w=_randn(100), b=_randn(100)),
             lambda x, r, w, b: mmkern.layer_norm_residual(x, r, w, b, prenorm=True),
             cast=("x", "r", "w", "b"), grad=("x", "r", "w", "b"),
             torch_impl=lambda x, r, w, b: (F.layer_norm(x + r, (100,), w, b), x + r),
             ops=("norm_residual_forward", "norm_residual_backward"), outputs=("out", "residual")),
        Case("layer_norm_residual prenorm residual_in_fp32", "rows 7 N 96",
             lambda: dict(x=_randn(7, 96), r=_randn(7, 96), w=_randn(96), b=_randn(96)),
             lambda x, r, w, b: mmkern.layer_norm_residual(x, r.float(), w, b, prenorm=True, residual_in_fp32=True),
             cast=("x", "w", "b"),                 # r: a float32 stream, full float32 values grad=("x", "r", "w", "b"),
             ops=("norm_residual_forward", "norm_residual_backward"), outputs=("out", "residual")),
        Case("rms_norm_residual", "rows 5 N 77",
             lambda: dict(x=_randn(5, 77), r=_randn(5, 77), w=_randn(77)),
             lambda x, r, w: (mmkern.rms_norm_residual(x, r, w),),
             cast=("x", "r", "w"), grad=("x", "r", "w"),
             torch_impl=lambda x, r, w: (F.rms_norm(x + r, (77,), w, eps=1e-6),),
             ops=("norm_residual_forward", "norm_residual_backward")),
        Case("layer_norm_residual adaLN", "B2 L3 N 4100 (wide rows)",
             lambda: dict(x=_randn(2, 3, 4100), r=_randn(2, 3, 4100), shift=_randn(2, 4100), scale=_randn(2, 4100)),
             lambda x, r, shift, scale: (mmkern.layer_norm_residual(x, r, modulation=(shift, scale)),),
             cast=("x", "r", "shift", "scale"), grad=("x", "r", "shift", "scale"),
             torch_impl=lambda x, r, shift, scale: (F.layer_norm(x + r, (4100,)) * (1 + scale[:, None]) +
                                                    shift[:, None],),
             ops=("norm_residual_forward", "norm_residual_backward")),
        Case("diffusion.add_noise", "B4 3x5x5",
             lambda: dict(x0=_randn(4, 3, 5, 5), noise=_randn(4, 3, 5, 5)),
             lambda x0, noise: (mmkern.diffusion.add_noise(x0, noise, torch.tensor([0, 1, 500, 999]), ac),),
             cast=("x0", "noise"), ops=("add_noise",)),
        Case("diffusion.get_velocity", "B4 3x5x5",
             lambda: dict(x0=_randn(4, 3, 5, 5), noise=_randn(4, 3, 5, 5)),
             lambda x0, noise: (mmkern.diffusion.get_velocity(x0, noise, torch.tensor([0, 1, 500, 999]), ac),),
             cast=("x0", "noise"), ops=("get_velocity",)),
        Case("diffusion.diffusion_loss v min-snr", "B4 3x5x5",
             lambda: dict(mo=_randn(4, 3, 5, 5), x0=_randn(4, 3, 5, 5), noise=_randn(4, 3, 5, 5)),
             lambda mo, x0, noise: (mmkern.diffusion.diffusion_loss(mo, x0, noise, torch.tensor([0, 1, 500, 999]),
                                                                    ac, "v_prediction", 5.0),),
             cast=("mo", "x0", "noise"), grad=("mo",), ops=("diffusion_loss", "diffusion_loss_backward")),
        Case("diffusion.ddpm_step learned_range threshold", "B3 (2+2)x4x5",
             lambda: dict(mo=_randn(3, 4, 4, 5), sample=_randn(3, 2, 4, 5), noise=_randn(3, 2, 4, 5)),
             lambda mo, sample, noise: mmkern.diffusion.ddpm_step(
                 torch.cat([mo[:, :2], torch.tanh(mo[:, 2:])], 1), torch.tensor([1, 300, 999]), sample, ac,
                 noise=noise, variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.9,
                 sample_max_value=2.0),
             cast=("mo", "sample", "noise"), ops=("ddpm_step",), outputs=("prev_sample", "pred_original_sample")),
        Case("diffusion.ddim_step eta=0.5 v clip", "B3 2x4x5",
             lambda: dict(mo=_randn(3, 2, 4, 5), sample=_randn(3, 2, 4, 5), noise=_randn(3, 2, 4, 5)),
             lambda mo, sample, noise: mmkern.diffusion.ddim_step(
                 mo, torch.tensor([19, 520, 999]), sample, ac, torch.tensor([-1, 500, 979]), eta=0.5, noise=noise,
                 prediction_type="v_prediction", clip_sample=True),
             cast=("mo", "sample", "noise"), ops=("ddim_step",), outputs=("prev_sample", "pred_original_sample")),
        Case("diffusion.euler_step churn", "B3 2x4x5",
             lambda: dict(mo=_randn(3, 2, 4, 5), sample=_randn(3, 2, 4, 5), noise=_randn(3, 2, 4, 5)),
             lambda mo, sample, noise: mmkern.diffusion.euler_step(
                 mo, torch.tensor([0, 4, 9]), sample, _sigmas, noise=noise, s_churn=2.0, s_tmax=10.0),
             cast=("mo", "sample", "noise"), ops=("euler_step",), outputs=("prev_sample", "pred_original_sample")),
        Case("diffusion.euler_scale_model_input", "B3 2x4x5", lambda: dict(sample=_randn(3, 2, 4, 5)),
             lambda sample: (mmkern.diffusion.euler_scale_model_input(sample, torch.tensor([0, 4, 9]), _sigmas),),
             cast=("sample",), ops=("euler_scale_model_input",)),
        Case("diffusion.euler_add_noise", "B3 2x4x5", lambda: dict(x0=_randn(3, 2, 4, 5), noise=_randn(3, 2, 4, 5)),
             lambda x0, noise: (mmkern.diffusion.euler_add_noise(x0, noise, torch.tensor([0, 4, 9]), _sigmas),),
             cast=("x0", "noise"), ops=("euler_add_noise",)),
        Case("apply_rotary_emb interleaved partial offsets", "B2 L9 H3 D40 rotary_dim 24",
             lambda: dict(x=_randn(2, 9, 3, 40)),
             lambda x: (mmkern.apply_rotary_emb(x, *_rotary_tables(20, 24), interleaved=True,
                                                seqlen_offsets=torch.tensor([0, 11])),),
             cast=("x",), grad=("x",), ops=("rotary_embedding",)),
        Case("apply_rotary_emb varlen", f"lens {lens_q} H2 D80",
             lambda: dict(x=_randn(sum(lens_q), 2, 80)),
             lambda x: (mmkern.apply_rotary_emb(x, *_rotary_tables(16, 80), seqlen_offsets=3, cu_seqlens=_cu(lens_q),
                                                max_seqlen=max(lens_q)),),
             cast=("x",), grad=("x",), ops=("rotary_embedding",)),
    ]


# --------------------------------------------------------------------------- running and printing

def _supports(backend_name: str, case: Case) -> bool:
    return all(op in dispatch.backends()[backend_name].kernels for op in case.ops)


def run_in_process(backends: list[str], include_oracle_rows: bool, notes: dict | None = None) -> list[Row]:
    """Rows of every op case, then of every model parity check, for `backends`; `notes` gets what was left out."""
    rows = []
    for case in cases():
        if include_oracle_rows and case.torch_impl is not None:
            rows.append(measure_oracle_against_torch(case))
        for name in backends:
            if _supports(name, case):
                for dtype in DTYPES:
                    torch.manual_seed(0)
                    try:
                        rows += measure(case, name, dtype)
                    except dispatch.NoBackendError as exc:   # e.g. CUDA C++ attention: fp16/bf16, head dims 64/96/128
                        if notes is not None:
                            label = str(dtype).replace("torch.", "")
                            notes[f"rows of {case.op} [{name}, {label}]"] = _first_reason(exc, name)
    model_rows, left_out = model_parity_rows(backends)
    if notes is not None:
        notes.update(left_out)
    return rows + model_rows


# Model parity (patched model against the unpatched original, same weights): each module defines
# parity_rows(backend: str) -> list[Row]. A module whose library (transformers, diffusers) is not
# installed raises ImportError on import and its rows are left out, with a note.
MODEL_PARITY_MODULES = ("mmkern.integrations.transformers_parity", "mmkern.integrations.diffusers_parity")


def model_parity_rows(backends: list[str]) -> tuple[list[Row], dict[str, str]]:
    """(rows, module -> why it was left out)."""
    rows, left_out = [], {}
    for module_name in MODEL_PARITY_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            left_out[f"model parity rows of {module_name}"] = str(exc)
            continue
        for name in backends:
            try:
                rows += module.parity_rows(name)
            except dispatch.NoBackendError as exc:     # the tiny models' shapes are outside the backend's kernels
                left_out[f"model parity rows of {module_name} [{name}]"] = _first_reason(exc, name)
    return rows, left_out


def _first_reason(exc: Exception, backend: str) -> str:
    """The backend's own line of a NoBackendError message ('  <backend>: reason; reason')."""
    for line in str(exc).splitlines():
        if line.strip().startswith(f"{backend}:"):
            return f"not taken by {backend}: " + line.strip()[len(backend) + 1:].strip()
    return str(exc).splitlines()[0]


def run_in_interpreter_subprocess(backend: str) -> list[Row]:
    """Verify `backend` in a fresh Python with TRITON_INTERPRET=1 (it must be set before triton loads)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "mmkern", "verify", "--backend", backend, "--json"],
                          env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"mmkern verify --backend {backend} (TRITON_INTERPRET=1) failed:\n{proc.stderr[-4000:]}")
    return [Row(**r) for r in json.loads(proc.stdout)]


def plan(requested: list[str] | None) -> tuple[list[str], list[str], dict[str, str]]:
    """(backends to run here, backends to run in an interpreter subprocess, skipped backend -> why)."""
    here, elsewhere, skipped = [], [], {}
    for name, b in dispatch.backends().items():
        if requested and name not in requested:
            continue
        if not b.kernels:
            skipped[name] = "implements no op yet"
            continue
        reasons = b.environment_reasons()
        if not reasons:
            here.append(name)
        elif name == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and "no CUDA GPU" in reasons[0]:
            elsewhere.append(name)
        else:
            skipped[name] = "; ".join(reasons)
    return here, elsewhere, skipped


def format_table(rows: list[Row]) -> str:
    header = ("op", "backend", "dtype", "shape", "max error", "tolerance", "pass", "bound")
    body = [(r.op, r.backend, r.dtype, r.shape, f"{r.error:.2e}", f"{r.tolerance:.2e}", "ok" if r.passed else "FAIL",
             r.note) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(requested: list[str] | None = None, as_json: bool = False) -> int:
    here, elsewhere, skipped = plan(requested)
    notes: dict[str, str] = {}
    rows = run_in_process(here, include_oracle_rows=not as_json and "reference" in here, notes=notes)
    for name in elsewhere:
        rows += run_in_interpreter_subprocess(name)
    if as_json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print(format_table(rows))
        for name, why in skipped.items():
            print(f"(backend {name} not verified: {why})")
        for what, why in notes.items():
            print(f"({what} left out: {why})")
        failed = sum(not r.passed for r in rows)
        print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if any(not r.passed for r in rows) else 0
