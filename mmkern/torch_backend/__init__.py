"""The `torch` backend: every op through torch's own kernels, in the input dtype.

This is what a user would call without mmkern (F.scaled_dot_product_attention, F.layer_norm / F.rms_norm
after the add, the eager diffusion formulas). Auto dispatch ranks it above the float64 reference, so a
machine with neither a GPU nor the built extension runs torch's speed, not the oracle's; it is also the
side-by-side peer row of the benchmarks. Each kernel's `reasons(problem)` names what torch cannot express
with mmkern's semantics (e.g. softcap, or dropout: mmkern's dropout mask is a function of the seed, shared
by every backend, and torch draws its own).

Registration is lazy, as for the triton backend: op -> (module of mmkern/torch_backend/, run, reasons).
"""
from mmkern.dispatch import register_lazy

KERNELS = {
    "attention_forward": ("attention", "forward", "forward_reasons"),
    "attention_backward": ("attention", "backward", "backward_reasons"),
    "kvcache_append": ("kvcache", "kvcache_append", "kvcache_append_reasons"),
    # the norm and diffusion families (mmkern/torch_backend/norm.py, diffusion.py)
    "norm_residual_forward": ("norm", "norm_forward", "norm_forward_reasons"),
    "norm_residual_backward": ("norm", "norm_backward", "norm_backward_reasons"),
    "add_noise": ("diffusion", "add_noise", "reasons"),
    "get_velocity": ("diffusion", "get_velocity", "reasons"),
    "diffusion_loss": ("diffusion", "diffusion_loss", "reasons"),
    "diffusion_loss_backward": ("diffusion", "diffusion_loss_backward", "reasons"),
    "ddpm_step": ("diffusion", "ddpm_step", "ddpm_step_reasons"),
    "ddim_step": ("diffusion", "ddim_step", "reasons"),
    "euler_step": ("diffusion", "euler_step", "reasons"),
    "euler_scale_model_input": ("diffusion", "euler_scale_model_input", "reasons"),
    "euler_add_noise": ("diffusion", "euler_add_noise", "reasons"),
    "rotary_embedding": ("rotary", "rotary_embedding", "rotary_embedding_reasons"),
}

register_lazy("torch", "mmkern.torch_backend", KERNELS)
