"""apply_mmkern(model): a transformers BERT or GPT-2, any head, on mmkern, in place (bert.py, gpt2.py)."""
from __future__ import annotations

from torch import nn

from mmkern.integrations.transformers._compat import NAME
from mmkern.integrations.transformers.bert import apply_bert
from mmkern.integrations.transformers.gpt2 import apply_gpt2

SUPPORTED = {
    "bert": "BertModel, BertForMaskedLM and the other Bert* heads",
    "gpt2": "GPT2Model, GPT2LMHeadModel and the other GPT2* heads",
}


def _set_attn_implementation(model: nn.Module) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None and getattr(model, "_supports_attention_backend", True):
        setter(NAME)
    else:  # older transformers: the config field is what every layer reads
        model.config._attn_implementation = NAME
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", NAME) != NAME:
            config._attn_implementation = NAME


def apply_mmkern(model: nn.Module, *, fuse_norms: bool = True) -> nn.Module:
    """Run `model` (a transformers BERT or GPT-2, any head) on mmkern, in place; returns it.

    Sets its attention implementation to "mmkern" and, with fuse_norms=True, replaces the residual
    add + LayerNorm of every block with mmkern's fused op. Parameters are reused, not copied:
    state_dict keys and values are unchanged, so checkpoints load either way and the optimiser keeps
    its parameters. Raises ValueError for other architectures (naming the supported ones) and for
    layouts mmkern cannot run.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        supported = "; ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        raise ValueError(f"apply_mmkern: {type(model).__name__} (model_type={model_type!r}) is not supported; "
                         f"supported architectures: {supported}")
    if model_type == "bert":
        apply_bert(model, fuse_norms)
    else:
        apply_gpt2(model, fuse_norms)
    _set_attn_implementation(model)
    return model
