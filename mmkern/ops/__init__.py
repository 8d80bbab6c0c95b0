"""torch.library op definitions (torch.ops.mmkern.*): validation, fake implementations, autograd, dispatch."""
