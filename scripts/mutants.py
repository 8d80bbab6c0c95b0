#!/usr/bin/env python
"""Mutation checks: plant the mistakes a kernel author could make, one at a time, and make sure the tests catch
every one (DESIGN.md: "a test proves something only if it can fail").

    python scripts/mutants.py                 run every mutant. Exit 0: all killed; 1: a mutant survived (or broke
                                              the test run instead of failing a test); 2: the check could not run
    python scripts/mutants.py --list          the mutants and the tests that should kill each
    python scripts/mutants.py --only NAME     only these mutants (repeatable)
    python scripts/mutants.py -j 1            the pipelines one after another (default: side by side)

What it does:
1. Copies the WORKING TREE (tracked files as they are on disk, uncommitted edits included, and the untracked
   files git does not ignore; no build outputs) into a temporary directory, once per pipeline: the Triton
   mutants, the C++ norm mutants, the C++ diffusion mutants. Each copy holds at most one mutation at any time;
   the checkout itself is never edited.
2. Proves that Python in each copy imports the copy's mmkern, not the editable install of the checkout: pytest
   runs with cwd = the copy and PYTHONPATH = the copy, and a small plugin stops any run whose mmkern comes from
   elsewhere. TRITON_INTERPRET=1 and CUDA_VISIBLE_DEVICES="" in every run (the CPU suite), bytecode off.
3. Checks that every mutation applies: its `old` text occurs exactly once in its file.
4. Triton pipeline: the mutants' tests must PASS on the unmutated copy (else a "kill" means nothing); then per
   mutant: replace `old` by `new`, run its tests (pytest -x -q -p no:cacheprovider), restore the file. Its copy
   has an empty extension build folder, so no C++ kernel can stand in for a Triton one.
5. C++ pipelines, one per family (side by side with 4): one CPU-only base build of the copy's extension
   (MMKERN_BUILD_CUDA=0, MMKERN_BUILD_DIR in the temporary directory, MMKERN_BUILD_FAMILIES=<family>: csrc/common
   and csrc/<family>); the mutants' tests must pass on it; then per mutant:
   edit the copy in place, rebuild (ninja recompiles only the translation units that include the edited file:
   checked from the build log, and timed), run its tests against that build, restore the file (the next
   rebuild recompiles it). A mutant with rebuild=False is killed by a test that compiles the edited header on
   its own (tests/test_philox_cpu.py), so it needs no rebuild.
   Why per family: a C++ rebuild is one translation unit (~30-50 s on a CI core) that cannot be split; two
   chains of rebuilds and the interpreter-bound Triton tests keep both cores busy.
Per mutant it prints its name, file, what it changes, KILLED by <first failing test> or SURVIVED, and its time;
then a summary. A mutant's tests are the narrowest existing ones that kill it; tests/test_mutant_guards.py
holds the tests written where no existing test did. tests/test_mutants_script.py checks this list is well formed.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("attention", "norm", "diffusion")
PER_RUN_TIMEOUT = 600          # seconds for one pytest run (a mutant that hangs a kernel counts as killed)


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    family: str                 # attention | norm | diffusion
    path: str                   # file, relative to the repository root
    old: str                    # must occur exactly once in `path`
    new: str
    what: str                   # one line: the mistake
    tests: tuple[str, ...]      # pytest node ids, relative to the repository root
    rebuild: bool = True        # C++ only: False when the tests compile the edited header themselves
    needs_avx2: bool = False    # the mutated code is compiled only for AVX2 CPUs: SKIPPED elsewhere
    needs_avx512: bool = False  # the mutated code runs only on CPUs with AVX-512F (chosen at run time): SKIPPED elsewhere

    @property
    def backend(self) -> str:
        if self.path.startswith("csrc/"):
            return "c++"
        return "triton" if self.path.startswith("mmkern/triton/") else "torch"

    @property
    def needs_build(self) -> bool:
        return self.backend == "c++" and self.rebuild


A = "mmkern/triton/attention_scores.py"
TB = "mmkern/torch_backend/attention.py"
TT = "tests/test_torch_backend_attention.py::"
NT = "mmkern/triton/norm.py"
NK = "mmkern/triton/norm_kernels.py"
NC = "csrc/norm/norm_cpu.cpp"
AF = "csrc/attention/attention_cpu_forward.cpp"
AE = "csrc/attention/attention_cpu_exp.cpp"
CA = "tests/test_cpu_attention.py::"
DM = "csrc/diffusion/diffusion_math.h"
TA = "tests/test_triton_attention.py::"
TD = "tests/test_triton_attention_decode.py::"
TN = "tests/test_triton_norm.py::"
TS = "tests/test_triton_diffusion_steps.py::"
TND = "tests/test_torch_backend_norm_diffusion.py::"
NN = "tests/test_native_norm.py::"
ND = "tests/test_native_diffusion.py::"
G = "tests/test_mutant_guards.py::"
OC = "tests/test_cpu_output_cache.py::"
RT = "mmkern/triton/rotary.py"
HF = "tests/test_integration_transformers.py::"
R = "tests/test_rotary.py::"
P = "tests/test_paged_kvcache.py::"

# Python/Triton mutants first (they need no build), then the C++ ones grouped by translation unit (each switch
# of unit recompiles the restored one too).
MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- attention (Triton)
    Mutant("attn-dropout-counter-no-batch-head", "attention", A,
           "offsets = (batch_head.to(tl.int64) * max_seqlen_q + rows[:, None].to(tl.int64)) * max_seqlen_k",
           "offsets = (rows[:, None].to(tl.int64)) * max_seqlen_k",
           "dropout_keep: Philox counters without the (batch * H + head) term (one mask for every batch/head)",
           ("tests/test_triton_attention_dropout.py::test_dropout_mask_is_the_models_bit_for_bit[2-3-19-45-0]",)),
    Mutant("attn-causal-align-off-by-one", "attention", A,
           "aligned = rows[:, None] + align ",
           "aligned = rows[:, None] + align - 1 ",
           "score_tile: the bottom-right alignment off by one (query i lines up with key i + Lk - Lq - 1)",
           (TA + "test_flash_attn_func[37-29-40-causal]",)),
    Mutant("attn-window-left-off-by-one", "attention", A,
           "(cols[None, :] >= aligned - window_left)",
           "(cols[None, :] > aligned - window_left)",
           "score_tile: the sliding window's left bound exclusive (window_left keys instead of window_left + 1)",
           (TA + "test_flash_attn_func[37-29-40-window]",)),
    Mutant("attn-alibi-sign", "attention", A,
           "s -= slope * tl.abs(aligned - cols[None, :]).to(tl.float32)",
           "s += slope * tl.abs(aligned - cols[None, :]).to(tl.float32)",
           "score_tile: the ALiBi bias added instead of subtracted (far keys favoured)",
           (TA + "test_flash_attn_func[37-29-40-alibi]",)),
    Mutant("attn-gqa-interleaved-kv-head", "attention", "mmkern/triton/attention_forward.py",
           "kv_head = head // GROUP",
           "kv_head = head % (num_heads // GROUP)",
           "forward kernel: GQA query head h reads kv head h % H_kv (repeat) instead of h // group (repeat_interleave)",
           (TA + "test_flash_attn_func[37-29-40-plain]",)),
    Mutant("attn-online-softmax-acc-not-rescaled", "attention", "mmkern/triton/attention_forward.py",
           "acc = acc * rescale[:, None] + dot(",
           "acc = acc + dot(",
           "forward kernel: the output accumulator not rescaled by e^(m_old - m_new) when the row max grows",
           (TA + "test_flash_attn_func[1-70-8-plain]",)),
    Mutant("attn-decode-merge-lse-not-rescaled", "attention", "mmkern/triton/attention_decode.py",
           "l = l * tl.exp(m - m_safe) + tl.exp(lse_s - m_safe)",
           "l = l + tl.exp(lse_s - m_safe)",
           "split-KV merge: the running sum of exp(lse) not rescaled when the max over splits grows",
           (TD + "test_flash_attn_func_short_queries[3-257-True]",)),
    # ---------------------------------------------------------------- attention (the torch backend)
    Mutant("attn-torch-bottom-right-as-torch-causal", "attention", TB,
           "if p.right == 0 and (Lq == Lk or not p.causal_bottom_right):",
           "if p.right == 0:",
           "torch backend: flash-attn's bottom-right causal handed to torch's is_causal (top-left) when Lq != Lk",
           (TT + "test_flash_attn_func_on_torch_matches_oracle[causal Lq<Lk D40-kernel-backward]",)),
    Mutant("attn-torch-empty-rows-lse-zero", "attention", TB,
           "            lse = lse.masked_fill(~self.sees_a_key, NEG_INF)\n",
           "",
           "torch backend: torch's lse 0 kept for a row that sees no key (the contract says -inf)",
           (TT + "test_flash_attn_func_on_torch_matches_oracle[causal Lq>Lk (empty rows) D72-exact-backward]",)),
    Mutant("attn-torch-gqa-grad-mean", "attention", TB,
           "t = t.view(B, H // group, group, L, D).sum(2)",
           "t = t.view(B, H // group, group, L, D).mean(2)",
           "torch backend: GQA dk/dv averaged over the query heads sharing a k/v head instead of summed",
           (TT + "test_flash_attn_func_on_torch_matches_oracle[causal Lq<Lk D40-kernel-backward]",)),
    # ---------------------------------------------------------------- rotary embedding (Triton, torch, the op)
    Mutant("rotary-sin-sign", "attention", RT,
           "s = tl.where(is_first[None, :], -s, s)",
           "s = tl.where(is_first[None, :], s, -s)",
           "rotary kernel: the first of each pair gets +x_partner * sin (rotation by minus the angle)",
           (R + "test_backend_matches_oracle[triton-verify cases]",)),
    Mutant("rotary-neox-partner-as-interleaved", "attention", RT,
           "partner = tl.where(j < half_rd, j + half_rd, j - half_rd)",
           "partner = j ^ 1",
           "rotary kernel: GPT-NeoX pairs read the interleaved partner (j ^ 1) instead of j +- rotary_dim / 2",
           (R + "test_backend_matches_oracle[triton-neox full D160 (pairs across feature blocks)]",)),
    Mutant("rotary-offset-ignored", "attention", RT,
           "position = tl.minimum(tl.maximum(t + offset, 0), seqlen_ro - 1)",
           "position = tl.minimum(tl.maximum(t, 0), seqlen_ro - 1)",
           "rotary kernel: the sequence's offset (a KV cache's length) not added: every sequence starts at 0",
           (R + "test_backend_matches_oracle[triton-length 1 decode, tensor offsets]",)),
    Mutant("rotary-varlen-rows-from-zero", "attention", RT,
           "x_row = x_ptr + (start + t).to(tl.int64)[:, None] * stride_xt",
           "x_row = x_ptr + t.to(tl.int64)[:, None] * stride_xt",
           "rotary kernel: a varlen sequence read from row 0 instead of cu_seqlens[b]",
           (R + "test_backend_matches_oracle[triton-varlen with empty sequences, int64 offsets]",)),
    Mutant("rotary-torch-varlen-sequence-of-a-boundary-row", "attention", "mmkern/torch_backend/rotary.py",
           "torch.searchsorted(p.cu_seqlens[1:].long(), rows, right=True)",
           "torch.searchsorted(p.cu_seqlens[1:].long(), rows, right=False)",
           "torch backend: the first row of each varlen sequence counted in the sequence before it",
           (R + "test_backend_matches_oracle[torch-varlen with empty sequences, int64 offsets]",)),
    Mutant("rotary-backward-not-conjugated", "attention", "mmkern/ops/rotary.py",
           "interleaved,\n                          not conjugate)",
           "interleaved,\n                          conjugate)",
           "the op's backward rotates the gradient forward again instead of by the opposite angle",
           (R + "test_backward_matches_finite_differences",)),
    Mutant("kvcache-rotary-queries-always-at-their-own-positions", "attention", "mmkern/attention.py",
           "q = rotate(q) if local else rotate(q.reshape(B, 1, Lq * H, D)).view(B, Lq, H, D)",
           "q = rotate(q)",
           "flash_attn_with_kvcache: without causal/window the queries rotated at cache_seqlens + i, not all at "
           "cache_seqlens (flash-attn's rule)",
           ("tests/test_kvcache_rotary.py::test_reference_matches_an_independent_recomputation"
            "[non-causal: every query at cache_seqlens]",)),
    Mutant("kvcache-rotary-unrotated-keys-cached", "attention", "mmkern/attention.py",
           "    k = rotate(k)\n",
           "    rotate(k)\n",
           "flash_attn_with_kvcache: the keys rotated for nothing and appended unrotated",
           ("tests/test_kvcache_rotary.py::test_reference_matches_an_independent_recomputation"
            "[decode gqa neox partial]",)),
    # ---------------------------------------------------------------- paged KV caches, cache_leftpad
    Mutant("paged-triton-table-row-of-batch-0", "attention", "mmkern/triton/attention_decode.py",
           "page = tl.load(BlockTable + batch.to(tl.int64) * stride_bt + entry, mask=cols < split_hi, other=0)",
           "page = tl.load(BlockTable + entry, mask=cols < split_hi, other=0)",
           "split-KV decode: every sequence reads its pages through the first sequence's block-table row",
           (P + "test_backend_matches_oracle[triton-page 16 decode gqa d64 neox]",)),
    Mutant("paged-triton-leftpad-positions-not-shifted", "attention", "mmkern/triton/attention_decode.py",
           "        k_len = k_len - pad\n",
           "",
           "split-KV decode: a left-padded sequence's key count keeps the pad (causal alignment off by the pad)",
           (P + "test_cache_leftpad_starts_each_sequence_and_its_positions_there[triton-True]",)),
    Mutant("paged-torch-gather-ignores-leftpad", "attention", "mmkern/torch_backend/cache_gather.py",
           "rows = (rows + pad).clamp_(max=max(Lk - 1, 0))",
           "rows = rows.clamp(max=max(Lk - 1, 0))",
           "torch backend: a left-padded cache gathered from row 0 instead of cache_leftpad",
           (P + "test_cache_leftpad_starts_each_sequence_and_its_positions_there[torch-False]",)),
    Mutant("paged-append-into-the-first-page", "attention", "mmkern/torch_backend/kvcache.py",
           "blocks = p.block_table.long().gather(1, rows // page).clamp_(0, p.k_cache.shape[0] - 1)",
           "blocks = p.block_table.long()[:, :1].expand_as(rows)",
           "kvcache_append: new rows written into each sequence's first page instead of the page holding their row",
           (P + "test_pages_outside_the_new_rows_are_unchanged_bit_for_bit[torch]",)),
    Mutant("paged-reference-view-ignores-the-table", "attention", "mmkern/reference/attention.py",
           "src = (b, j) if not p.paged else (int(p.block_table[b, j // page]), j % page)",
           "src = (b, j) if not p.paged else (b * (p.seqlen_k // page) + j // page, j % page)",
           "reference: pages taken in storage order (sequence-major) instead of through block_table",
           (P + "test_reference_matches_an_independent_recomputation[page 16 decode gqa d64 neox]",)),
    Mutant("kvcache-leftpad-rotary-at-cache-positions", "attention", "mmkern/attention.py",
           "positions = cache_seqlens if cache_leftpad is None else cache_seqlens - cache_leftpad",
           "positions = cache_seqlens",
           "flash_attn_with_kvcache: rotary positions counted from cache row 0, not from cache_leftpad",
           (P + "test_cache_leftpad_starts_each_sequence_and_its_positions_there[reference-False]",)),
    Mutant("kvcache-batch-idx-ignored", "attention", "mmkern/attention.py",
           "return k_cache, v_cache, cache_batch_idx.to(torch.int32).view(B, 1)",
           "return k_cache, v_cache, None",
           "flash_attn_with_kvcache: cache_batch_idx checked but batch entry b still uses cache row b",
           (P + "test_cache_batch_idx_reads_and_appends_the_named_rows[reference]",)),
    Mutant("hf-static-cache-leftpad-dropped", "attention", "mmkern/integrations/transformers/mask.py",
           "padding.mmkern_cache = (leftpad.to(torch.int32),",
           "padding.mmkern_cache = (torch.zeros_like(leftpad, dtype=torch.int32),",
           "transformers StaticCache: each row's keys taken from slot 0, its left pad attended",
           (HF + "test_gpt2_generate_with_a_static_cache_runs_on_the_kvcache_kernel[reference-left-padded]",)),
    Mutant("hf-4d-cache-bounds-query-off-by-one", "attention", "mmkern/integrations/transformers/attention.py",
           "last = seqused[:, None] - Lq + torch.arange(Lq, device=kept.device)",
           "last = seqused[:, None] - Lq + 1 + torch.arange(Lq, device=kept.device)",
           "transformers 4D StaticCache mask: query i's last key read one slot late (bounds never recognised)",
           (HF + "test_a_4d_static_cache_mask_is_read_as_cache_bounds[inference]",)),
    # ---------------------------------------------------------------- norm (Triton)
    Mutant("norm-triton-pre-in-x-dtype", "norm", NT,
           "pre = torch.empty((rows, N), dtype=p.stream_dtype, device=x.device)",
           "pre = torch.empty((rows, N), dtype=x.dtype, device=x.device)",
           "forward launcher: the fp32 residual stream (pre) stored in x's half dtype",
           (G + "test_triton_residual_stream_stays_float32",)),
    Mutant("norm-triton-dbias-dropped", "norm", NK,
           "tl.store(dbias_part_ptr + part_row + cols, factor * sum_dout, mask=in_row)",
           "tl.store(dbias_part_ptr + part_row + cols, 0.0 * sum_dout, mask=in_row)",
           "backward kernel: dbias dropped (its partial sums written as 0)",
           (TN + "test_matches_oracle_prenorm_with_residual[layernorm-fp32-fp32-7]",)),
    Mutant("norm-triton-eps-outside-sqrt", "norm", NK,
           "    rstd = 1.0 / tl.sqrt(variance + eps)\n    tl.store(rstd_ptr + row, rstd)",
           "    rstd = 1.0 / (tl.sqrt(variance) + eps)\n    tl.store(rstd_ptr + row, rstd)",
           "forward kernel: rstd = 1 / (sqrt(var) + eps) instead of 1 / sqrt(var + eps)",
           (TN + "test_matches_oracle_prenorm_with_residual[rmsnorm-fp32-fp32-7]",)),
    # ---------------------------------------------------------------- diffusion (Triton)
    Mutant("diffusion-triton-add-noise-sqrt-1-a-twice", "diffusion", "mmkern/triton/diffusion.py",
           "out = sqrt_a * x + sqrt_one_minus_a * noise",
           "out = sqrt_one_minus_a * x + sqrt_one_minus_a * noise",
           "add_noise: sqrt(1 - a) for both terms (x scaled by sqrt(1 - a), not sqrt(a))",
           ("tests/test_triton_diffusion.py::test_matches_oracle[table0-per_sample-shape0-add_noise]",)),
    Mutant("diffusion-triton-min-snr-unclamped", "diffusion", "mmkern/triton/diffusion_loss.py",
           "w = tl.minimum(snr_gamma * (1.0 - a) / tl.maximum(a, 1e-30), 1.0)",
           "w = snr_gamma * (1.0 - a) / tl.maximum(a, 1e-30)",
           "loss (epsilon): the Min-SNR clamp dropped, w = gamma / snr instead of min(snr, gamma) / snr",
           (TS + "test_loss_matches_oracle[shape0-timesteps0-5.0-epsilon]",)),
    Mutant("diffusion-triton-ddim-eta-sign", "diffusion", "mmkern/triton/diffusion_samplers.py",
           "tl.sqrt(tl.maximum(beta_prev - eta * eta * var, 0.0)) * eps",
           "tl.sqrt(tl.maximum(beta_prev + eta * eta * var, 0.0)) * eps",
           "DDIM: the eta term with the wrong sign, sqrt(1 - a_prev + sigma^2) as the eps coefficient",
           (TS + "test_ddim_step_matches_oracle[0.5-clip-True-epsilon]",)),
    # ---------------------------------------------------------------- norm and diffusion (the torch backend)
    Mutant("norm-torch-adaln-scale-without-one", "norm", "mmkern/torch_backend/norm.py",
           "        y = y * (1 + scale.unsqueeze(1))",
           "        y = y * scale.unsqueeze(1)",
           "torch backend: adaLN scales by scale instead of (1 + scale) (the forward, and the backward's dy)",
           (TND + "test_norm_matches_oracle_variants[layernorm-modulation-fp32-fp32]",)),
    Mutant("diffusion-torch-ddpm-noise-at-t0", "diffusion", "mmkern/torch_backend/diffusion.py",
           "noisy = _per_sample(p.timesteps > 0, s)",
           "noisy = _per_sample(p.timesteps >= 0, s)",
           "torch backend: DDPM adds std * noise at t = 0 too (the chain's last step must return the mean)",
           (TND + "test_ddpm_step_at_t0_adds_no_noise[fixed_large]",)),
    # ---------------------------------------------------------------- dispatch: the per-signature memo
    Mutant("dispatch-memo-key-without-forced-backend", "diffusion", "mmkern/dispatch.py",
           "key = [op, _forced.get() or os.environ.get(ENV_VAR), *options.items(),",
           "key = [op, *options.items(),",
           "per-signature memo: the forced backend left out of the key (a backend() block reuses auto's choice)",
           ("tests/test_dispatch_memo.py::test_a_forced_backend_is_part_of_the_signature",)),
    Mutant("dispatch-memo-key-argument-type-only", "diffusion", "mmkern/dispatch.py",
           "            key.append(a)\n",
           "            key.append(None)\n",
           "per-signature memo: only the type of a non-tensor argument in the key (eps = -1 after eps = 1e-5 "
           "goes unchecked)",
           ("tests/test_dispatch_memo.py::test_a_new_signature_is_validated_after_a_good_one",)),
    Mutant("dispatch-memo-value-checks-skipped", "diffusion", "mmkern/ops/diffusion_problem.py",
           "    if check_values:\n        check_timestep_values(qualname",
           "    if check_values and validate:\n        check_timestep_values(qualname",
           "per-signature memo: a memoized call skips the timesteps' range check too (it reads values, not "
           "metadata)",
           ("tests/test_dispatch_memo.py::test_value_checks_run_on_every_call",)),
    # ---------------------------------------------------------------- C++: the header compiled by its own test
    Mutant("philox-cpu-dropout-tail-unscaled", "norm", "csrc/common/philox_cpu.h",
           "a[j + l] = uniform_from_bits(bits[l]) >= p ? a[j + l] * scale : 0.f;",
           "a[j + l] = uniform_from_bits(bits[l]) >= p ? a[j + l] : 0.f;",
           "dropout_scale: the scalar path (tail, non-AVX2 builds) keeps elements without the 1/(1-p) scale",
           ("tests/test_philox_cpu.py::test_vector_philox_matches_the_scalar_stream_and_tl_rand[portable]",),
           rebuild=False),
    Mutant("philox-cpu-dropout-vector-unscaled", "norm", "csrc/common/philox_cpu.h",
           "_mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), vscale), keep)",
           "_mm256_and_ps(_mm256_loadu_ps(a + j), keep)",
           "dropout_scale: the AVX2 path (8 elements at a time) keeps elements without the 1/(1-p) scale",
           ("tests/test_philox_cpu.py::test_vector_philox_matches_the_scalar_stream_and_tl_rand[avx2]",),
           rebuild=False, needs_avx2=True),
    # ---------------------------------------------------------------- C++ norm (norm_cpu.cpp)
    Mutant("norm-cpu-residual-in-fp32-ignored", "norm", NC,
           "const auto stream = stream_dtype(x, residual, residual_in_fp32);",
           "const auto stream = residual ? residual->scalar_type() : x.scalar_type();",
           "forward: residual_in_fp32 ignored without a residual, pre stored in x's half dtype",
           (G + "test_cpu_residual_stream_stays_float32",)),
    Mutant("norm-cpu-half-pre-tail-dropped", "norm", NC,
           "  if (j < n) step(j, n - j);",
           "  (void)0;",
           "forward, half-precision rows: the last N % 8 elements of pre (and of the row the statistics read) "
           "left unwritten",
           (NN + "test_cpu_matches_oracle_prenorm_with_residual[layernorm-bf16-bf16-7]",)),
    Mutant("norm-cpu-half-stream-residual-dropped", "norm", NC,
           "    if (residual) v = v + (m == kW ? cpu_vec::vload(residual + j) : cpu_vec::vload(residual + j, m));",
           "",
           "forward, half-precision rows: the residual not added (pre = x)",
           (NN + "test_cpu_matches_oracle_prenorm_with_residual[layernorm-fp16-fp32-1000]",)),
    Mutant("norm-cpu-dbias-dropped", "norm", NC,
           "a.dbias_part[part + j] = factor * sum_dout[j];",
           "a.dbias_part[part + j] = 0.f * sum_dout[j];",
           "backward: dbias dropped (its partial sums written as 0)",
           (NN + "test_cpu_matches_oracle_prenorm_with_residual[layernorm-fp32-fp32-7]",)),
    # ---------------------------------------------------------------- C++ CPU attention (attention_cpu_*.cpp)
    Mutant("attn-cpu-online-softmax-acc-not-rescaled", "attention", AF,
           "if (rescale != 1.f) scale_row(st.o.data() + r * D, D, rescale);",
           "(void)rescale;",
           "forward: the O accumulator not rescaled when a later key tile raises the row maximum",
           (CA + "test_flash_attn_func_on_cpu_matches_oracle[several key tiles]",)),
    Mutant("attn-cpu-gqa-every-head-reads-kv-head-0", "attention", AF,
           "k + rb.b * c.k_sb + seq.k_start * c.k_sr + rb.kvh * c.k_sh;",
           "k + rb.b * c.k_sb + seq.k_start * c.k_sr;",
           "forward: the keys of kv head 0 for every group (GQA/MQA read the wrong head)",
           (CA + "test_flash_attn_func_on_cpu_matches_oracle[causal Lq<Lk GQA 8/2 D40]",)),
    Mutant("cpu-paged-tile-rows-from-zero", "attention", AF,
           "gather_tile(c, rb, seq.k_start + j0, n, k, v, w);",
           "gather_tile(c, rb, seq.k_start, n, k, v, w);",
           "forward, paged caches: every key tile gathered from the sequence's first rows",
           (P + "test_backend_matches_oracle[cpu-page 16 window gqa d80]",)),
    Mutant("cpu-paged-tile-spanning-pages-read-in-place", "attention", AF,
           "if (row0 / c.page == (row0 + n - 1) / c.page) {",
           "if (true) {",
           "forward, paged caches: a tile that spans pages read in place from its first page (past its end)",
           (P + "test_backend_matches_oracle[cpu-page 16 window gqa d80]",)),
    Mutant("cpu-paged-in-page-tile-from-the-sequence-start", "attention", AF,
           "k_tile = k + c.paged_row(rb.b, row0, rb.kvh, c.k_sb, c.k_sr, c.k_sh);",
           "k_tile = k + c.paged_row(rb.b, seq.k_start, rb.kvh, c.k_sb, c.k_sr, c.k_sh);",
           "forward, paged caches: a tile inside one page read from the sequence's first key row, not the tile's",
           (P + "test_key_tiles_inside_one_large_page_and_across_pages[cpu-0]",)),
    Mutant("attn-cpu-dropout-counter-without-tile-start", "attention", AF,
           "const uint64_t offset = dropout_offset(c, rb.b, rb.kvh * c.group + g % c.group, g / c.group) + j0;",
           "const uint64_t offset = dropout_offset(c, rb.b, rb.kvh * c.group + g % c.group, g / c.group);",
           "forward: every key tile draws the first tile's dropout counters (not the Triton kernels' mask)",
           (CA + "test_dropout_against_the_independent_philox_model",)),
    Mutant("attn-cpu-split-merge-not-rescaled", "attention", AF,
           "const float w = std::exp(p.m[r] - m_safe);",
           "const float w = 1.f;",
           "decode split over keys: the partials merged without their e^(m_s - M) weights",
           (CA + "test_decode_split_over_keys_matches_unsplit_and_oracle",)),
    Mutant("attn-cpu-bottom-right-off-by-one", "attention", "csrc/attention/attention_cpu_call.cpp",
           "bottom_right ? kl - Lq : 0});",
           "bottom_right ? kl - Lq + 1 : 0});",
           "dense inputs: the bottom-right alignment off by one (query i lines up with key i + Lk - Lq + 1)",
           (CA + "test_flash_attn_func_on_cpu_matches_oracle[causal Lq<Lk GQA 8/2 D40]",)),
    Mutant("cpu-leftpad-keys-from-row-0", "attention", "csrc/attention/attention_cpu_call.cpp",
           "c.seqs.push_back({0, Lq, pad,",
           "c.seqs.push_back({0, Lq, 0,",
           "dense inputs: a left-padded sequence's keys read from cache row 0 instead of leftpad_k",
           (P + "test_cache_leftpad_starts_each_sequence_and_its_positions_there[cpu-False]",)),
    Mutant("attn-cpu-backward-dlse-sign", "attention", "csrc/attention/attention_cpu_backward.cpp",
           "if (t.dlse != nullptr) delta -= t.dlse",
           "if (t.dlse != nullptr) delta += t.dlse",
           "backward: the gradient arriving on lse added to delta instead of subtracted",
           (CA + "test_gradient_arriving_on_lse",)),
    Mutant("attn-cpu-exp-avx512-tail-lanes-summed", "attention", AE,
           "acc = _mm512_mask_add_ps(acc, lanes, acc, e);",
           "acc = _mm512_add_ps(acc, e);",
           "softmax (AVX-512): the zero-filled lanes past a row's end (e^(0 - m)) added into the row sum",
           (CA + "test_flash_attn_func_on_cpu_matches_oracle[plain D8]",), needs_avx512=True),
    Mutant("attn-cpu-exp-avx2-nan-not-kept", "attention", AE,
           "return _mm256_blendv_ps(e, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));",
           "return e;",
           "softmax (AVX2, MMKERN_CPU_ISA=avx2): a NaN score's exponential clamped to a finite value",
           (CA + "test_portable_gemm_and_avx2_exp_paths_match_oracle",)),
    # ---------------------------------------------------------------- C++ CPU rotary embedding (rotary_cpu.cpp)
    Mutant("cpu-rotary-neox-second-half-sign", "attention", "csrc/attention/rotary_cpu.cpp",
           "o[i + half] = x0 * s[i] + x1 * c[i];",
           "o[i + half] = -x0 * s[i] + x1 * c[i];",
           "C++ rotary: the second feature of a GPT-NeoX pair rotated by minus the angle",
           (R + "test_backend_matches_oracle[cpu-neox full D160 (pairs across feature blocks)]",)),
    Mutant("cpu-rotary-offset-ignored", "attention", "csrc/attention/rotary_cpu.cpp",
           "std::clamp<int64_t>(seq.offset_of(b) + t, 0, seqlen_ro - 1)",
           "std::clamp<int64_t>(t, 0, seqlen_ro - 1)",
           "C++ rotary: the sequence's offset (a KV cache's length) not added",
           (R + "test_backend_matches_oracle[cpu-length 1 decode, tensor offsets]",)),
    Mutant("cpu-rotary-tail-not-copied", "attention", "csrc/attention/rotary_cpu.cpp",
           "if (rd < D) std::memcpy(oh + rd, xh + rd, (D - rd) * sizeof(T));",
           "",
           "C++ rotary: the features past rotary_dim left unwritten",
           (R + "test_unrotated_features_are_copied_bit_for_bit_and_x_is_untouched[cpu]",)),
    # ---------------------------------------------------------------- C++ diffusion (diffusion_math.h)
    Mutant("diffusion-cpu-min-snr-unclamped", "diffusion", DM,
           "c.w = fminf(fdiv(snr_gamma * (1.0f - a), fmaxf(a, 1e-30f)), 1.0f);",
           "c.w = fdiv(snr_gamma * (1.0f - a), fmaxf(a, 1e-30f));",
           "loss (epsilon): the Min-SNR clamp dropped, w = gamma / snr instead of min(snr, gamma) / snr",
           (ND + "test_loss_and_gradient_match_oracle[shape0-timesteps0-5.0-epsilon-cpu]",)),
    Mutant("diffusion-cpu-ddim-eta-sign", "diffusion", DM,
           "c.c_s = sqrtf(fmaxf(beta_prev - eta * eta * var, 0.0f));",
           "c.c_s = sqrtf(fmaxf(beta_prev + eta * eta * var, 0.0f));",
           "DDIM: the eta term with the wrong sign, sqrt(1 - a_prev + sigma^2) as the eps coefficient",
           (ND + "test_ddim_step_matches_oracle[0.5-clip-True-epsilon-cpu]",)),
    Mutant("diffusion-cpu-vector-tail-unwritten", "diffusion", "csrc/diffusion/diffusion_cpu.cpp",
           "  if (i < end) f(i, end - i);\n}",
           "}",
           "every elementwise diffusion kernel: the partial last vector of a sample segment never written (a "
           "recycled output keeps the previous call's values there)",
           (OC + "test_every_cpu_kernel_writes_all_of_a_poisoned_output[diffusion]",)),
    # ---------------------------------------------------------------- C++ output buffers (common/cpu_output.cpp)
    Mutant("cpu-output-cache-limit-ignored", "norm", "csrc/common/cpu_output.cpp",
           "if (c.held_bytes_ + b->bytes <= c.limit_) {",
           "if (true) {",
           "output cache: every freed buffer kept, whatever MMKERN_CPU_OUTPUT_CACHE_MIB says (memory grows unbounded)",
           (OC + "test_the_cache_holds_no_more_than_its_limit_and_release_empties_it",
            OC + "test_limit_zero_allocates_every_output")),
)


# ============================================================================ the copy and its environment

PLUGIN = '''
"""Loaded into every pytest run of scripts/mutants.py: stops the run unless mmkern comes from the copy."""
import os
from pathlib import Path

import pytest


def pytest_collection_finish(session):
    import mmkern
    copy = Path(os.environ["MMKERN_MUTANTS_COPY"]).resolve()
    where = Path(mmkern.__file__).resolve()
    if copy not in where.parents:
        pytest.exit(f"mutants: mmkern was imported from {where}, not from the copy {copy}", returncode=3)
'''


class Setup(Exception):
    """The check cannot run (exit 2): not a verdict on any mutant."""


def git_files(repo: Path) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p})


def copy_tree(repo: Path, dest: Path) -> int:
    """The working tree's files (as on disk; deleted ones skipped) into dest. Returns how many."""
    n = 0
    for rel in git_files(repo):
        src = repo / rel
        if not src.exists() and not src.is_symlink():
            continue                         # deleted in the working tree
        if src.is_dir() and not src.is_symlink():
            continue                         # a submodule: not part of the kernels
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
        n += 1
    return n


