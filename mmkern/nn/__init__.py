"""Drop-in nn.Modules over mmkern's fused ops.

    LayerNormResidual(768, dropout_p=0.1, prenorm=True)   # ~ torch.nn.LayerNorm(768) after dropout + residual add
    RMSNormResidual(4096)                                  # ~ torch.nn.RMSNorm(4096)

Their parameters carry torch's names, so a torch.nn.LayerNorm / torch.nn.RMSNorm state_dict loads unchanged.
"""
from mmkern.nn.norm import LayerNormResidual, RMSNormResidual

__all__ = ["LayerNormResidual", "RMSNormResidual"]
