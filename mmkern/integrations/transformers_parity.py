"""Parity of transformers models patched by apply_mmkern against the unpatched originals (same weights).

Used by tests/test_integration_transformers.py and by `mmkern verify` (parity_rows). Every check
follows the project's criterion, with the unpatched model run in float64 as the oracle:
    error     = max |patched model in dtype d - unpatched model in float64|
    baseline  = max |unpatched model in d     - unpatched model in float64|
    tolerance = 2 * baseline + eps(d) * max |oracle|
over outputs at real (non-padded) positions and the loss, each on its own, and every parameter's gradient
(each parameter judged on its own; the row gives the worst). The oracle's weights are the dtype's weights
upcast (the same rounded inputs the patched model gets). Greedy generation must give identical tokens. A
"ran on" row checks, through mmkern.dispatch_log, that the ops ran where the row says: norms on the backend,
attention on attention_backend(backend, dtype).
The models are tiny (2 layers, hidden 128, 2 heads of head dim 64, vocab 100) with random weights: no
downloads. Head dim 64 is one every attention backend takes (the CUDA C++ kernels: 64/96/128, fp16/bf16).
Importing this module raises ImportError when transformers is missing.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch

import mmkern
from mmkern import dispatch
from mmkern.integrations.transformers import apply_mmkern  # ImportError without transformers
from mmkern.verify import Row, _err, _largest

from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

VOCAB = 100
ATTENTION_OPS = ("attention_forward", "attention_backward", "kvcache_append")


# --------------------------------------------------------------------------- tiny models and batches

def tiny_bert(seed: int = 0, hidden: int = 128, heads: int = 2) -> BertForMaskedLM:
    """A 2-layer BertForMaskedLM with random weights, float64, dropout off (parity is deterministic)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=64, type_vocab_size=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return BertForMaskedLM(config).double()


def tiny_gpt2(seed: int = 0, hidden: int = 128, heads: int = 2) -> GPT2LMHeadModel:
    """A 2-layer GPT2LMHeadModel with random weights, float64, dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=hidden, n_layer=2, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).double()


def bert_batch(seed: int = 1) -> dict:
    """3 sequences of length 11 (real lengths 11, 7, 4: right padding), token types, masked-LM labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate((11, 7, 4)):
        mask[row, :n] = 1
    ids = ids * mask
    token_type_ids = (torch.arange(11) >= 5).long().expand(3, 11) * mask
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.5) & mask.bool(), ids, torch.full_like(ids, -100))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)


def gpt2_batch(seed: int = 2) -> dict:
    """3 sequences of length 10: full, left-padded (real 6), right-padded (real 8); labels -100 on padding.

    GPT-2's loss predicts label t from the logits at t - 1, so the first real token of the left-padded
    sequence would be scored from a padded position, whose output no model defines (a query that sees no key:
    transformers 4.53's SDPA path and mmkern give different values there): its label is -100 as well."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, 8:] = 0
    ids = ids * mask
    predicted_from_real = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1).bool()
    labels = torch.where(mask.bool() & predicted_from_real, ids, torch.full_like(ids, -100))
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


# --------------------------------------------------------------------------- running on a backend

def attention_backend(backend: str, dtype=torch.float32) -> str:
    """The backend the models' attention runs on in `dtype` when `backend` is asked for: itself if it has the
    attention ops and they take the tiny models' attention (head dim 64) in that dtype, else reference (a
    backend with norms only, like the C++ cpu backend today; or the CUDA C++ kernels in float32, which they
    do not take). The rows name it, and their "ran on" row checks it."""
    kernels = dispatch.backends()[backend].kernels
    if not all(op in kernels for op in ATTENTION_OPS):
        return "reference"
    return "reference" if _attention_reasons(backend, dtype) else backend


def _attention_reasons(backend: str, dtype) -> list[str]:
    """Why `backend` would refuse the tiny models' (causal, dense) attention forward in `dtype`."""
    device = _device(backend)
    q = torch.zeros(1, 2, 2, 64, dtype=dtype, device=device)         # (batch, seqlen, heads, head_dim 64)
    problem = dispatch.problem("attention_forward", q=q, k=q, v=q, softmax_scale=64 ** -0.5, causal=True)
    return dispatch.not_supported_reasons("attention_forward", backend, problem)


def _enter(context) -> None:
    context.__enter__()


def _exit(context) -> None:
    context.__exit__(None, None, None)