def environment(copy: Path, build_dir: Path, plugin_dir: Path, test_seed: str, families: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TRITON_INTERPRET="1",                # Triton kernels through the interpreter, on the CPU
        CUDA_VISIBLE_DEVICES="",             # the same run on any machine: the CPU suite's tests
        # the copy first (its mmkern wins over the editable install), then the plugin, then what was there
        PYTHONPATH=os.pathsep.join([str(copy), str(plugin_dir)] + [p for p in os.environ.get("PYTHONPATH", "")
                                                                  .split(os.pathsep) if p]),
        PYTHONDONTWRITEBYTECODE="1",         # a mutant of equal size in the same second must not reuse a .pyc
        MMKERN_BUILD_CUDA="0",
        MMKERN_BUILD_DIR=str(build_dir),
        MMKERN_BUILD_FAMILIES=families,      # the csrc/ folders this copy's extension is built from
        MMKERN_TEST_SEED=test_seed,
        MMKERN_MUTANTS_COPY=str(copy),
        MAX_JOBS=str(os.cpu_count() or 1),
    )
    return env


def prove_import(copy: Path, env: dict) -> str:
    """Where the copy's python finds mmkern (it must be the copy's), and the CPU ISA its build compiles for."""
    code = ("import mmkern, mmkern.build as b; print(mmkern.__file__); print(b.CSRC_DIR); print(b.build_dir()); "
            "print(b.cpu_isa())")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise Setup(f"`import mmkern` fails in the copy:\n{out.stderr[-3000:]}")
    module, csrc, build_dir, isa = out.stdout.split("\n")[:4]
    if copy.resolve() not in Path(module).resolve().parents:
        raise Setup(f"the copy's python imports mmkern from {module}, not from the copy {copy}")
    if Path(csrc).resolve() != (copy / "csrc").resolve():
        raise Setup(f"mmkern.build compiles {csrc}, not the copy's csrc/")
    return f"{module} (csrc {csrc}, build dir {build_dir}, CPU ISA {isa})", isa


