"""How apply_mmkern changes a model's modules in place, whatever the architecture: a LayerNorm becomes an
mmkern LayerNormResidual holding its very parameters, a module gets a subclass of its class with another
forward, and whether a layer dispatches attention through transformers' AttentionInterface at all.
"""
from __future__ import annotations

import sys

from torch import nn

from mmkern.integrations.transformers._compat import AttentionInterface
from mmkern.nn import LayerNormResidual


def _fused_norm(ln: nn.LayerNorm, dropout_p: float, prenorm: bool) -> LayerNormResidual:
    """An mmkern LayerNormResidual holding ln's very parameters (same names: state_dict keys unchanged)."""
    if not isinstance(ln, nn.LayerNorm):
        raise ValueError(f"apply_mmkern: expected a torch.nn.LayerNorm, found {type(ln).__name__}")
    fused = LayerNormResidual(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                              bias=ln.bias is not None, dropout_p=dropout_p, prenorm=prenorm,
                              device=ln.weight.device if ln.weight is not None else None,
                              dtype=ln.weight.dtype if ln.weight is not None else None)
    fused.weight, fused.bias = ln.weight, ln.bias
    fused.train(ln.training)
    return fused


_CLASS_CACHE: dict = {}


def _swap_class(module: nn.Module, forward, tag: str) -> None:
    """Give `module` a subclass of its class whose forward is `forward` (isinstance checks still hold)."""
    cls = type(module)
    if getattr(cls, "_mmkern_fused", False):
        return
    key = (cls, tag)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"MMKern{cls.__name__}", (cls,), {"forward": forward, "_mmkern_fused": True,
                                                                    "__module__": cls.__module__})
    module.__class__ = _CLASS_CACHE[key]


def uses_attention_interface(module: nn.Module) -> bool:
    """Whether `module`'s class dispatches its attention through transformers' AttentionInterface.

    Read off the modeling module that defines the class (a structural check, not a search of its source):
    a modeling module that dispatches holds ALL_ATTENTION_FUNCTIONS, transformers' AttentionInterface
    instance (GPT-2 from 4.48, BERT from 5.0); one that calls torch's SDPA itself (BERT in 4.x) does not."""
    modeling = sys.modules.get(type(module).__module__)
    functions = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
    if functions is None or AttentionInterface is None:
        return False
    return isinstance(functions, AttentionInterface)
