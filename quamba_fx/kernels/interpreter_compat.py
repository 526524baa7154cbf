"""Keeps the Triton interpreter (TRITON_INTERPRET=1) working with NumPy >= 2.4 on older Tritons.

Under the interpreter a kernel's scalar arguments are Triton tensors holding a 1-element, 1-D NumPy
array, and a loop with a run-time bound (`for k in range(0, K, BLOCK)`: the GEMM, scan and two-pass
norm kernels) calls the tensor's `__index__`, which Triton 3.6 defines as `int(data)`. NumPy 2.4
turned that conversion of a 1-D array into a TypeError ("only 0-dimensional arrays can be converted
to Python scalars"); later Tritons convert the single element instead. `install()` checks the
interpreter's `__index__` on such an array and, only if it fails, adds the element-wise conversion
after Triton's own patches (which the interpreter applies around every kernel call, and restores
after it). Nothing changes on the GPU, or where the interpreter already works.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

_installed = False


def _index_fails(patch_lang_tensor: Callable[[Any, Any], None], scope_type: type) -> bool:
    """Whether `__index__`, as the interpreter patches it onto tensors, fails on a 1-element array."""

    class Probe:
        pass

    scope = scope_type()
    patch_lang_tensor(Probe, scope)
    try:
        probe = Probe()
        probe.handle = SimpleNamespace(data=np.array([3], dtype=np.int32))
        return operator.index(probe) != 3
    except TypeError:
        return True
    finally:
        scope.restore()


def _element_index(self: Any) -> int:
    return int(self.handle.data.item())


def install() -> bool:
    """Make the interpreter's scalar `__index__` NumPy-2.4-proof if it is not; True if it patched.

    A no-op on a Triton whose interpreter works, or whose internals this does not recognise.
    """
    global _installed
    if _installed:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or not _index_fails(original, scope_type):
        return False

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _element_index)

    interpreter._patch_lang_tensor = patch_lang_tensor
    _installed = True
    return True
