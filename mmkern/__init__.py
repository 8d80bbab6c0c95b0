"""mmkern: fused attention, residual + norm and diffusion noise-schedule kernels as torch ops.

    import mmkern
    out = mmkern.flash_attn_func(q, k, v, causal=True)              # (batch, seqlen, heads, head_dim)
    out = mmkern.scaled_dot_product_attention(q, k, v, is_causal=True)   # torch's layout and semantics
    out, residual = mmkern.layer_norm_residual(x, residual, w, b, prenorm=True)
    norm = mmkern.nn.LayerNormResidual(768, prenorm=True)                # loads a torch.nn.LayerNorm state_dict
    x_t = mmkern.diffusion.add_noise(x0, noise, t, alphas_cumprod)

Every function runs through torch ops (torch.ops.mmkern.*) that pick a backend per call;
`with mmkern.backend("reference"):` or MMKERN_BACKEND forces one, mmkern.available_backends()
lists those usable here.
"""
from mmkern._version import __version__
from mmkern import backends as _backends  # noqa: F401  (registers the backends)
from mmkern import reference as _reference  # noqa: F401  (registers the reference kernels)
from mmkern import torch_backend as _torch_backend  # noqa: F401  (registers torch's own kernels, lazily)
from mmkern import triton as _triton  # noqa: F401  (registers the Triton kernels, lazily)
from mmkern import native as _native  # noqa: F401  (registers the C++/CUDA kernels of mmkern._C, lazily)
from mmkern.dispatch import NoBackendError, available_backends, backend, dispatch_log, explain
from mmkern.attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                              flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                              flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache, scaled_dot_product_attention)
from mmkern.norm import layer_norm_residual, rms_norm_residual
from mmkern.rotary import apply_rotary_emb
from mmkern import diffusion
from mmkern import nn

__all__ = [
    "__version__", "NoBackendError", "available_backends", "backend", "dispatch_log", "explain", "diffusion", "nn",
    "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
    "scaled_dot_product_attention",
    "layer_norm_residual", "rms_norm_residual", "apply_rotary_emb",
]