@contextlib.contextmanager
def running_on(model: torch.nn.Module, backend: str, dtype=torch.float32):
    """Forward passes inside run every mmkern op of `model` on `backend` (attention: attention_backend)."""
    attn = attention_backend(backend, dtype)
    handles = []
    if attn != backend:
        for module in model.modules():
            if hasattr(module, "_mmkern_name") and not hasattr(module, "ln_1"):  # attention layers, not blocks
                forcing = mmkern.backend(attn)
                # Hooks must return None: a forward pre-hook's return value replaces the module's inputs.
                handles.append(module.register_forward_pre_hook(lambda *_, f=forcing: _enter(f)))
                handles.append(module.register_forward_hook(lambda *_, f=forcing: _exit(f)))
    try:
        with mmkern.backend(backend):
            yield
    finally:
        for h in handles:
            h.remove()


def backward_on(backend: str, dtype=torch.float32):
    """Context for loss.backward(): norm backwards keep their forward's backend; attention's is chosen here."""
    return mmkern.backend(attention_backend(backend, dtype))


def _device(backend: str) -> torch.device:
    if torch.cuda.is_available() and backend in ("cuda", "triton"):
        return torch.device("cuda")
    return torch.device("cpu")


def _prepare(base: torch.nn.Module, dtype, device, patched: bool) -> torch.nn.Module:
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    model.train()  # dropout is 0: training mode only makes the gradient path the one training uses
    return apply_mmkern(model) if patched else model


def _oracle_model(base: torch.nn.Module, dtype, device) -> torch.nn.Module:
    """The unpatched model in float64 with the weights the dtype's models have (rounded to dtype, upcast)."""
    return _prepare(copy.deepcopy(base).to(dtype), torch.float64, device, False)


def _run(model, batch: dict, keep: torch.Tensor, backend: str | None, hidden: bool, dtype=torch.float32) -> dict:
    """Outputs at real positions, loss, every parameter's gradient (named) of one forward/backward, and the
    (op, backend) pairs mmkern dispatched."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    ctx = running_on(model, backend, dtype) if backend else contextlib.nullcontext()
    with mmkern.dispatch_log() as log:
        with ctx:
            out = model(**batch, output_hidden_states=hidden)
        with backward_on(backend, dtype) if backend else contextlib.nullcontext():
            out.loss.backward()
    keep = keep.to(device)
    result = {"logits": out.logits[keep].detach(), "loss": out.loss.detach().reshape(1)}
    if hidden:
        result["hidden"] = out.hidden_states[-1][keep].detach()
    result["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    result["ran"] = log.calls
    return result


def _judge(got: torch.Tensor, base: torch.Tensor, oracle: torch.Tensor, dtype) -> tuple[float, float]:
    """(error, tolerance) of one tensor: flash-attn's criterion."""
    return _err(got, oracle), 2 * _err(base, oracle) + torch.finfo(dtype).eps * max(_largest([oracle]), 1e-3)


def ran_on_row(name: str, backend: str, dtype, calls: list[tuple[str, str]]) -> Row:
    """0 wrong ops when every norm op ran on `backend` and every attention op on attention_backend(backend, dtype)
    (and at least one of each ran); the shape column lists what ran."""
    attn = attention_backend(backend, dtype)
    ran = sorted(set(calls))
    wrong = [(op, b) for op, b in ran if b != (attn if op in ATTENTION_OPS else backend)]
    missing = [family for family, ops in (("attention", ATTENTION_OPS), ("norm", ("norm_residual_forward",)))
               if not any(op in ops for op, _ in ran)]
    label = ", ".join(f"{op}@{b}" for op, b in ran) or "nothing"
    why = "; ".join([f"{op} ran on {b}" for op, b in wrong] + [f"no {family} op ran" for family in missing])
    return Row(f"{name} ran on", backend, str(dtype).replace("torch.", ""), label,
               float(len(wrong) + len(missing)), 0.0, why)


