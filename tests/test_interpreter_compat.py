"""The Triton interpreter shim (quamba_fx.kernels.interpreter_compat): loops with run-time bounds
must run under TRITON_INTERPRET=1 on every Triton we accept, whatever NumPy pip picked."""

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
    monkeypatch.setattr(interpreter_compat, "_installed", False)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _fake_patcher(_raise_like_numpy_2_4))
    assert interpreter_compat.install() is True

    class Tensor:
        pass

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Tensor, scope)
    assert [0, 1, 2, 3, 4, 5, 6][_scalar(Tensor)] == 5  # __index__ at work
    scope.restore()
    assert not hasattr(Tensor, "__index__")  # both patches undone after the kernel call


def test_install_leaves_a_working_interpreter_alone(monkeypatch):
    monkeypatch.setattr(interpreter_compat, "_installed", False)
    working = _fake_patcher(lambda self: int(self.handle.data.item()))
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", working)
    assert interpreter_compat.install() is False
    assert interpreter._patch_lang_tensor is working


def test_autotuners_time_nothing_under_the_interpreter():
    """Triton 3.6's autotuner times even a single pruned config, through a GPU driver that a CPU
    machine lacks; under the interpreter our autotuners get a do_bench that runs nothing."""
    if not INTERPRET:
        assert dispatch.AUTOTUNE_DO_BENCH is None  # Triton's own timing on the GPU
        return
    calls = []
    assert dispatch.AUTOTUNE_DO_BENCH(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []
