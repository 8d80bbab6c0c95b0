"""The eager fast path: call an op's Python implementation directly when that is the same as calling the op.

Every public function runs through a torch.library custom op (torch.ops.mmkern.*), which is what makes it
traceable by torch.compile, checkable by opcheck and differentiable. In plain eager code the custom-op layers
(the autograd wrapper, the redispatch, the dynamo-disable wrapper around the implementation) cost 15-40 us of
Python per call, more than the kernel itself for a sampler step on a 64x64 latent or a decode-time norm. When
none of them has work to do, `call(op, *args)` skips them and runs the function the op wraps (the same
validation, the same dispatch to a backend, the same kernels); otherwise it calls the op.

The op layer has nothing to do when all of these hold:
  * not under torch.compile / dynamo, torch.jit tracing, a functorch transform (vmap, grad) or the profiler
    (whose traces should show mmkern::<op>);
  * no TorchFunctionMode or TorchDispatchMode is active (FakeTensorMode, FlopCounterMode, debug modes);
  * every tensor argument is a plain torch.Tensor or nn.Parameter (no subclass: FakeTensor, DTensor,
    FunctionalTensor), not on the meta device, not a functionalization wrapper;
  * no autograd graph is needed: grad mode is off or no tensor argument requires grad.
"""
from __future__ import annotations

import torch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tensor_args(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def plain_eager(args) -> bool:
    """True when calling a custom op on `args` would do nothing but run its implementation (see above)."""
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        return False
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.maybe_current_level() is not None or torch._C._autograd._profiler_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in _tensor_args(args):
        if type(t) not in _PLAIN_TYPES or t.is_meta or (grad and t.requires_grad) or torch._is_functional_tensor(t):
            return False
    return True


def call(op, *args):
    """op(*args) for a torch.library custom op (a CustomOpDef), through its implementation when plain_eager."""
    impl = getattr(op, "_init_fn", None)        # the decorated function (torch 2.4+; absent: always the op)
    if impl is not None and plain_eager(args):
        return impl(*args)
    return op(*args)
