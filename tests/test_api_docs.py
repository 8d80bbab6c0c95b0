"""Every public function of the attention, norm and diffusion APIs and every nn module's constructor and forward names each of
its arguments in its docstring (with its shape and dtype, and what it returns: see the docstrings; this test can
check only that each argument is named), as flash-attn's interface does."""
import importlib
import inspect
import re
import types

import pytest

MODULES = ["mmkern.attention", "mmkern.rotary", "mmkern.norm", "mmkern.nn.norm", "mmkern.diffusion.noising", "mmkern.diffusion.loss",
           "mmkern.diffusion.sampling", "mmkern.diffusion.schedules", "mmkern.diffusion.schedulers"]


def documented(module):
    """(label, function, docstring) for the module's public functions, and its public classes' constructors and
    public methods (those they inherit from a private base of the same module included)."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj, obj.__doc__
        elif inspect.isclass(obj):
            if "__init__" in obj.__dict__:
                yield f"{name}.__init__", obj.__init__, (obj.__doc__ or "") + (obj.__init__.__doc__ or "")
            for cls in obj.__mro__:
                if cls is obj or (cls.__module__ == module.__name__ and cls.__name__.startswith("_")):
                    for key, fn in vars(cls).items():
                        if inspect.isfunction(fn) and not key.startswith("_"):
                            yield f"{name}.{key}", fn, fn.__doc__


def undocumented(module) -> list[str]:
    missing = []
    for label, fn, doc in documented(module):
        if not doc:
            missing.append(f"{label}: no docstring")
            continue
        missing += [f"{label}: argument {p!r} is not in its docstring" for p in inspect.signature(fn).parameters
                    if p not in ("self", "args", "kwargs") and not re.search(rf"\b{p}\b", doc)]
    return missing


@pytest.mark.parametrize("name", MODULES)
def test_every_argument_is_documented(name):
    if name.endswith("schedulers"):
        pytest.importorskip("diffusers")
    missing = undocumented(importlib.import_module(name))
    assert not missing, "\n".join(missing)


def test_the_check_finds_what_is_missing():
    module = types.ModuleType("fake")

    def f(x, weight):
        """x: (N,) float32, weight: (N,) float32. Returns x * weight."""

    def g(x, scale):
        """x: (N,) float32. Returns x."""

    class C:
        def forward(self, x):
            pass

    for obj in (f, g, C):
        obj.__module__ = "fake"
        setattr(module, obj.__name__, obj)
    assert undocumented(module) == ["g: argument 'scale' is not in its docstring", "C.forward: no docstring"]
