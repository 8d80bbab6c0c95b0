"""mmkern.integrations.transformers: BERT and GPT-2 patched by apply_mmkern against the unpatched models.

Parity (same weights, float32 on CPU, every usable backend; bf16 on a GPU): the unpatched model in
float64 (on the dtype's weights, upcast) is the oracle and the patched model must be within 2x the unpatched
float32 model's error of it (mmkern/integrations/transformers_parity.py), for outputs at real positions, the
loss and every parameter's gradient, each on its own; greedy generation with the KV cache must give identical
tokens; and the ops must have run where the rows say (the "ran on" rows: attention on the backend itself
wherever it has attention kernels that take the models' head dim 64, checked through mmkern.dispatch_log).
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkern  # noqa: E402

# ImportError (a skip) only where transformers predates AttentionInterface (< 4.48)
mmt = pytest.importorskip("mmkern.integrations.transformers")
from mmkern.integrations import transformers_parity as tp  # noqa: E402

BACKENDS = [name for name in ("reference", "triton", "cpu", "cuda") if name in mmkern.available_backends()]


def assert_rows_pass(rows):
    assert rows, "no parity rows were measured"
    failed = [f"{r.op} [{r.backend}, {r.dtype}]: error {r.error:.3e} > tolerance {r.tolerance:.3e}"
              for r in rows if not r.passed]
    assert not failed, "\n".join(failed)


def test_reference_and_triton_are_covered():
    # Triton runs through its interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)
    assert {"reference", "triton"} <= set(BACKENDS), mmkern.available_backends()


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_masked_lm_with_padding_and_token_types(backend):
    rows = tp.bert_parity(backend)
    assert {r.op.split(" ")[-1] for r in rows} >= {"hidden", "logits", "loss"}
    assert any("grads (42 params," in r.op for r in rows)
    assert_rows_pass(rows)
    assert_attention_ran_on_the_backend_itself(backend, rows)


def assert_attention_ran_on_the_backend_itself(backend, rows):
    """Where `backend` has attention kernels, the tiny models' attention (head dim 64, float32) ran on them:
    no row says "(attention on reference)" for triton, and the "ran on" rows (which passed) list it."""
    ran = [r for r in rows if r.op.endswith(" ran on")]
    assert ran, "no ran-on row"
    if all(op in mmkern.dispatch.backends()[backend].kernels for op in tp.ATTENTION_OPS) and backend != "cuda":
        assert tp.attention_backend(backend) == backend
        assert all(f"attention_forward@{backend}" in r.shape for r in ran), [r.shape for r in ran]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_logits_loss_and_gradients_with_left_and_right_padding(backend):
    rows = tp.gpt2_parity(backend)
    assert any("grads" in r.op for r in rows)
    assert_rows_pass(rows)
    assert_attention_ran_on_the_backend_itself(backend, rows)


@pytest.mark.parametrize("left_padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_greedy_generate_with_kv_cache_gives_identical_tokens(backend, left_padded):
    log = mmkern.dispatch_log()
    want, got = tp.generate_pair(backend, new_tokens=3, left_padded=left_padded, log=log)
    assert want.shape == got.shape == (3, 7 + 3)
    assert torch.equal(want, got)
    assert tp.ran_on_row("generate", backend, torch.float32, log.calls).passed, sorted(set(log.calls))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 parity runs on a GPU")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in BACKENDS])
def test_bf16_parity_on_gpu(backend):
    rows = tp.bert_parity(backend, torch.bfloat16) + tp.gpt2_parity(backend, torch.bfloat16)
    assert_rows_pass(rows)
    # bf16 at head dim 64: the CUDA C++ attention takes it, so every backend here runs attention itself
    assert tp.attention_backend(backend, torch.bfloat16) == backend
    assert all(f"attention_forward@{backend}" in r.shape for r in rows if r.op.endswith(" ran on"))
    want, got = tp.generate_pair(backend, torch.float32, new_tokens=4, left_padded=True)
    assert torch.equal(want, got)


# --------------------------------------------------------------------------- how it is wired

def test_registered_with_attention_and_mask_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionInterface._global_mapping["mmkern"] is mmt.mmkern_attention_forward
    assert AttentionMaskInterface._global_mapping["mmkern"] is mmt.mmkern_mask


def test_apply_keeps_every_state_dict_key_and_value():
    for base in (tp.tiny_bert().float(), tp.tiny_gpt2().float()):
        before = copy.deepcopy(base.state_dict())
        patched = mmt.apply_mmkern(base)
        after = patched.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert patched.config._attn_implementation == "mmkern"
        patched.load_state_dict(before, strict=True)  # an unpatched checkpoint loads unchanged


def test_fused_modules_are_in_place():
    gpt2 = mmt.apply_mmkern(tp.tiny_gpt2().float())
    block = gpt2.transformer.h[0]
    assert isinstance(block.ln_2, mmkern.nn.LayerNormResidual) and block.ln_2.prenorm
    assert isinstance(block.attn.resid_dropout, torch.nn.Identity)  # its p moved into ln_2
    assert isinstance(gpt2.transformer.ln_f, mmkern.nn.LayerNormResidual)
    assert isinstance(block, transformers.models.gpt2.modeling_gpt2.GPT2Block)
    bert = mmt.apply_mmkern(tp.tiny_bert().float())
    layer = bert.bert.encoder.layer[1]
    assert isinstance(layer.output.LayerNorm, mmkern.nn.LayerNormResidual)
    assert isinstance(layer.attention.output.LayerNorm, mmkern.nn.LayerNormResidual)
    mmt.apply_mmkern(bert)  # applying twice changes nothing
    assert isinstance(layer.output.LayerNorm, mmkern.nn.LayerNormResidual)


def test_from_pretrained_with_attn_implementation_mmkern(tmp_path):
    base = tp.tiny_gpt2().float().eval()
    base.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="mmkern").eval()
    assert loaded.config._attn_implementation == "mmkern"
    batch = tp.gpt2_batch()
    calls = []
    real = mmt.mmkern_attention_forward
    transformers.AttentionInterface.register("mmkern", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        with torch.no_grad(), mmkern.backend("reference"):
            got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        mmt.register()
    assert len(calls) == 2  # both layers ran mmkern attention
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def _use_attention(model, name: str) -> None:
    """model.set_attn_implementation(name) (transformers 5), or on 4.x, which has no such method, the config
    field that every layer on AttentionInterface reads at each forward."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