def cpu_runs_avx512() -> bool:
    """Whether the C++ kernels' run-time choice lands on their AVX-512 functions here: the CPU has AVX-512F
    (Linux's /proc/cpuinfo; elsewhere torch's own probe) and MMKERN_CPU_ISA does not force AVX2 or the portable path."""
    if os.environ.get("MMKERN_CPU_ISA", "auto") in ("avx2", "default"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        import torch
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return re.search(r"^flags\s*:.*\bavx512f\b", flags, re.M) is not None


# ============================================================================ running tests and builds

@dataclasses.dataclass
class Run:
    status: str          # passed | failed | error | timeout
    seconds: float
    first_failure: str = ""
    output: str = ""


FAILED_LINE = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.M)     # -rfE's summary (ids may hold spaces)


def pytest_run(copy: Path, env: dict, node_ids, *, stop_first=True, timeout=PER_RUN_TIMEOUT) -> Run:
    """pytest on node_ids in the copy (cwd = copy). failed: a test failed (or errored in its setup); error: pytest
    itself could not run them (collection error, unknown node id, the import check of the plugin)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mutants_guard_plugin", "-rfE"]
    if stop_first:
        cmd.append("-x")
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-p", "no:xdist"]
    cmd += list(node_ids)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Run("timeout", time.perf_counter() - started, f"a timeout ({timeout} s: a hang)", out)
    seconds = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return Run("passed", seconds, output=output)
    failures = FAILED_LINE.findall(output)
    if proc.returncode == 1 and failures:
        kind, node = failures[0]
        return Run("failed", seconds, node + (" (an error in its setup)" if kind == "ERROR" else ""), output)
    return Run("error", seconds, f"pytest exit {proc.returncode}", output)


class BuildFailed(Exception):
    pass


COMPILED_LINE = re.compile(r"^\[\d+/\d+\] .* -c (\S+\.cpp) -o ", re.M)


def start_build(copy: Path, env: dict, log: Path) -> subprocess.Popen:
    """`mmkern build --cpu-only` of the copy, into env's MMKERN_BUILD_DIR (ninja: incremental)."""
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "mmkern", "build", "--cpu-only", "--quiet"], cwd=copy,
                                env=env, stdout=handle, stderr=subprocess.STDOUT)


