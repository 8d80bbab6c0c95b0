"""The triton backend: Triton kernels, on a GPU or on the CPU through Triton's interpreter.

Registration is lazy: this file does not import triton. The table below names, per op, the
module of mmkern/triton/ that holds its kernel and the two functions the dispatcher calls:
`run(problem)` and `reasons(problem) -> list[str]` (why the kernel cannot take this problem record).
A module is imported the first time the dispatcher asks about its op, which only happens when
the backend's environment is usable (mmkern/backends.py).
"""
from mmkern.dispatch import LazyFunction, register_kernel, register_lazy

# op -> (module, run function, reasons function)
KERNELS = {
    "attention_forward": ("attention", "forward", "forward_reasons"),
    "attention_backward": ("attention", "backward", "backward_reasons"),
    "add_noise": ("diffusion", "add_noise", "noise_mix_reasons"),
    "get_velocity": ("diffusion", "get_velocity", "noise_mix_reasons"),
    "diffusion_loss": ("diffusion_loss", "forward", "loss_reasons"),
    "diffusion_loss_backward": ("diffusion_loss", "backward", "loss_reasons"),
    "ddpm_step": ("diffusion_samplers", "ddpm_step", "step_reasons"),
    "ddim_step": ("diffusion_samplers", "ddim_step", "step_reasons"),
    "euler_step": ("diffusion_samplers", "euler_step", "step_reasons"),
    "euler_scale_model_input": ("diffusion_samplers", "euler_scale_model_input", "step_reasons"),
    "euler_add_noise": ("diffusion_samplers", "euler_add_noise", "add_noise_reasons"),
    "norm_residual_forward": ("norm", "norm_forward", "norm_forward_reasons"),
    "norm_residual_backward": ("norm", "norm_backward", "norm_backward_reasons"),
    "rotary_embedding": ("rotary", "rotary_embedding", "rotary_embedding_reasons"),
}


register_lazy("triton", "mmkern.triton", KERNELS)
# an indexed copy needs no Triton kernel: the torch backend's (no host sync, fine under CUDA graphs)
register_kernel("kvcache_append", "triton", LazyFunction("mmkern.torch_backend.kvcache", "kvcache_append"),
                LazyFunction("mmkern.triton.attention", "kvcache_append_reasons"))
