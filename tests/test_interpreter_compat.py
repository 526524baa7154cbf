"""The Triton interpreter shim (quamba_fx.kernels.interpreter_compat): loops with run-time bounds and
masks built from program ids must run under TRITON_INTERPRET=1 on every Triton we accept, whatever
NumPy pip picked."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from quamba_fx.kernels import dispatch, interpreter_compat
from quamba_fx.kernels.dispatch import INTERPRET


@triton.jit
def _strided_sum_kernel(x_ptr, out_ptr, N, STEP: tl.constexpr):
    # A run-time loop bound, as in the GEMM's K loop and the scan's L loop.
    acc = tl.zeros([STEP], dtype=tl.float32)
    for start in range(0, N, STEP):
        offs = start + tl.arange(0, STEP)
        acc += tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@pytest.mark.skipif(not INTERPRET, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")
def test_run_time_loop_bound_runs_under_the_interpreter():
    x = torch.arange(37, dtype=torch.float32)
    out = torch.empty(1)
    _strided_sum_kernel[(1,)](x, out, x.numel(), STEP=8)
    assert out.item() == float(x.sum())


def _fake_patcher(index):
    def patch_lang_tensor(tensor, scope):
        scope.set_attr(tensor, "__index__", index)

    return patch_lang_tensor


def _scalar(cls):
    obj = cls()
    obj.handle = SimpleNamespace(data=np.array([5], dtype=np.int32))
    return obj


def _raise_like_numpy_2_4(self):
    raise TypeError("only 0-dimensional arrays can be converted to Python scalars")


def test_install_fixes_an_index_that_fails(monkeypatch):
    monkeypatch.setattr(interpreter_compat, "_installed", set())
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _fake_patcher(_raise_like_numpy_2_4))
    assert "index" in interpreter_compat.install()

    class Tensor:
        pass

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Tensor, scope)
    assert [0, 1, 2, 3, 4, 5, 6][_scalar(Tensor)] == 5  # __index__ at work
    scope.restore()
    assert not hasattr(Tensor, "__index__")  # both patches undone after the kernel call


def test_install_leaves_a_working_interpreter_alone(monkeypatch):
    monkeypatch.setattr(interpreter_compat, "_installed", set())
    working = _fake_patcher(lambda self: int(self.handle.data.item()))
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", working)
    assert "index" not in interpreter_compat.install()
    assert interpreter._patch_lang_tensor is working


@triton.jit
def _chunk_masked_kernel(x_ptr, out_ptr, N, CHUNKS, BLOCK: tl.constexpr):
    # The scan's pattern: a block mask and'ed with a comparison of a program-id scalar.
    chunk = tl.program_id(0) % CHUNKS
    offs = tl.arange(0, BLOCK)
    mask = (offs[:, None] < N) & (offs[None, :] < N)
    x = tl.load(x_ptr + offs[:, None] * N + offs[None, :], mask=mask & (chunk > 0), other=0.0)
    tl.store(out_ptr + tl.program_id(0) * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :], x,
             mask=mask & (chunk >= 0))


@pytest.mark.skipif(not INTERPRET, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")
def test_a_mask_and_ed_with_a_program_id_comparison_loads_and_stores():
    n, block = 3, 4
    x = torch.arange(1, n * n + 1, dtype=torch.float32)
    out = torch.full((2, block, block), -1.0)
    _chunk_masked_kernel[(2,)](x, out, n, 2, BLOCK=block)
    assert torch.all(out[0, :n, :n] == 0)  # chunk 0: nothing loaded
    assert torch.equal(out[1, :n, :n], x.view(n, n))
    assert torch.all(out[:, n:, :] == -1) and torch.all(out[:, :, n:] == -1)  # masked stores


class _StrictNative:
    """A native interpreter module as Triton 3.9's: masks must be boolean."""

    MEM_SEMANTIC = "kept"

    def __init__(self):
        self.masks = []

    def _check(self, mask):
        if mask.dtype != np.bool_:
            raise ValueError("mask has unsupported dtype")
        self.masks.append(mask)

    def load(self, pointers, mask, other, dtype):
        self._check(mask)
        return other

    def store(self, pointers, values, mask):
        self._check(mask)

    def atomic_rmw(self, op, pointers, values, mask, sem):
        self._check(mask)
        return values