def finish_build(proc: subprocess.Popen, env: dict, log: Path, copy: Path) -> set[str]:
    """Wait for the build; returns the .cpp files ninja compiled (relative to the copy)."""
    if proc.wait() != 0:
        raise BuildFailed(log.read_text(errors="replace")[-4000:])
    full = (Path(env["MMKERN_BUILD_DIR"]) / "_C.build.log").read_text(errors="replace")
    return {str(Path(p).resolve().relative_to(copy.resolve())) for p in COMPILED_LINE.findall(full)}


def including_units(copy: Path, path: str, families: str) -> set[str]:
    """The .cpp files of the build (csrc/common and csrc/<family>; no .cu in a CPU build) that are `path` or
    include it, directly or not."""
    folders = {"common", *families.split(",")}
    if path.endswith(".cpp"):
        return {path}
    includes = {}
    for f in (copy / "csrc").rglob("*"):
        if f.suffix in (".cpp", ".h", ".cuh"):
            text = f.read_text(errors="replace")
            includes[str(f.relative_to(copy))] = {"csrc/" + m for m in re.findall(r'#include\s+"([^"]+)"', text)}
    found, frontier = set(), {path}
    while frontier:
        frontier = {f for f, inc in includes.items() if inc & frontier} - found
        found |= frontier
    return {f for f in found if f.endswith(".cpp") and Path(f).parts[1] in folders}