@pytest.mark.skipif(not hasattr(transformers.PreTrainedModel, "set_attn_implementation"),
                    reason=f"transformers {transformers.__version__}'s BERT does not call AttentionInterface (it picks "
                           f"its attention class at construction): apply_mmkern swaps it instead (tested above)")
def test_set_attn_implementation_alone_runs_mmkern_attention():
    base = tp.tiny_bert().float().eval()
    model = copy.deepcopy(base)
    model.set_attn_implementation("mmkern")
    batch = tp.bert_batch()
    del batch["labels"]
    with torch.no_grad(), mmkern.backend("reference"):
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=1e-5, atol=1e-5)


def test_padding_reaches_the_kernel_as_varlen_never_as_a_dense_mask(monkeypatch):
    seen = {"varlen": [], "dense": 0, "plain": []}
    varlen, plain = mmkern.flash_attn_varlen_func, mmkern.flash_attn_func

    def spy_varlen(q, k, v, cu_q, cu_k, *args, **kwargs):
        seen["varlen"].append((cu_q.tolist(), cu_k.tolist(), kwargs["causal"]))
        return varlen(q, k, v, cu_q, cu_k, *args, **kwargs)

    def spy_plain(*args, **kwargs):
        seen["plain"].append(kwargs["causal"])
        return plain(*args, **kwargs)

    def no_dense(*args, **kwargs):
        seen["dense"] += 1
        raise AssertionError("a dense mask reached mmkern.scaled_dot_product_attention")

    monkeypatch.setattr(mmkern, "flash_attn_varlen_func", spy_varlen)
    monkeypatch.setattr(mmkern, "flash_attn_func", spy_plain)
    monkeypatch.setattr(mmkern, "scaled_dot_product_attention", no_dense)
    bert, gpt2 = mmt.apply_mmkern(tp.tiny_bert().float()), mmt.apply_mmkern(tp.tiny_gpt2().float())
    with torch.no_grad(), mmkern.backend("reference"):
        bert(**tp.bert_batch())
        # bidirectional: all 11 queries of each sequence against its 11, 7, 4 real keys
        assert seen["varlen"] == [([0, 11, 22, 33], [0, 11, 18, 22], False)] * 2
        seen["varlen"].clear()
        gpt2(**tp.gpt2_batch())
        # causal: the real tokens only (10, 6 left-padded, 8 right-padded), the kernel's causal flag
        assert seen["varlen"] == [([0, 10, 16, 24], [0, 10, 16, 24], True)] * 2
        gpt2(input_ids=tp.gpt2_batch()["input_ids"])
        assert seen["plain"] == [True, True]  # no padding: no mask at all
    assert seen["dense"] == 0


