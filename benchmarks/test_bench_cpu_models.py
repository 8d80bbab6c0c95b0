"""Whole transformers models on a CPU, float32, random weights built from configs (nothing downloaded), with
attn_implementation="mmkern" (mmkern.integrations.transformers: attention through mmkern's kernels, auto dispatch;
the cpu backend here) against attn_implementation="sdpa" (transformers' default), on the same model and inputs:

    BERT-base-sized encoder (BertModel: 12 layers x 768, 12 heads, FFN 3072), forward, B4 L640; the last 20% of
        one sequence is padding in the attention mask (mmkern packs the valid keys into a varlen batch)
    GPT-2-sized decoder (GPT2LMHeadModel: 12 layers x 768, 12 heads), forward at B1 L512, and greedy generation:
        a 64-token prompt, 32 new tokens, use_cache=True (prefill, then 31 steps of one query on the KV cache)

Agreement, checked once per model outside the timing (the model's module-scoped fixture): generated token ids
equal (asserted), forward outputs (BERT's last hidden state at every position, GPT-2's logits) within 1e-3 of
the largest magnitude (asserted); the max differences are in the mmkern rows' extra_info. Each row also records
peak_mb (peak resident memory growth of one call, as in test_bench_cpu_attention.py) and, for the mmkern rows,
ran_on (the mmkern ops of that call and their backends). Goal: mmkern >= 1.0x sdpa with equal outputs.
Under --benchmark-disable (CI's smoke test) and MMKERN_BENCH_SIZES=quick: 2-layer, 128-wide configs.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the model benchmarks need transformers (extra: models)")
mmt = pytest.importorskip("mmkern.integrations.transformers",
                          reason="mmkern's transformers integration needs transformers >= 4.48 (AttentionInterface)")

from test_bench_cpu_attention import smoke, timed  # noqa: E402

IMPLS = ["sdpa", "mmkern"]
TOLERANCE = 1e-3            # max |mmkern - sdpa| / max |sdpa|, float32

BERT_SIZES = dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, batch=4, seqlen=640)
GPT2_SIZES = dict(layers=12, hidden=768, heads=12, vocab=50257, seqlen=512, prompt=64, new_tokens=32)
SMOKE_BERT_SIZES = dict(layers=2, hidden=128, heads=2, ffn=256, vocab=1000, batch=4, seqlen=40)
SMOKE_GPT2_SIZES = dict(layers=2, hidden=128, heads=2, vocab=1000, seqlen=64, prompt=8, new_tokens=4)


def _use(model, name: str) -> None:
    """Switch every attention layer of model to attn_implementation `name` (transformers 5; on 4.x the config
    field the layers read at each forward)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _max_difference(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, that divided by max |want|)."""
    diff = float((got.float() - want.float()).abs().max())
    return diff, diff / max(float(want.float().abs().max()), 1e-30)


@pytest.fixture(scope="module")
def bert(request):
    s = SMOKE_BERT_SIZES if smoke(request.config) else BERT_SIZES
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                     num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                                     max_position_embeddings=max(512, s["seqlen"]), hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    model = transformers.BertModel(config, add_pooling_layer=False).float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, s["vocab"], (s["batch"], s["seqlen"]), generator=g)
    mask = torch.ones_like(ids)
    real = int(0.8 * s["seqlen"])
    mask[-1, real:] = 0                         # the last 20% of one sequence is padding
    ids[-1, real:] = 0
    forward = lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    with torch.no_grad():
        _use(model, "sdpa")
        want = forward(ids, mask)
        _use(model, "mmkern")
        got = forward(ids, mask)
    diff, relative = _max_difference(got, want)
    yield dict(model=model, sizes=s, ids=ids, mask=mask, forward=forward, agreement=dict(
        max_abs_diff=diff, max_rel_diff=relative, compared="last_hidden_state, every position"))
    _use(model, "sdpa")


@pytest.fixture(scope="module")
def gpt2(request):
    s = SMOKE_GPT2_SIZES if smoke(request.config) else GPT2_SIZES
    torch.manual_seed(0)
    eos = s["vocab"] - 1
    config = transformers.GPT2Config(vocab_size=s["vocab"], n_positions=max(1024, s["seqlen"]), n_embd=s["hidden"],
                                     n_layer=s["layers"], n_head=s["heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).float().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, eos, (1, s["seqlen"]), generator=g)
    prompt = torch.randint(0, eos, (1, s["prompt"]), generator=g)
    forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    generation = dict(max_new_tokens=s["new_tokens"], min_new_tokens=s["new_tokens"], do_sample=False,
                      use_cache=True, pad_token_id=eos)
    generate = lambda prompt: model.generate(prompt, attention_mask=torch.ones_like(prompt), **generation)  # noqa: E731
    with torch.no_grad():
        _use(model, "sdpa")
        want, want_tokens = forward(ids), generate(prompt)
        _use(model, "mmkern")
        got, got_tokens = forward(ids), generate(prompt)
    diff, relative = _max_difference(got, want)
    same = want_tokens.shape == got_tokens.shape and bool(torch.equal(want_tokens, got_tokens))
    mismatched = int((want_tokens != got_tokens).sum()) if want_tokens.shape == got_tokens.shape else -1
    yield dict(model=model, sizes=s, ids=ids, prompt=prompt, forward=forward, generate=generate,
               agreement=dict(max_abs_diff=diff, max_rel_diff=relative, compared="logits"),
               tokens=dict(tokens_equal=same, tokens_mismatched=mismatched, new_tokens=int(got_tokens.shape[1] -
                                                                                          prompt.shape[1])))
    _use(model, "sdpa")


def _inference(fn):
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


def _check_agreement(case: dict, benchmark) -> None:
    agreement = case["agreement"]
    benchmark.extra_info.update(agreement)
    assert agreement["max_rel_diff"] <= TOLERANCE, (
        f"attn_implementation='mmkern' differs from 'sdpa' by {agreement['max_abs_diff']:.3e} "
        f"({agreement['max_rel_diff']:.3e} of the largest value; allowed {TOLERANCE}) in {agreement['compared']}")


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_model_bert_forward(bench, benchmark, bert, impl):
    s = bert["sizes"]
    benchmark.group = (f"cpu model BERT {s['layers']}x{s['hidden']} forward fp32 B{s['batch']} L{s['seqlen']} "
                       f"(20% padding in one sequence)")
    _use(bert["model"], impl)
    if impl == "mmkern":
        _check_agreement(bert, benchmark)
    timed(bench, benchmark, _inference(bert["forward"]), bert["ids"], bert["mask"], op="model", impl=impl,
          series="cpu model bert forward", x=s["seqlen"], x_label="sequence length", dtype="fp32",
          shape=f"BertModel {s['layers']} layers x {s['hidden']}, H{s['heads']}, B{s['batch']} L{s['seqlen']}")


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_model_gpt2_forward(bench, benchmark, gpt2, impl):
    s = gpt2["sizes"]
    benchmark.group = f"cpu model GPT-2 {s['layers']}x{s['hidden']} forward fp32 B1 L{s['seqlen']}"
    _use(gpt2["model"], impl)
    if impl == "mmkern":
        _check_agreement(gpt2, benchmark)
    timed(bench, benchmark, _inference(gpt2["forward"]), gpt2["ids"], op="model", impl=impl,
          series="cpu model gpt2 forward", x=s["seqlen"], x_label="sequence length", dtype="fp32",
          shape=f"GPT2LMHeadModel {s['layers']} layers x {s['hidden']}, H{s['heads']}, B1 L{s['seqlen']}")


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_model_gpt2_generate(bench, benchmark, gpt2, impl):
    s = gpt2["sizes"]
    benchmark.group = (f"cpu model GPT-2 {s['layers']}x{s['hidden']} greedy generate fp32 B1 prompt {s['prompt']} "
                       f"+ {s['new_tokens']} tokens")
    _use(gpt2["model"], impl)
    if impl == "mmkern":
        benchmark.extra_info.update(gpt2["tokens"])
        assert gpt2["tokens"]["tokens_equal"], (f"greedy generation with attn_implementation='mmkern' differs from "
                                                f"'sdpa': {gpt2['tokens']}")
    timed(bench, benchmark, _inference(gpt2["generate"]), gpt2["prompt"], op="model", impl=impl,
          series="cpu model gpt2 generate", x=s["new_tokens"], x_label="new tokens", dtype="fp32",
          shape=f"GPT2LMHeadModel {s['layers']} layers x {s['hidden']}, B1, prompt {s['prompt']}, "
                f"{s['new_tokens']} new tokens, KV cache")
