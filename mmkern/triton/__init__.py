"""The triton backend: Triton kernels, on a GPU or on the CPU through Triton's interpreter.

Registration is lazy: this file does not import triton. The table below names, per op, the
module of mmkern/triton/ that holds its kernel and the two functions the dispatcher calls:
`run(**inputs)` and `reasons(**inputs) -> list[str]` (why the kernel cannot take these inputs).
A module is imported the first time the dispatcher asks about its op, which only happens when
the backend's environment is usable (mmkern/backends.py).
"""
import importlib

from mmkern.dispatch import register_kernel

# op -> (module, run function, reasons function)
KERNELS = {
    "attention_forward": ("attention", "forward", "forward_reasons"),
    "attention_backward": ("attention", "backward", "backward_reasons"),
    "kvcache_append": ("attention", "kvcache_append", "kvcache_append_reasons"),
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
}


def _lazy(module: str, function: str):
    resolved = []           # the function, imported on the first call (the dispatcher calls per op call)

    def call(**inputs):
        if not resolved:
            resolved.append(getattr(importlib.import_module(f"mmkern.triton.{module}"), function))
        return resolved[0](**inputs)
    call.__qualname__ = f"mmkern.triton.{module}.{function}"
    return call


for _op, (_module, _run, _reasons) in KERNELS.items():
    register_kernel(_op, "triton", _lazy(_module, _run), _lazy(_module, _reasons))