# ============================================================================ mutants

@dataclasses.dataclass
class Result:
    mutant: Mutant
    verdict: str          # KILLED | SURVIVED | ERROR | SKIPPED
    detail: str
    seconds: float
    build_note: str = ""


def apply(copy: Path, m: Mutant) -> bytes:
    """Apply m to the copy; returns the file's original bytes. ValueError unless `old` occurs exactly once."""
    path = copy / m.path
    original = path.read_bytes()
    text = original.decode()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"`old` occurs {count} times in {m.path} (must be exactly once)")
    path.write_text(text.replace(m.old, m.new))
    return original


def judge(m: Mutant, run: Run, seconds: float, build_note: str = "") -> Result:
    if run.status == "passed":
        return Result(m, "SURVIVED", "", seconds, build_note)
    if run.status in ("failed", "timeout"):
        return Result(m, "KILLED", run.first_failure, seconds, build_note)
    tail = textwrap.indent(run.output[-2500:], "        | ")
    return Result(m, "ERROR", f"{run.first_failure}: the mutant broke the test run itself\n{tail}", seconds,
                  build_note)


def run_mutant(copy: Path, env: dict, m: Mutant) -> Result:
    """Apply, run its tests, restore."""
    started = time.perf_counter()
    try:
        original = apply(copy, m)
    except ValueError as exc:
        return Result(m, "ERROR", f"not applied: {exc}", time.perf_counter() - started)
    try:
        run = pytest_run(copy, env, m.tests)
    finally:
        (copy / m.path).write_bytes(original)
    return judge(m, run, time.perf_counter() - started)