# --------------------------------------------------------------------------- attention features at the function level

def _sdpa(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


def _module(is_causal, groups=1):
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module._mmkern_name = is_causal, groups, "test.attn"
    return module


@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa_with_key_padding_matches_sdpa(is_causal):
    B, H, H_kv, L, D = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H_kv, L, D), torch.randn(B, H_kv, L, D)
    padding = torch.ones(B, L, dtype=torch.bool)
    padding[1, :2] = False  # left padding
    dense = padding[:, None, None, :].expand(B, 1, L, L)
    if is_causal:
        dense = dense & torch.ones(L, L, dtype=torch.bool).tril()
    with mmkern.backend("reference"):
        got = mmt.mmkern_attention_forward(_module(is_causal, H // H_kv), q, k, v, padding, scaling=0.3)[0]
    want = _sdpa(_module(is_causal, H // H_kv), q, k, v, dense, scaling=0.3)
    real = padding if is_causal else torch.ones_like(padding)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_sliding_window_and_softcap_match_the_written_out_attention():
    B, H, L, D, window, cap = 2, 2, 9, 8, 3, 2.0
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    with mmkern.backend("reference"):
        got = mmt.mmkern_attention_forward(_module(True), q, k, v, None, sliding_window=window, softcap=cap)[0]
    s = cap * torch.tanh((q @ k.transpose(-1, -2)) / D ** 0.5 / cap)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    s = s.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))  # transformers' sliding_window convention
    want = (s.softmax(-1) @ v).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_applied_and_reproducible():
    q = k = v = torch.randn(1, 2, 5, 8)
    with mmkern.backend("reference"):
        plain = mmt.mmkern_attention_forward(_module(False), q, k, v, None)[0]
        torch.manual_seed(7)
        a = mmt.mmkern_attention_forward(_module(False), q, k, v, None, dropout=0.5)[0]
        torch.manual_seed(7)
        b = mmt.mmkern_attention_forward(_module(False), q, k, v, None, dropout=0.5)[0]
    assert torch.equal(a, b) and not torch.allclose(a, plain)


def test_a_users_4d_float_mask_is_added_to_the_scores():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    bias = torch.randn(1, 1, 4, 5)
    with mmkern.backend("reference"):
        got = mmt.mmkern_attention_forward(_module(False), q, k, v, bias)[0]
    torch.testing.assert_close(got, _sdpa(_module(False), q, k, v, bias), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input

def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    for model in (transformers.LlamaForCausalLM(config), torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match=r"not supported; supported architectures: bert .*gpt2"):
            mmt.apply_mmkern(model)


@pytest.mark.parametrize("key, words", [("head_mask", "head_mask"), ("position_bias", "attention bias"),
                                        ("s_aux", "attention sinks")])
def test_layouts_mmkern_cannot_take_name_the_layer_and_reason(key, words):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=rf"in test\.attn: .*{words}.* not supported"):
        mmt.mmkern_attention_forward(_module(False), q, q, q, None, **{key: torch.ones(2)})


def test_output_attentions_fails_at_first_forward_naming_the_layer():
    model = mmt.apply_mmkern(tp.tiny_bert().float())
    batch = tp.bert_batch()
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self: output_attentions=True"):
        with mmkern.backend("reference"):
            model(input_ids=batch["input_ids"], output_attentions=True)


def test_relative_position_bert_is_rejected_at_apply():
    model = tp.tiny_bert().float()
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        mmt.apply_mmkern(model)


def test_gpt2_cross_attention_is_rejected_at_apply():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, add_cross_attention=True)
    with pytest.raises(ValueError, match="add_cross_attention"):
        mmt.apply_mmkern(transformers.GPT2LMHeadModel(config))


def test_padding_in_the_middle_with_a_sliding_window_is_refused():
    q = torch.randn(1, 2, 5, 8)
    padding = torch.tensor([[True, False, True, True, True]])
    with pytest.raises(ValueError, match=r"test\.attn: a sliding window with padding in the middle"):
        with mmkern.backend("reference"):
            mmt.mmkern_attention_forward(_module(True), q, q, q, padding, sliding_window=2)


def test_gemma2_softcap_sliding_window_and_gqa_through_the_attention_interface(monkeypatch):
    """Any model on AttentionInterface runs with set_attn_implementation("mmkern"): Gemma-2 has GQA, logit
    softcapping and sliding-window layers; with padding they reach the kernel as flags + varlen."""
    config = transformers.Gemma2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0, max_position_embeddings=64,
        attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    eager = transformers.Gemma2ForCausalLM(config).eval()
    model = copy.deepcopy(eager)
    _use_attention(model, "mmkern")

    def no_dense(*args, **kwargs):
        raise AssertionError("a dense mask reached mmkern.scaled_dot_product_attention")

    monkeypatch.setattr(mmkern, "scaled_dot_product_attention", no_dense)
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :5] = 0
    ids = ids * mask
    with torch.no_grad(), mmkern.backend("reference"):
        got, want = model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)  # decoding past the window of 4
        assert torch.equal(model.generate(ids, **kwargs), eager.generate(ids, **kwargs))


