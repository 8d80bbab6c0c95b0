"""The reference backend: eager PyTorch computed in float64, complete for every op and feature.

It is the oracle the other backends are tested against and never calls another backend. Every kernel
takes the op's problem record (mmkern/ops/).
"""
from mmkern.dispatch import register_kernel
from mmkern.reference import attention, diffusion, norm
from mmkern.reference import diffusion_loss, diffusion_samplers, rotary

register_kernel("attention_forward", "reference", attention.forward)
register_kernel("attention_backward", "reference", attention.backward)
register_kernel("kvcache_append", "reference", attention.kvcache_append)
register_kernel("norm_residual_forward", "reference", norm.forward)
register_kernel("norm_residual_backward", "reference", norm.backward)
register_kernel("add_noise", "reference", diffusion.add_noise)
register_kernel("get_velocity", "reference", diffusion.get_velocity)
register_kernel("diffusion_loss", "reference", diffusion_loss.forward)
register_kernel("diffusion_loss_backward", "reference", diffusion_loss.backward)
register_kernel("ddpm_step", "reference", diffusion_samplers.ddpm_step)
register_kernel("ddim_step", "reference", diffusion_samplers.ddim_step)
register_kernel("euler_step", "reference", diffusion_samplers.euler_step)
register_kernel("euler_scale_model_input", "reference", diffusion_samplers.euler_scale_model_input)
register_kernel("euler_add_noise", "reference", diffusion_samplers.euler_add_noise)
register_kernel("rotary_embedding", "reference", rotary.rotary_embedding)