def run_native_mutant(copy: Path, env: dict, logs: Path, m: Mutant, pending: set[str]) -> Result:
    """Apply, rebuild (checking ninja recompiled the units that include the file), run its tests, restore.
    pending: units restored since the last build (the next build recompiles them too)."""
    started = time.perf_counter()
    units = including_units(copy, m.path, env["MMKERN_BUILD_FAMILIES"])
    if not m.rebuild:                   # its tests compile the edited header themselves
        result = run_mutant(copy, env, m)
        pending |= units
        return result
    try:
        original = apply(copy, m)
    except ValueError as exc:
        return Result(m, "ERROR", f"not applied: {exc}", time.perf_counter() - started)
    try:
        log = logs / f"build-{m.name}.log"
        try:
            compiled = finish_build(start_build(copy, env, log), env, log, copy)
        except BuildFailed as exc:
            return Result(m, "ERROR", f"the mutated copy does not build:\n{exc}", time.perf_counter() - started)
        note = (f"rebuilt {', '.join(sorted(Path(u).name for u in compiled)) or 'nothing'} "
                f"in {time.perf_counter() - started:.0f} s")
        if not units <= compiled:
            return Result(m, "ERROR", f"the rebuild did not recompile {sorted(units - compiled)} (it compiled "
                          f"{sorted(compiled)}): the mutant is not in the build", time.perf_counter() - started, note)
        unexpected = compiled - units - pending
        if unexpected:
            note += f"; WARNING: it also recompiled {sorted(unexpected)}, which did not change"
        pending.clear()
        run = pytest_run(copy, env, m.tests)
    finally:
        (copy / m.path).write_bytes(original)
        pending |= units
    return judge(m, run, time.perf_counter() - started, note)