KVCACHE_BACKENDS = [b for b in BACKENDS if b != "cuda"]  # the CUDA C++ kernel takes no cache_leftpad


@pytest.mark.parametrize("left_padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("backend", KVCACHE_BACKENDS)
def test_gpt2_generate_with_a_static_cache_runs_on_the_kvcache_kernel(monkeypatch, backend, left_padded):
    """A StaticCache holds more key slots than tokens seen (its keys run past the last query): each layer's
    attention reaches mmkern.flash_attn_with_kvcache with cache_leftpad = each row's left pad and cache_seqlens =
    the tokens seen, never a dense mask; greedy tokens equal the unpatched model's (same cache)."""
    seen = []
    kvcache = mmkern.flash_attn_with_kvcache

    def spy(q, k_cache, v_cache, *args, **kwargs):
        seen.append((q.shape[1], k_cache.shape[1], kwargs["cache_leftpad"].tolist(),
                     kwargs["cache_seqlens"].tolist(), kwargs["causal"]))
        return kvcache(q, k_cache, v_cache, *args, **kwargs)

    def no_dense(*args, **kwargs):
        raise AssertionError("a dense mask reached mmkern.scaled_dot_product_attention")

    monkeypatch.setattr(mmkern, "flash_attn_with_kvcache", spy)
    monkeypatch.setattr(mmkern, "scaled_dot_product_attention", no_dense)
    log = mmkern.dispatch_log()
    want, got = tp.generate_pair(backend, new_tokens=3, left_padded=left_padded, log=log,
                                 cache_implementation="static")
    assert want.shape == got.shape == (3, 7 + 3)
    assert torch.equal(want, got)
    pads = [0, 3, 5] if left_padded else [0, 0, 0]
    slots = seen[0][1]
    assert slots >= 7 + 3 - 1  # the last new token is never cached
    # 2 layers x (the prefill of 7 queries, then one query per new token), over the whole cache
    assert seen[:4] == [(7, slots, pads, [7] * 3, True)] * 2 + [(1, slots, pads, [8] * 3, True)] * 2
    # where the last step fills the cache (9 slots), transformers 4.x's 4D mask is plain key padding + causality,
    # which takes the varlen / causal-flag path (no dense mask either); 5.x's mmkern_mask keeps the bounds
    assert seen[4:] == [(1, slots, pads, [9] * 3, True)] * 2 or (slots == 9 and seen[4:] == [])
    assert tp.ran_on_row("generate", backend, torch.float32, log.calls).passed, sorted(set(log.calls))


def test_static_cache_with_padding_in_the_middle_takes_the_sdpa_drop_in(monkeypatch):
    """Padding inside a sequence is no cache_leftpad: transformers' boolean mask goes to
    mmkern.scaled_dot_product_attention instead (same tokens), and the KV-cache kernel is not called."""
    base = tp.tiny_gpt2().float().eval()
    patched = mmt.apply_mmkern(copy.deepcopy(base))
    calls = []
    real = mmkern.scaled_dot_product_attention
    monkeypatch.setattr(mmkern, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(mmkern, "flash_attn_with_kvcache", None)  # a call would fail
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 2:4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with torch.no_grad(), mmkern.backend("reference"):
        assert torch.equal(patched.generate(ids * mask, **kwargs), base.generate(ids * mask, **kwargs))
    assert calls


@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "with-gradients"])
def test_a_4d_static_cache_mask_is_read_as_cache_bounds(monkeypatch, needs_grad):
    """transformers' boolean 4D mask of a causal layer over a StaticCache (left pads, then the tokens seen, then
    unused slots; the left pad's own query rows see nothing) is read as cache_leftpad / cache_seqlens: in
    inference on the KV-cache kernel, with gradients as a bounds mask on the SDPA drop-in; both match
    transformers' SDPA on that mask at the real queries, and gradients flow to q, k and v."""
    B, H, Lq, slots, D = 3, 4, 5, 12, 16
    leftpad, seqused = torch.tensor([0, 2, 4]), 9
    query_pos = seqused - Lq + torch.arange(Lq)
    j = torch.arange(slots)
    kept = (j >= leftpad[:, None, None]) & (j <= query_pos[None, :, None])   # (B, Lq, slots)
    mask = kept[:, None]
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=needs_grad)
               for L in (Lq, slots, slots))
    calls = []
    kvcache = mmkern.flash_attn_with_kvcache
    monkeypatch.setattr(mmkern, "flash_attn_with_kvcache", lambda *a, **kw: calls.append(kw) or kvcache(*a, **kw))
    module = _module(True)
    with mmkern.backend("reference"), torch.set_grad_enabled(needs_grad):
        got = mmt.mmkern_attention_forward(module, q, k, v, mask, scaling=D ** -0.5, dropout=0.0)[0]
    want = _sdpa(module, q, k, v, mask, scaling=D ** -0.5, dropout=0.0)
    real = query_pos[None, :] >= leftpad[:, None]            # (B, Lq): queries that see a key
    torch.testing.assert_close(got[real], want[real])
    if needs_grad:
        assert not calls
        (gq, gk, gv) = torch.autograd.grad(got[real].sum(), (q, k, v))
        (wq, wk, wv) = torch.autograd.grad(want[real].sum(), (q, k, v))
        for g, w in ((gq, wq), (gk, wk), (gv, wv)):
            torch.testing.assert_close(g, w)
    else:
        assert [(c["cache_leftpad"].tolist(), c["cache_seqlens"].tolist()) for c in calls] == [([0, 2, 4], [9] * 3)]


