"""`kernels.dispatch`: parallel compilation ahead of an autotuner (best effort), and the caches of
the launch configs each kernel chose per problem."""

from __future__ import annotations

import operator
import threading

import pytest
import torch

from quamba_fx import kernels
from quamba_fx import ops as reference_ops  # noqa: F401  (registers torch.ops.quamba.selective_scan)
from quamba_fx.kernels import conv1d, dispatch, gemm, gemm_skinny, gemm_tma, gemv, scan
from quamba_fx.kernels import norm  # noqa: F401  (registers torch.ops.quamba.add_rmsnorm_quantize)
from quamba_fx.kernels.gemm import int8_gemm

from .kernel_support import DEVICE, needs_kernel


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


# ---------------------------------------------------------------------------------------------
# Tuned launch configs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """An empty registry of caches, so that a test's caches do not outlive it."""
    monkeypatch.setattr(dispatch, "_TUNED_CACHES", {})


def test_chosen_config_chooses_once_per_key():
    cache: dict = {}
    chosen = []

    def choose_for(key):
        def choose():
            chosen.append(key)
            return {"BLOCK": 16 * key}
        return choose

    for key in (1, 2, 1, 1, 2, 3):
        assert dispatch.chosen_config(cache, key, choose_for(key)) == {"BLOCK": 16 * key}
    assert chosen == [1, 2, 3]
    assert cache == {1: {"BLOCK": 16}, 2: {"BLOCK": 32}, 3: {"BLOCK": 48}}


def test_chosen_config_passes_its_arguments_to_choose_on_first_sight_only():
    cache: dict = {}
    calls = []

    def choose(n, k):
        calls.append((n, k))
        return {"BLOCK_N": n, "BLOCK_K": k}

    assert dispatch.chosen_config(cache, "key", choose, 64, 128) == {"BLOCK_N": 64, "BLOCK_K": 128}
    assert dispatch.chosen_config(cache, "key", choose, 1, 1) == {"BLOCK_N": 64, "BLOCK_K": 128}
    assert calls == [(64, 128)]


def test_chosen_config_reads_a_dict_like_that_answers_get_alone():
    # The GEMM tests pin a config with a dict whose `get` answers every key.
    class Pinned(dict):
        def get(self, key, default=None):
            return "pinned"

    assert dispatch.chosen_config(Pinned(), "any", lambda: pytest.fail("chose despite a pinned config")) == "pinned"


def test_launch_tuned_autotunes_first_then_launches_the_recorded_config():
    cache: dict = {}
    log = []

    def autotune(*args):
        log.append(("autotune", args))
        return "best"

    def launch(config, *args):
        log.append((config, args))

    for _ in range(3):
        dispatch.launch_tuned(cache, "key", autotune, launch, 7, "x")
    assert log == [("autotune", (7, "x")), ("best", (7, "x")), ("best", (7, "x"))]
    assert cache == {"key": "best"}


def test_launch_tuned_records_nothing_when_the_autotuner_chose_nothing():
    cache: dict = {}
    calls = []
    for _ in range(2):
        dispatch.launch_tuned(cache, "key", lambda: calls.append(1), lambda config: pytest.fail("no config"))
    assert calls == [1, 1] and cache == {}


def test_a_name_registered_twice_returns_the_same_cache(registry):
    # A module executed again (reload, autoreload) keeps the cache that clear_tuned_configs reaches.
    first = dispatch.tuned_configs("kernel_a")
    first["k"] = 1
    assert dispatch.tuned_configs("kernel_a") is first
    assert dispatch.tuned_configs("kernel_b") is not first
    assert dispatch.tuned_config_counts() == {"kernel_a": 1, "kernel_b": 0}


def test_clear_tuned_configs_empties_every_registered_cache(registry):
    a, b = dispatch.tuned_configs("kernel_a"), dispatch.tuned_configs("kernel_b")
    a.update({1: "x", 2: "y"})
    b[3] = "z"
    kernels.clear_tuned_configs()
    assert a == {} and b == {}
    assert dispatch.tuned_config_counts() == {"kernel_a": 0, "kernel_b": 0}


def test_every_kernel_cache_is_registered():
    caches = dispatch._TUNED_CACHES
    assert caches["gemm"] is gemm._TUNED
    assert caches["gemm_tma"] is gemm_tma._TUNED
    assert caches["gemv"] is gemv._TUNED
    assert caches["gemm_skinny"] is gemm_skinny._TUNED
    assert caches["scan"] is scan._TUNED
    assert caches["conv1d_prefill"] is conv1d._PREFILL_TUNED


@needs_kernel
def test_clear_tuned_configs_makes_the_kernels_choose_again_with_the_same_result():
    """A GEMM on the pointer kernel (70 rows) and a GEMV (one row) record their configs; cleared,
    the same calls choose again and give the same outputs."""
    gen = torch.Generator().manual_seed(3)

    def int8(*shape):
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen).to(DEVICE)

    def scale(v, *shape):
        return torch.full(shape, v, dtype=torch.float32, device=DEVICE)

    w = int8(45, 64)  # K % 4 == 0: the one-row call can take the GEMV
    calls = [(int8(rows, 64), scale(0.02), w, scale(0.01, 45), None, scale(0.3, 45)) for rows in (70, 1)]

    def run():
        return [int8_gemm(*args) for args in calls]

    first = run()
    assert len(gemm._TUNED) > 0 and len(gemv._TUNED) > 0
    dispatch.clear_tuned_configs()
    assert all(n == 0 for n in dispatch.tuned_config_counts().values())
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(gemm._TUNED) > 0 and len(gemv._TUNED) > 0


def test_op_function_is_the_function_behind_a_kernel_op_and_nothing_else():
    linear = dispatch.op_function(torch.ops.quamba.w8a8_linear.default)
    assert callable(linear) and linear.__name__ == "w8a8_linear"
    # Named as its op, though norm.py binds the op as `add_rmsnorm_quantize_op` (beside the kernel's own).
    assert dispatch.op_function(torch.ops.quamba.add_rmsnorm_quantize.default).__name__ == "add_rmsnorm_quantize"
    # The function computes what the op computes.
    x = torch.randint(-9, 9, (3, 32), dtype=torch.int8)
    w = torch.randint(-9, 9, (16, 32), dtype=torch.int8)
    args = (x, torch.tensor(0.02), w, torch.rand(16) * 1e-2, None, torch.tensor(0.1), None)
    assert torch.equal(linear(*args), torch.ops.quamba.w8a8_linear(*args))
    # Not kernel ops: aten ops, the reference scan (it has a CUDA kernel of its own), plain functions.
    assert dispatch.op_function(torch.ops.aten.add.Tensor) is None
    assert dispatch.op_function(torch.ops.quamba.selective_scan.default) is None
    assert dispatch.op_function(operator.add) is None
    assert dispatch.op_function(gemm.w8a8_linear_op) is None  # the CustomOpDef, not an OpOverload