class Reporter:
    """Prints each verdict as it comes (the pipelines run side by side) and keeps them for the summary."""

    def __init__(self, total: int):
        self.total = total
        self.results: list[Result] = []
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def add(self, r: Result) -> None:
        m = r.mutant
        verdict = {"KILLED": f"KILLED by {r.detail}", "SURVIVED": "SURVIVED (its tests all passed)",
                   "ERROR": f"ERROR: {r.detail}", "SKIPPED": f"SKIPPED: {r.detail}"}[r.verdict]
        build = f", {r.build_note}" if r.build_note else ""
        with self.lock:
            self.results.append(r)
            print(f"[{len(self.results)}/{self.total}] {m.name}  ({m.family}, {m.backend})  {m.path}: {m.what}\n"
                  f"        {verdict}  [{r.seconds:.1f} s{build}]", flush=True)


def check_base(copy: Path, env: dict, mutants, what: str, reporter: Reporter) -> None:
    """The mutants' tests must pass on the unmutated copy, else a kill would mean nothing."""
    nodes = list(dict.fromkeys(n for m in mutants for n in m.tests))
    run = pytest_run(copy, env, nodes, stop_first=False)
    reporter.say(f"{what}: base: the {len(nodes)} tests of its mutants on the unmutated copy: {run.status} "
                 f"in {run.seconds:.1f} s")
    if run.status != "passed":
        raise Setup(f"the {what} mutants' tests do not pass on the unmutated working tree ({run.first_failure}), "
                    f"so their kills would mean nothing:\n{run.output[-4000:]}")


def check_applies(copy: Path, mutants) -> None:
    for m in mutants:
        count = (copy / m.path).read_text().count(m.old)
        if count != 1:
            raise Setup(f"mutant {m.name}: `old` occurs {count} times in {m.path} (must be exactly once)")


def triton_pipeline(copy: Path, env: dict, mutants, reporter: Reporter, stop: threading.Event) -> None:
    check_base(copy, env, mutants, "triton", reporter)
    for m in mutants:
        if stop.is_set():
            return
        reporter.add(run_mutant(copy, env, m))


def cxx_pipeline(kind: str, copy: Path, env: dict, mutants, reporter: Reporter, stop: threading.Event,
                 logs: Path) -> None:
    if any(m.needs_build for m in mutants):
        started = time.perf_counter()
        reporter.say(f"{kind}: base build of the copy's extension (CPU only, csrc/common + csrc/"
                     f"{env['MMKERN_BUILD_FAMILIES']}) started")
        log = logs / f"build-base-{env['MMKERN_BUILD_FAMILIES']}.log"
        try:
            units = finish_build(start_build(copy, env, log), env, log, copy)
        except BuildFailed as exc:
            raise Setup(f"the unmutated copy does not build:\n{exc}")
        reporter.say(f"{kind}: base build done in {time.perf_counter() - started:.0f} s: "
                     f"{', '.join(sorted(Path(u).name for u in units))}")
    check_base(copy, env, mutants, kind, reporter)
    pending: set[str] = set()
    for m in mutants:
        if stop.is_set():
            return
        reporter.add(run_native_mutant(copy, env, logs, m, pending))