def test_dropout_in_training_is_fused_and_reproducible():
    """resid_pdrop / hidden_dropout_prob move into the fused norms (train mode only), attention dropout reaches
    the kernel: training outputs are random, reproducible from the seed, and eval mode is deterministic."""
    gpt2 = tp.tiny_gpt2().float()
    gpt2.config.attn_pdrop = 0.2
    for block in gpt2.transformer.h:
        block.attn.attn_dropout.p, block.attn.resid_dropout.p = 0.2, 0.2
    gpt2 = mmt.apply_mmkern(gpt2)
    assert gpt2.transformer.h[0].ln_2.dropout_p == 0.2
    bert = mmt.apply_mmkern(tp.tiny_bert().float())
    assert bert.bert.encoder.layer[0].output.LayerNorm.dropout_p == bert.config.hidden_dropout_prob
    ids = torch.randint(3, 100, (2, 6))
    with mmkern.backend("reference"):
        gpt2.train()
        torch.manual_seed(1)
        a = gpt2(ids, labels=ids)
        torch.manual_seed(1)
        b = gpt2(ids).logits
        torch.manual_seed(2)
        c = gpt2(ids).logits
        a.loss.backward()
        gpt2.eval()
        d, e = gpt2(ids).logits, gpt2(ids).logits
    assert torch.equal(a.logits, b) and not torch.allclose(a.logits, c)
    assert torch.equal(d, e) and not torch.allclose(a.logits, d)
    assert all(torch.isfinite(p.grad).all() for p in gpt2.parameters() if p.grad is not None)