def _rows(name: str, backend: str, dtype, shape: str, got: dict, base: dict, oracle: dict) -> list[Row]:
    label = str(dtype).replace("torch.", "")
    attn = attention_backend(backend, dtype)
    backend_label = backend if attn == backend else f"{backend} (attention on {attn})"
    rows = []
    for part in [k for k in oracle if k not in ("grads", "ran")]:
        error, tolerance = _judge(got[part], base[part], oracle[part], dtype)
        rows.append(Row(f"{name} {part}", backend_label, label, shape, error, tolerance))
    # every parameter's gradient on its own: the row shows the one closest to (or furthest past) its bound
    missing = set(oracle["grads"]) ^ set(got["grads"])
    judged = {n: _judge(got["grads"][n], base["grads"][n], g, dtype) for n, g in oracle["grads"].items()
              if n in got["grads"]}
    worst = max(judged, key=lambda n: judged[n][0] / judged[n][1] if judged[n][1] else math.inf)
    error, tolerance = judged[worst]
    if missing:
        error = math.inf  # a parameter lost (or gained) its gradient
    rows.append(Row(f"{name} grads ({len(oracle['grads'])} params, each; worst {worst})", backend_label, label,
                    shape, error, tolerance))
    rows.append(ran_on_row(name, backend, dtype, got["ran"]))
    return rows


def bert_parity(backend: str, dtype=torch.float32) -> list[Row]:
    """BertForMaskedLM with right padding and token types: last hidden states, logits, MLM loss, gradients."""
    device = _device(backend)
    base, batch = tiny_bert(), bert_batch()
    keep = torch.ones_like(batch["attention_mask"], dtype=torch.bool)  # bidirectional: every position matches
    oracle = _run(_oracle_model(base, dtype, device), batch, keep, None, True)
    baseline = _run(_prepare(base, dtype, device, False), batch, keep, None, True)
    got = _run(_prepare(base, dtype, device, True), batch, keep, backend, True, dtype)
    return _rows("transformers BERT MLM", backend, dtype, "3x11 pad 11,7,4 h128", got, baseline, oracle)


def gpt2_parity(backend: str, dtype=torch.float32) -> list[Row]:
    """GPT2LMHeadModel with left and right padding: logits at real positions, LM loss, gradients."""
    device = _device(backend)
    base, batch = tiny_gpt2(), gpt2_batch()
    keep = batch["attention_mask"].bool()  # padded query rows see nothing (or garbage) in the original
    oracle = _run(_oracle_model(base, dtype, device), batch, keep, None, False)
    baseline = _run(_prepare(base, dtype, device, False), batch, keep, None, False)
    got = _run(_prepare(base, dtype, device, True), batch, keep, backend, False, dtype)
    return _rows("transformers GPT-2 LM", backend, dtype, "3x10 left/right pad h128", got, baseline, oracle)


def generate_pair(backend: str, dtype=torch.float32, new_tokens: int = 6, left_padded: bool = True, log=None,
                  cache_implementation: str | None = None):
    """Greedy generate with the KV cache: (tokens of the unpatched model, tokens of the patched one); the
    patched model's generate runs inside `log` (a mmkern.dispatch_log) when given. cache_implementation:
    transformers' generate argument ("static": a StaticCache), None: its default (a DynamicCache)."""
    device = _device(backend)
    base = tiny_gpt2()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if left_padded:
        mask[1, :3] = 0
        mask[2, :5] = 0
        ids = ids * mask
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    if cache_implementation is not None:
        kwargs["cache_implementation"] = cache_implementation
    plain = _prepare(base, dtype, device, False).eval()
    patched = _prepare(base, dtype, device, True).eval()
    with torch.no_grad():
        want = plain.generate(ids, **kwargs)
        with running_on(patched, backend, dtype), log or contextlib.nullcontext():
            got = patched.generate(ids, **kwargs)
    return want, got


def generate_rows(backend: str, dtype=torch.float32) -> list[Row]:
    rows = []
    attn = attention_backend(backend, dtype)
    for left_padded in (False, True):
        name = f"transformers GPT-2 greedy generate (KV cache){' left-padded' if left_padded else ''}"
        log = mmkern.dispatch_log()
        want, got = generate_pair(backend, dtype, left_padded=left_padded, log=log)
        mismatched = float((want != got).sum()) if want.shape == got.shape else float("inf")
        rows.append(Row(name, backend if attn == backend else f"{backend} (attention on {attn})",
                        str(dtype).replace("torch.", ""), "3x7 + 6 new tokens, wrong tokens", mismatched, 0.0))
        rows.append(ran_on_row(name, backend, dtype, log.calls))
    return rows


def parity_rows(backend: str) -> list[Row]:
    """`mmkern verify`'s model parity rows for `backend`: float32, plus bfloat16 when it runs on a GPU."""
    rows = bert_parity(backend) + gpt2_parity(backend) + generate_rows(backend)
    if _device(backend).type == "cuda":
        rows += bert_parity(backend, torch.bfloat16) + gpt2_parity(backend, torch.bfloat16)
    return rows