def select(only) -> list[Mutant]:
    if not only:
        return list(MUTANTS)
    names = {m.name for m in MUTANTS}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SystemExit(f"mutants.py: unknown mutant(s) {', '.join(unknown)}; see --list")
    return [m for m in MUTANTS if m.name in only]


def list_mutants() -> None:
    for m in MUTANTS:
        flags = (("" if m.rebuild else ", no rebuild") + (", AVX2 only" if m.needs_avx2 else "")
                 + (", AVX-512 CPUs only" if m.needs_avx512 else ""))
        print(f"{m.name}  ({m.family}, {m.backend}{flags})\n    {m.path}: {m.what}")
        for t in m.tests:
            print(f"    test: {t}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Plant kernel mistakes one at a time in a copy of the working tree; "
                                     "fail if the tests let one through.")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests; run nothing")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("-j", "--jobs", type=int, default=3,
                        help="pipelines run side by side (the Triton mutants; the C++ norm mutants; the C++ "
                             "diffusion mutants; each in its own copy). Default 3: all; 1: one after another")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their path is printed)")
    parser.add_argument("--test-seed", default=os.environ.get("MMKERN_TEST_SEED", "0"),
                        help="MMKERN_TEST_SEED of the test runs (default: $MMKERN_TEST_SEED, else 0)")
    args = parser.parse_args(argv)
    if args.list:
        list_mutants()
        return 0
    chosen = select(args.only)
    tmp = Path(tempfile.mkdtemp(prefix="mmkern-mutants-"))
    try:
        return _run(chosen, tmp, args)
    except Setup as exc:
        print(f"mutants: cannot check: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"mutants: the copies are kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(chosen: list[Mutant], tmp: Path, args) -> int:
    started = time.perf_counter()
    plugin_dir, logs = tmp / "plugin", tmp / "logs"
    plugin_dir.mkdir()
    logs.mkdir()
    (plugin_dir / "mutants_guard_plugin.py").write_text(PLUGIN)
    first = tmp / "tree-python"
    n = copy_tree(REPO, first)
    reporter = Reporter(len(chosen))
    reporter.say(f"mutants: {len(chosen)} of {len(MUTANTS)}; the working tree of {REPO} ({n} files) is copied "
                 f"into {tmp}, once per pipeline")
    # pipelines: the Triton mutants; the C++ mutants of each family (their own copy and build: csrc/common and
    # csrc/<family>, so the two chains of rebuilds run side by side and never recompile each other's units)
    groups = [("python", "triton", [m for m in chosen if m.backend in ("triton", "torch")])]
    groups += [(f"c++ {f}", f, [m for m in chosen if m.backend == "c++" and m.family == f]) for f in FAMILIES]
    pipelines = []
    stop = threading.Event()
    for kind, families, mutants in groups:
        if not mutants:
            continue
        copy = tmp / f"tree-{kind.replace(' ', '-')}"
        if copy != first:
            shutil.copytree(first, copy, symlinks=True)
        # the Python copy's build folder stays empty: no C++ kernel can stand in for a Triton or torch one
        env = environment(copy, tmp / f"build-{kind.replace(' ', '-')}", plugin_dir, args.test_seed,
                          "norm" if families == "triton" else families)
        where, isa = prove_import(copy, env)
        reporter.say(f"{kind}: {len(mutants)} mutants; the copy imports {where}")
        check_applies(copy, mutants)
        if isa != "avx2":
            for m in [m for m in mutants if m.needs_avx2]:
                reporter.add(Result(m, "SKIPPED", "its code is compiled only for AVX2 CPUs; this build is " + isa, 0.0))
            mutants = [m for m in mutants if not m.needs_avx2]
        if isa != "avx2" or not cpu_runs_avx512():
            # the AVX-512 functions are compiled into every AVX2 build but chosen only where the CPU has AVX-512F
            for m in [m for m in mutants if m.needs_avx512]:
                reporter.add(Result(m, "SKIPPED", "its code runs only on CPUs with AVX-512F; this one lacks it "
                                    "(or MMKERN_CPU_ISA forces another path)", 0.0))
            mutants = [m for m in mutants if not m.needs_avx512]
        if not mutants:
            continue
        if kind == "python":
            pipelines.append((kind, lambda c=copy, e=env, ms=mutants: triton_pipeline(c, e, ms, reporter, stop)))
        else:
            pipelines.append((kind, lambda k=kind, c=copy, e=env, ms=mutants:
                              cxx_pipeline(k, c, e, ms, reporter, stop, logs)))

    failures: list[str] = []

    def guarded(kind, fn):
        try:
            fn()
        except Setup as exc:
            failures.append(f"{kind}: {exc}")
            stop.set()
        except Exception as exc:           # a bug here must not look like a pass
            failures.append(f"{kind}: {type(exc).__name__}: {exc}")
            stop.set()

    slots = threading.Semaphore(max(1, args.jobs))

    def pipeline(kind, fn):
        with slots:
            if not stop.is_set():
                guarded(kind, fn)

    if args.jobs <= 1:
        for p in pipelines:
            pipeline(*p)
    else:
        threads = [threading.Thread(target=pipeline, args=p) for p in pipelines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if failures:
        raise Setup("\n".join(failures))

    order = {m.name: i for i, m in enumerate(MUTANTS)}
    results = sorted(reporter.results, key=lambda r: order[r.mutant.name])
    killed = [r for r in results if r.verdict == "KILLED"]
    survived = [r for r in results if r.verdict == "SURVIVED"]
    errors = [r for r in results if r.verdict == "ERROR"]
    skipped = [r for r in results if r.verdict == "SKIPPED"]
    print(f"\nmutants: summary ({time.perf_counter() - started:.0f} s in all)")
    for r in results:
        print(f"  {r.verdict:8s} {r.mutant.name:42s} {r.seconds:6.1f} s  "
              f"{r.detail.splitlines()[0] if r.detail else ', '.join(r.mutant.tests)}")
    print(f"mutants: {len(killed)} killed, {len(survived)} survived, {len(errors)} errors, {len(skipped)} skipped, "
          f"of {len(results)}; {time.perf_counter() - started:.0f} s")
    return 1 if survived or errors else 0


if __name__ == "__main__":
    sys.exit(main())
