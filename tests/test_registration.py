"""Registration checks itself: every (backend, op) the backends register names an op of mmkern and resolves to
a real function (a misspelt module or function in a lazy table fails here, not in a user's call, where it
would have read as "not written yet"), every op has a reference kernel (the oracle is complete) and a problem
builder, and an unknown op name is refused at registration."""
import inspect

import pytest

import mmkern
from mmkern import dispatch


def _registered():
    return [(name, op, kernel) for name, b in dispatch.backends().items() for op, kernel in b.kernels.items()]


@pytest.mark.parametrize("name,op,kernel", _registered(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_registered_kernel_resolves_to_a_function_of_one_problem(name, op, kernel):
    assert op in dispatch.OPS
    for role, fn in (("run", kernel.run), ("reasons", kernel.reasons)):
        if name == "triton" and not dispatch.environment_reasons("triton") == []:
            pytest.skip("triton is not usable here: its kernel modules import triton")
        target = fn.resolve() if isinstance(fn, dispatch.LazyFunction) else fn
        assert callable(target), f"{name} {op} {role}: {target!r}"
        parameters = [p for p in inspect.signature(target).parameters.values()
                      if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert len(parameters) == 1, f"{name} {op} {role} ({target.__module__}.{target.__qualname__}) must take one " \
                                     f"problem record, takes {[p.name for p in parameters]}"


def test_every_op_has_a_reference_kernel_and_a_problem_builder():
    reference = dispatch.backends()["reference"].kernels
    assert set(reference) == set(dispatch.OPS)
    assert set(dispatch._PROBLEMS) == set(dispatch.OPS)
    for name, b in dispatch.backends().items():
        assert set(b.kernels) <= set(dispatch.OPS), name


def test_every_op_is_a_torch_op():
    import torch
    for op in dispatch.OPS:
        assert hasattr(torch.ops.mmkern, op), op


def test_an_unknown_op_name_is_refused_at_registration():
    with pytest.raises(ValueError, match="unknown op 'attention_fwd'"):
        dispatch.register_lazy("triton", "mmkern.triton", {"attention_fwd": ("attention", "forward", "forward_reasons")})
    assert "attention_fwd" not in dispatch.backends()["triton"].kernels


def test_a_misspelt_function_fails_to_resolve():
    fn = dispatch.LazyFunction("mmkern.torch_backend.attention", "fowrard")
    with pytest.raises(AttributeError, match="has no function fowrard"):
        fn.resolve()
