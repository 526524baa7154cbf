"""Keeps the Triton interpreter (TRITON_INTERPRET=1) working across the Tritons and NumPys we accept.

`install()` probes the interpreter for two known faults and patches only the ones it finds, and
removes one known cost; it is only called under the interpreter, so nothing changes on the GPU.

* Scalar `__index__` (Triton 3.6 with NumPy >= 2.4). Under the interpreter a kernel's scalar
  arguments are Triton tensors holding a 1-element, 1-D NumPy array, and a loop with a run-time
  bound (`for k in range(0, K, BLOCK)`: the GEMM, scan and two-pass norm kernels) calls the
  tensor's `__index__`, which Triton 3.6 defines as `int(data)`. NumPy 2.4 turned that conversion of
  a 1-D array into a TypeError ("only 0-dimensional arrays can be converted to Python scalars");
  later Tritons convert the single element instead. The fix adds the element-wise conversion after
  Triton's own patches (which the interpreter applies around every kernel call, and restores after
  it).
* Integer masks (Triton 3.9). A comparison of scalars (`chunk > 0`, `chunk` from
  `tl.program_id`) keeps its left operand's type in the interpreter's tensor handle, so a block
  mask `&`-ed with it holds int32 zeros and ones. Tritons up to 3.8 loaded and stored through such
  masks as through booleans; 3.9's native load, store and atomics reject them ("mask has
  unsupported dtype"). The fix hands those three native calls the mask as booleans: the same
  values, since a mask's elements are 0 or 1.

And one cost, not a fault:

* Re-patching on every device-function call (every Triton we accept). The interpreter patches
  `triton.language` when a kernel launches and restores it when the launch ends, and also on each
  call of a `@triton.jit` helper inside the kernel (`_to_f32`, `fma_rn`, ...): four
  `inspect.getmembers` sweeps over the language each time, for attributes the launch has already
  patched (the sweeps only replace builtins, and a patched attribute no longer is one). Our
  kernels call such helpers a few times per step, so the sweeps were about a quarter of an
  interpreted model's time (tests/test_kernel_logits.py's lowered model: 9 of 39 s, 39 261 calls).
  The fix skips the patching where the helper's language modules are already patched; a launch,
  or a helper called outside any launch, still patches (and a launch still restores) as before.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

_installed: set[str] = set()


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


def _fix_index(interpreter: Any) -> bool:
    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or not _index_fails(original, scope_type):
        return False

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _element_index)

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def _int_masks_fail(native: Any) -> bool:
    """Whether the interpreter's native load rejects an int32 mask (on a one-float buffer)."""
    buffer = np.zeros(1, dtype=np.float32)
    pointers = np.array([buffer.ctypes.data], dtype=np.uint64)
    try:
        native.load(pointers, np.ones(1, dtype=np.int32), np.zeros(1, dtype=np.float32), np.dtype(np.float32))
    except (TypeError, ValueError):
        return True
    return False


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return mask if mask.dtype == np.bool_ else mask.astype(np.bool_)


class BoolMasks:
    """The interpreter's native module with the masks of `load`, `store` and `atomic_rmw` made
    boolean; every other attribute is the native module's."""

    def __init__(self, native: Any):
        self.native = native

    def __getattr__(self, name: str) -> Any:
        return getattr(self.native, name)

    def load(self, pointers: np.ndarray, mask: np.ndarray, other: np.ndarray, dtype: Any) -> np.ndarray:
        return self.native.load(pointers, _as_bool(mask), other, dtype)

    def store(self, pointers: np.ndarray, values: np.ndarray, mask: np.ndarray) -> Any:
        return self.native.store(pointers, values, _as_bool(mask))

    def atomic_rmw(self, op: Any, pointers: np.ndarray, values: np.ndarray, mask: np.ndarray, sem: Any) -> Any:
        return self.native.atomic_rmw(op, pointers, values, _as_bool(mask), sem)


def _fix_masks(interpreter: Any) -> bool:
    native = getattr(interpreter, "_interpreter", None)
    if native is None or isinstance(native, BoolMasks) or not hasattr(native, "load") or not _int_masks_fail(native):
        return False
    interpreter._interpreter = BoolMasks(native)
    return True


class _NothingToRestore:
    """The scope of a patching that was skipped: restoring it changes nothing."""

    def restore(self) -> None:
        pass


def _language_patched(fn: Any, tl: Any) -> bool:
    """Whether every Triton language module that `fn` sees (the interpreter patches `triton.language`
    and `triton.language.core`, found in fn's globals) is patched now: a builtin, once patched, is
    a plain function without Triton's builtin mark. `tl.math` is patched along with `tl`."""
    is_builtin = tl.core.is_builtin
    langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
    return bool(langs) and all(not is_builtin(lang.program_id) for lang in langs) and (
        tl not in langs or not is_builtin(tl.math.exp))


def _fix_repatching(interpreter: Any) -> bool:
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "skips_patched", False):
        return False
    import triton.language as tl

    if not all(hasattr(x, "program_id") for x in (tl, tl.core)) or not hasattr(tl.core, "is_builtin"):
        return False
    nothing = _NothingToRestore()

    def patch_lang(fn: Any) -> Any:
        if _language_patched(fn, tl):
            return nothing
        return original(fn)

    patch_lang.skips_patched = True
    interpreter._patch_lang = patch_lang
    return True


_FIXES = {"index": _fix_index, "masks": _fix_masks, "repatching": _fix_repatching}


def install() -> set[str]:
    """Apply each fix this interpreter needs (see the module docstring) once; returns the names of
    the fixes in place ("index", "masks", "repatching"): none of the faults' on a Triton whose
    interpreter has neither, none at all on one whose internals this does not recognise."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return set()
    for name, fix in _FIXES.items():
        if name not in _installed and fix(interpreter):
            _installed.add(name)
    return set(_installed)
