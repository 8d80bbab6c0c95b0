"""Workarounds for gaps of Triton's CPU interpreter (TRITON_INTERPRET=1, the test mode), never used on a GPU.

Loop bounds from scalars: the interpreter holds a scalar as a 1-element array of shape (1,), and a kernel
loop `for n in range(lo, hi, BLOCK_N)` over runtime bounds asks Python for `lo.__index__()`. Triton 3.8's
interpreter squeezes the array first; triton 3.6's (the GPU image's version) calls `int()` on it directly,
which NumPy >= 2.5 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
attention kernel stopped at its first loop. `apply()` makes the interpreter's per-launch patch of
`tl.tensor` install the squeezing `__index__` on every version (restored after the launch, as the
interpreter restores its own patches).
"""
from __future__ import annotations

_applied = False


def _index_of_scalar(self) -> int:
    return int(self.handle.data.squeeze())


def apply() -> None:
    """Patch the interpreter once per process; a no-op when its internals are not the ones known here."""
    global _applied
    if _applied:
        return
    _applied = True
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:        # another interpreter layout: nothing to mend here
        return

    def patch_tensor_with_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _index_of_scalar)

    interpreter._patch_lang_tensor = patch_tensor_with_squeezing_index