def test_install_makes_integer_masks_boolean_for_a_native_that_rejects_them(monkeypatch):
    native = _StrictNative()
    monkeypatch.setattr(interpreter_compat, "_installed", set())
    monkeypatch.setattr(interpreter, "_interpreter", native)
    assert "masks" in interpreter_compat.install()
    wrapped = interpreter._interpreter
    assert isinstance(wrapped, interpreter_compat.BoolMasks) and wrapped.MEM_SEMANTIC == "kept"
    mask = np.array([1, 0, 1], dtype=np.int32)
    wrapped.load(None, mask, np.zeros(3), None)
    wrapped.store(None, np.zeros(3), mask)
    wrapped.atomic_rmw(None, None, np.zeros(3), mask, None)
    assert len(native.masks) == 3
    assert all(m.dtype == np.bool_ and m.tolist() == [True, False, True] for m in native.masks)


def test_install_leaves_a_native_that_takes_integer_masks_alone(monkeypatch):
    class Lenient(_StrictNative):
        def _check(self, mask):
            self.masks.append(mask)

    native = Lenient()
    monkeypatch.setattr(interpreter_compat, "_installed", set())
    monkeypatch.setattr(interpreter, "_interpreter", native)
    assert "masks" not in interpreter_compat.install()
    assert interpreter._interpreter is native


def test_autotuners_time_nothing_under_the_interpreter():
    """Triton 3.6's autotuner times even a single pruned config, through a GPU driver that a CPU
    machine lacks; under the interpreter our autotuners get a do_bench that runs nothing."""
    if not INTERPRET:
        assert dispatch.AUTOTUNE_DO_BENCH is None  # Triton's own timing on the GPU
        return
    calls = []
    assert dispatch.AUTOTUNE_DO_BENCH(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []


@triton.jit
def _times_two(x):
    return x * 2.0


@triton.jit
def _helper_loop_kernel(x_ptr, out_ptr, CALLS: tl.constexpr):
    # A device function called several times per program, as the scan calls its step helpers.
    x = tl.load(x_ptr + tl.arange(0, 4))
    for _ in tl.static_range(CALLS):
        x = _times_two(x)
    tl.store(out_ptr + tl.arange(0, 4), x)


def _patch_sweeps(monkeypatch) -> list:
    """Counts the interpreter's patching sweeps (`_patch_builtin` calls) from now on."""
    sweeps = []
    original = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: sweeps.append(1) or original(*a))
    return sweeps


@pytest.mark.skipif(not INTERPRET, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")
def test_device_function_calls_do_not_patch_the_language_again(monkeypatch):
    assert "repatching" in interpreter_compat.install()
    x = torch.arange(4, dtype=torch.float32)
    counts = {}
    for calls in (1, 6):
        sweeps = _patch_sweeps(monkeypatch)
        out = torch.empty(4)
        _helper_loop_kernel[(2,)](x, out, CALLS=calls)
        assert torch.equal(out, x * 2.0**calls)
        counts[calls] = len(sweeps)
    # Each launch sweeps (the second too: the first restored the language), but no call does.
    assert counts[1] == counts[6] > 0
    assert tl.core.is_builtin(tl.program_id) and tl.core.is_builtin(tl.math.exp)


def test_the_repatching_fix_wraps_once(monkeypatch):
    monkeypatch.setattr(interpreter_compat, "_installed", set())
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang)  # put back afterwards
    first = interpreter_compat._fix_repatching(interpreter) or interpreter._patch_lang.skips_patched
    wrapped = interpreter._patch_lang
    assert first and not interpreter_compat._fix_repatching(interpreter)
    assert interpreter._patch_lang is wrapped
