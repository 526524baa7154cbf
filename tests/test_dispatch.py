"""`kernels.dispatch.precompile`: parallel compilation ahead of an autotuner, best effort."""

from __future__ import annotations

import threading

import pytest

from quamba_fx.kernels import dispatch


class FakeJit:
    """Stands in for a `triton.jit` function: records what `warmup` was asked to compile."""

    __name__ = "fake_kernel"

    def __init__(self, fail_on: int | None = None):
        self.calls: list[dict] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def warmup(self, *args, grid, **kwargs):
        with self.lock:
            self.calls.append({"args": args, "grid": grid, **kwargs})
            self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and kwargs.get("BLOCK") == self.fail_on:
            raise RuntimeError("ptxas fell over")


@pytest.fixture
def compiled_mode(monkeypatch):
    pytest.importorskip("triton.runtime._async_compile")
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    monkeypatch.setattr(dispatch, "PARALLEL_COMPILE", True)


def test_precompile_warms_every_variant_with_the_call_arguments(compiled_mode):
    fn = FakeJit()
    variants = [{"BLOCK": b, "num_warps": 4, "FLAG": True} for b in (16, 32, 64)]
    dispatch.precompile(fn, ("x", 7), iter(variants))  # a generator is accepted
    assert sorted(c["BLOCK"] for c in fn.calls) == [16, 32, 64]
    assert all(c["args"] == ("x", 7) and c["FLAG"] is True and c["num_warps"] == 4 for c in fn.calls)


def test_precompile_failure_warns_and_leaves_compiling_to_the_autotuner(compiled_mode):
    fn = FakeJit(fail_on=32)
    with pytest.warns(RuntimeWarning, match="parallel precompile of fake_kernel failed"):
        dispatch.precompile(fn, (), [{"BLOCK": 16}, {"BLOCK": 32}])


@pytest.mark.parametrize("interpret, enabled, n_variants", [(True, True, 3), (False, False, 3), (False, True, 1)])
def test_precompile_is_skipped_when_it_cannot_help(monkeypatch, interpret, enabled, n_variants):
    # Interpreted kernels are not compiled, the user may turn it off, and one config has nothing
    # to overlap with.
    monkeypatch.setattr(dispatch, "INTERPRET", interpret)
    monkeypatch.setattr(dispatch, "PARALLEL_COMPILE", enabled)
    fn = FakeJit()
    dispatch.precompile(fn, (), [{"BLOCK": b} for b in range(n_variants)])
    assert fn.calls == []
