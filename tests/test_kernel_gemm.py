"""Tests for the W8A8 GEMM kernel (quamba_fx.kernels.gemm) against torch.ops.quamba.int8_linear.

Run on CPU with the Triton interpreter, where kernel and reference must agree bit for bit:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest tests/test_kernel_gemm.py -q

Without the interpreter, kernel tests run on CUDA when present (int8 outputs may differ by one
step, floats by rounding) and are skipped otherwise; reference, validation and config tests always
run.
"""

from __future__ import annotations

import dataclasses

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import gemm, gemm_skinny, gemv, split_k
from quamba_fx.kernels.conv1d import causal_conv1d_update_silu_int8
from quamba_fx.kernels.gemm import ConvStep, int8_gemm, int8_gemm_conv_step, int8_gemm_reference
from quamba_fx.quant.qops import MAX_INT8_LINEAR_K

from .kernel_support import DEVICE, EXACT, needs_kernel, reference_calls

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def assert_match(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-exact under the interpreter; on CUDA int8 within one step, floats within rounding."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.is_contiguous()
    got, want = got.cpu(), want.cpu()
    if torch.equal(got, want):
        return
    if got.dtype == torch.int8:
        diff = (got.int() - want.int()).abs()
        msg = f"{int((diff != 0).sum())} of {diff.numel()} int8 values differ, max |diff| {int(diff.max())}"
        assert not EXACT, msg
        assert int(diff.max()) <= 1, msg
    else:
        assert not EXACT, f"{int((got != want).sum())} of {got.numel()} {got.dtype} values differ"
        scale = want.float().abs().max().item() or 1.0
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5 * scale)


def scale(v: float, device: str, shape=()) -> torch.Tensor:
    return torch.full(shape, v, dtype=torch.float32, device=device)


def int8_values(gen: torch.Generator, shape, mode: str) -> torch.Tensor:
    if mode == "uniform":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    # The int8 extremes (largest accumulators, saturated outputs) and small values.
    pool = torch.tensor([-128, -127, -1, 0, 1, 126, 127], dtype=torch.int8)
    return pool[torch.randint(0, pool.numel(), shape, generator=gen)]


def make_x(gen: torch.Generator, lead: tuple, K: int, layout: str, mode: str, device: str) -> torch.Tensor:
    """int8 `[*lead, K]` in a memory layout the wrapper must handle."""
    if layout == "contiguous":
        return int8_values(gen, (*lead, K), mode).to(device)
    if layout == "slice":  # x[..., :K] of wider rows (row stride K + pad): read in place
        pad = int(torch.randint(1, 20, (), generator=gen))
        return int8_values(gen, (*lead, K + pad), mode).to(device)[..., :K]
    # "permuted": leading dims that do not merge into one row stride (the wrapper copies)
    wide = int8_values(gen, (*reversed(lead), K), mode).to(device)
    return wide.permute(*reversed(range(len(lead))), len(lead))


@st.composite
def cases(draw, max_rows: int = 70, k_multiple: int = 1):
    # The interpreter runs 16 x 32 x 32 tiles with GROUP_M = 4: hit the tile edges, K tails and
    # K < one tile, and the decode shape M = 1. `max_rows` bounds M (the product of `lead`); K is
    # rounded down to a multiple of `k_multiple` (at least one).
    three_d = draw(st.booleans())
    if three_d:
        first = draw(st.integers(1, min(3, max_rows)))
        lead = (first, draw(st.integers(1, min(23, max_rows // first))))
    else:
        rows = [r for r in [1, 15, 16, 17, 33, 64, 65, 70] if r <= max_rows]
        lead = (draw(st.one_of(st.integers(1, max_rows), st.sampled_from(rows))),)
    K = draw(st.one_of(st.integers(1, 200), st.sampled_from([1, 31, 32, 33, 48, 64, 96, 160, 200])))
    K = max(k_multiple, K - K % k_multiple)
    N = draw(st.one_of(st.integers(1, 150), st.sampled_from([1, 16, 31, 32, 33, 80, 150])))
    layouts = ["contiguous", "slice"] + (["permuted"] if len(lead) > 1 else [])
    return dict(
        lead=lead, K=K, N=N,
        layout=draw(st.sampled_from(layouts)),
        values=draw(st.sampled_from(["uniform", "extreme"])),
        w_per_channel=draw(st.booleans()),
        # "dyadic": power-of-two scales, so y / out_scale = acc * 2**e exactly and odd
        # accumulators land exactly on .5 ties (e = -1 makes half of them ties); e near 0
        # saturates almost everything.
        scales=draw(st.sampled_from(["dyadic", "random"])),
        exp=draw(st.integers(-14, 0)),
        bias=draw(st.sampled_from([None, "random", "dyadic"])),
        out=draw(st.sampled_from(["int8", "int8_per_channel", "fp32", "fp16", "bf16"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case: dict, device: str) -> dict:
    gen = torch.Generator().manual_seed(case["seed"])
    K, N = case["K"], case["N"]
    x = make_x(gen, case["lead"], K, case["layout"], case["values"], device)
    w = int8_values(gen, (N, K), case["values"]).to(device)
    n_ws = N if case["w_per_channel"] else 1
    if case["scales"] == "dyadic":
        # x_scale * w_scale = 2**(exp + j - 8) with j in 0..2, out_scale 2**-8 (per-channel ones
        # vary by powers of two as well): every quotient is an exact binary fraction.
        x_scale = scale(2.0 ** case["exp"], device)
        w_scale = (2.0 ** (-8 + torch.randint(0, 3, (n_ws,), generator=gen).float())).to(device)
        out_scale = (2.0 ** (-8 + torch.randint(-1, 2, (N,), generator=gen).float())).to(device)
    else:
        x_scale = scale(float(torch.empty(()).uniform_(0.005, 0.05, generator=gen)), device)
        w_scale = (torch.rand(n_ws, generator=gen) * 0.01 + 1e-4).to(device)
        out_scale = (torch.rand(N, generator=gen) * 0.5 + 0.01).to(device)
    if n_ws == 1 and case["seed"] % 2:
        w_scale = w_scale.reshape(())  # 0-dim and [1] both mean per tensor
    bias = None
    if case["bias"] == "dyadic":  # multiples of 2**-9: with dyadic scales, more exact ties
        bias = (torch.randint(-300, 300, (N,), generator=gen).float() * 2.0 ** -9).to(device)
    elif case["bias"] == "random":
        bias = (torch.randn(N, generator=gen) * 4).to(device)
    kwargs = dict(x_q=x, x_scale=x_scale, w_q=w, w_scale=w_scale, bias=bias)
    out = case["out"]
    if out == "int8":
        kwargs["out_scale"] = out_scale[:1].clone()
    elif out == "int8_per_channel":
        kwargs["out_scale"] = out_scale
    else:
        kwargs["out_dtype"] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[out]
    return kwargs


# ---------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------


@needs_kernel
@settings(max_examples=25, **SETTINGS)
@given(case=cases())
def test_matches_int8_linear(case):
    check_matches_int8_linear(case)


@pytest.mark.slow
@needs_kernel
@settings(max_examples=80, **SETTINGS)
@given(case=cases())
def test_matches_int8_linear_on_more_cases(case):
    check_matches_int8_linear(case)


def check_matches_int8_linear(case: dict) -> None:
    """The kernel against int8_linear on one drawn case, bit for bit under the interpreter."""
    kwargs = build(case, DEVICE)
    got = int8_gemm(**kwargs)
    want = int8_gemm_reference(**kwargs)
    assert got.shape == (*case["lead"], case["N"])
    assert_match(got, want)
    if case["out"] in ("fp16", "bf16"):
        # The contract: the fp32 result, rounded once to the narrow type.
        f32 = int8_gemm_reference(**{**kwargs, "out_dtype": torch.float32})
        assert_match(got, f32.to(got.dtype))


class _PinnedConfig(dict):
    """A `_TUNED` table that answers every problem with one config (the launch fast path)."""

    def __init__(self, meta: dict):
        super().__init__()
        self.meta = meta

    def get(self, key, default=None):
        return self.meta


@needs_kernel
@pytest.mark.parametrize("M, split", [(37, 1), (37, 3), (32, 2)])
def test_row_tiles_in_pairs_sum_every_k_range_once(M, split, monkeypatch):
    """Row tiles launched in pairs (GROUP_M 2, the 128-row family's half tiles), an odd count of
    them too, with and without split K: equal to the reference."""
    monkeypatch.setattr(gemm, "_TUNED", _PinnedConfig(gemm._cfg(16, 32, 32, 2, 2, 1, split).all_kwargs()))
    monkeypatch.setattr(gemv, "GEMV_MAX_M", 0)
    monkeypatch.setattr(gemm_skinny, "MAX_M", 0)
    gen = torch.Generator().manual_seed(M + split)
    x = int8_values(gen, (M, 161), "extreme").to(DEVICE)
    w = int8_values(gen, (70, 161), "uniform").to(DEVICE)
    xs, ws = scale(0.02, DEVICE), (torch.rand(70, generator=gen) * 1e-3).to(DEVICE)
    assert_match(int8_gemm(x, xs, w, ws, None, out_scale=scale(0.3, DEVICE)),
                 int8_gemm_reference(x, xs, w, ws, None, out_scale=scale(0.3, DEVICE)))


@needs_kernel
@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("M,K,N", [(1, 200, 70), (37, 161, 45), (16, 96, 32), (5, 40, 33)])
def test_split_k_sums_every_k_range_once(split, M, K, N, monkeypatch):
    """Split-K with ragged splits (K tiles not a multiple of SPLIT_K, splits with no K left,
    K < one tile), several M and N tiles and wrapped edges: equal to the reference, and every
    tile counter back at zero after each call (the next launch relies on it)."""
    monkeypatch.setattr(gemm, "_TUNED", _PinnedConfig(gemm._cfg(16, 32, 32, 1, 2, 1, split).all_kwargs()))
    monkeypatch.setattr(gemv, "GEMV_MAX_M", 0)  # the pointer kernel at every M
    monkeypatch.setattr(gemm_skinny, "MAX_M", 0)
    monkeypatch.setattr(split_k, "_SCRATCH", {})
    gen = torch.Generator().manual_seed(M * K + N + split)
    x = int8_values(gen, (M, K), "extreme").to(DEVICE)
    w = int8_values(gen, (N, K), "uniform").to(DEVICE)
    xs, ws = scale(0.02, DEVICE), (torch.rand(N, generator=gen) * 1e-3).to(DEVICE)
    for kw in (dict(out_scale=scale(0.3, DEVICE)), dict(out_dtype=torch.float32)):
        for _ in range(2):  # the second call reuses the scratch and its counters
            got = int8_gemm(x, xs, w, ws, None, **kw)
            assert_match(got, int8_gemm_reference(x, xs, w, ws, None, **kw))
            (partials, counters), = split_k._SCRATCH.values()
            assert int(counters.abs().sum()) == 0


@needs_kernel
@settings(max_examples=40, **SETTINGS)
@given(case=cases(max_rows=gemv.GEMV_MAX_M, k_multiple=4))
def test_gemv_matches_int8_linear(case):
    """Up to GEMV_MAX_M rows and with K a multiple of four the GEMV runs (under the interpreter it
    is always chosen), bit for bit the contract of int8_linear, K split or not: its packed-word
    dot product sign-extends every byte (the "extreme" values hold -128 and 127)."""
    launches = []
    real = gemv.launch
    kwargs = build(case, DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemv, "launch", lambda *a, **k: (launches.append(1), real(*a, **k)))
        got = int8_gemm(**kwargs)
    assert_match(got, int8_gemm_reference(**kwargs))
    assert launches or not EXACT


@needs_kernel
@pytest.mark.parametrize("split", [3, 5])
@pytest.mark.parametrize("K,N", [(200, 70), (164, 45), (96, 16), (40, 33)])
def test_gemv_split_k_sums_every_k_range_once(split, K, N, monkeypatch):
    # Steps of 8 words (32 bytes): 2-7 steps, ragged splits and splits with nothing left.
    monkeypatch.setattr(gemv, "_TUNED", _PinnedConfig(gemv._cfg(16, 8, split, 1, 1).all_kwargs()))
    monkeypatch.setattr(split_k, "_SCRATCH", {})
    gen = torch.Generator().manual_seed(K + N + split)
    x = int8_values(gen, (1, K), "extreme").to(DEVICE)
    w = int8_values(gen, (N, K), "uniform").to(DEVICE)
    xs, ws = scale(0.02, DEVICE), (torch.rand(N, generator=gen) * 1e-3).to(DEVICE)
    for kw in (dict(out_scale=scale(0.3, DEVICE)), dict(out_dtype=torch.bfloat16)):
        for _ in range(2):
            assert_match(int8_gemm(x, xs, w, ws, None, **kw), int8_gemm_reference(x, xs, w, ws, None, **kw))
            # On CUDA the first call also times the tensor-core kernel, on a stream of its own
            # (a second scratch): every counter of every scratch must be back at zero.
            assert all(int(counters.abs().sum()) == 0 for _, counters in split_k._SCRATCH.values())


@needs_kernel
@settings(max_examples=30, **SETTINGS)
@given(case=cases(max_rows=gemm_skinny.MAX_M))
def test_skinny_kernel_matches_int8_linear(case):
    """From MIN_M to MAX_M rows gemm_skinny runs (weight rows on the MMA's M side), bit for bit
    the contract of int8_linear, K split or not, rows padded to 16 and wrapped."""
    rows = math.prod(case["lead"])
    launches = []
    real = gemm_skinny.launch
    kwargs = build(case, DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemm_skinny, "launch", lambda *a, **k: (launches.append(1), real(*a, **k)))
        got = int8_gemm(**kwargs)
    assert_match(got, int8_gemm_reference(**kwargs))
    chosen = gemm_skinny.MIN_M <= rows <= gemm_skinny.MAX_M and gemm_skinny.use_for(rows, case["N"], case["K"])
    assert bool(launches) == chosen


@needs_kernel
@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("split", [1, 3, 5])
@pytest.mark.parametrize("M,K,N", [(2, 200, 70), (33, 161, 45), (64, 96, 16), (5, 40, 33)])
def test_skinny_kernel_both_loops_and_split_k(early, split, M, K, N, monkeypatch):
    """Both loop forms (the weight fetched a step ahead, or Triton's pipeliner), ragged and empty
    K splits: equal to the reference, and every split-K counter back at zero after each call."""
    monkeypatch.setattr(gemm_skinny, "_TUNED", _PinnedConfig(gemm_skinny._cfg(32, 32, split, early, 1 if early else 2,
                                                                              1 if EXACT else 4).all_kwargs()))
    monkeypatch.setattr(split_k, "_SCRATCH", {})
    gen = torch.Generator().manual_seed(M * K + N + split)
    x = int8_values(gen, (M, K), "extreme").to(DEVICE)
    w = int8_values(gen, (N, K), "uniform").to(DEVICE)
    xs, ws = scale(0.02, DEVICE), (torch.rand(N, generator=gen) * 1e-3).to(DEVICE)
    for kw in (dict(out_scale=scale(0.3, DEVICE)), dict(out_dtype=torch.float16)):
        for _ in range(2):
            assert_match(int8_gemm(x, xs, w, ws, None, **kw), int8_gemm_reference(x, xs, w, ws, None, **kw))
            assert all(int(counters.abs().sum()) == 0 for _, counters in split_k._SCRATCH.values())


@pytest.mark.parametrize("M", [2, 16, 64])
@pytest.mark.parametrize("K,N", [(2560, 10240), (5120, 192), (160, 5120), (5120, 2560), (1536, 80), (48, 1536),
                                 (40, 7)])
def test_skinny_config_rule(M, K, N):
    """The rule's config is one of the benchmarked candidates, its tiles fit the problem, and K is
    split only while the programs do not yet cover the SMs (half of them above 16 rows)."""
    rule = gemm_skinny.gpu_config(M, N, K, sms=132)
    candidates = gemm_skinny.candidates(M, N, K, sms=132)
    assert any(c.all_kwargs() == rule.all_kwargs() for c in candidates)
    for c in candidates:
        bn, bk, split = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        assert 16 <= bn <= max(16, 1 << (N - 1).bit_length()) and 32 <= bk <= max(32, 1 << (K - 1).bit_length())
        assert split <= max(1, -(-K // bk)) and c.num_warps % 4 == 0
        assert c.kwargs["EARLY"] or c.num_stages * (bn + gemm_skinny.block_m(M)) * bk <= gemm_skinny._SWEEP_SMEM
    assert {c.num_stages for c in candidates if not c.kwargs["EARLY"]} == {3, 4, 6}
    bn, bk, split = (rule.kwargs[key] for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K"))
    assert split == 1 or (K > 512 and -(-N // bn) * split // 2 < (132 if M <= 16 else 66)
                          and -(-K // bk) // split >= 5)
    assert rule.kwargs["EARLY"] == (K <= bk)
    assert rule.kwargs["EARLY"] or rule.num_stages == gemm_skinny.STAGES
    assert gemm_skinny.block_m(M) == max(16, M)


@pytest.mark.parametrize("M,K,N,want", [
    (16, 2560, 10240, (128, 1, False)),   # 2.8b in_proj: 160 tiles already cover the SMs
    (64, 2560, 10240, (128, 1, False)),
    (2, 5120, 2560, (128, 4, False)),     # out_proj: 40 tiles, split to cover the SMs
    (64, 5120, 2560, (128, 2, False)),    # ... half of them above 16 rows
    (16, 160, 5120, (128, 1, False)),     # dt_proj: two steps, pipelined, short K never split
    (16, 48, 1536, (64, 1, True)),        # 130m dt_proj: one step, fetched early
    (16, 5120, 192, (128, 8, False)),     # x_proj: 3 tiles, split while a split keeps 5 steps
])
def test_skinny_rule_on_the_swept_shapes(M, K, N, want):
    """The configs the run-14 sweep found fastest on the 2.8b projections (docs/benchmarks.md)."""
    rule = gemm_skinny.gpu_config(M, N, K, sms=132)
    assert (rule.kwargs["BLOCK_K"], rule.kwargs["SPLIT_K"], rule.kwargs["EARLY"]) == want
    assert rule.kwargs["BLOCK_N"] == 64 and rule.num_warps == 4


@pytest.mark.parametrize("M,K,N,chosen", [
    (16, 160, 5120, True), (64, 160, 5120, True),        # 2.8b dt_proj: short K, any rows
    (64, 2560, 10240, True), (2, 5120, 2560, True),     # in_proj, out_proj
    (16, 5120, 192, True), (64, 5120, 192, False),     # x_proj up to 16 rows
    (16, 768, 3072, False), (64, 1536, 80, False),     # 130m in_proj, x_proj (short of 2048)
])
def test_skinny_kernel_is_used_where_the_sweep_found_it_faster(M, K, N, chosen):
    assert gemm_skinny.use_for(M, N, K) is chosen


def _conv_step_case(M: int, K: int, D: int, W: int, has_bias: bool, seed: int, device: str | None = DEVICE):
    """in_proj-like GEMM inputs (N = 2D + 6: an x half, a z half, a ragged tail) and a conv step."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * D + 6
    x = int8_values(gen, (M, 1, K), "uniform").to(device)
    w = int8_values(gen, (n, K), "uniform").to(device)
    gemm_args = (x, scale(0.02, device), w, (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(device), None,
                 scale(0.3, device))
    conv = ConvStep(state=int8_values(gen, (M, D, W - 1), "uniform").to(device),
                    weight=torch.randn(D, W, generator=gen).to(device),
                    bias=torch.randn(D, generator=gen).to(device) if has_bias else None,
                    out_scale=scale(0.05, device))
    return gemm_args, conv


@needs_kernel
@pytest.mark.parametrize("M, K, D, W, has_bias, start", [
    (1, 64, 40, 4, True, 0),     # one K step, tiles straddling the x/z edge (D not a multiple of 16)
    (1, 200, 37, 3, False, 0),   # split K (the last program to arrive runs the epilogue)
    (1, 96, 16, 2, True, 0),
    (1, 64, 40, 4, True, 43),    # Mamba-2's layout: the conv's columns after others, tiles straddling both edges
    (1, 200, 37, 3, False, 11),
    (2, 64, 24, 4, True, 30),    # two rows: the GEMM, then the conv kernel
])
def test_gemm_with_a_conv_step_equals_the_gemm_then_the_conv_kernel(M, K, D, W, has_bias, start, monkeypatch):
    gemm_args, conv = _conv_step_case(M, K, D, W, has_bias, seed=K + D)
    conv = dataclasses.replace(conv, start=start)
    state = conv.state.clone()
    want = int8_gemm(*gemm_args)
    want_u = causal_conv1d_update_silu_int8(want.reshape(M, -1)[:, start:start + D], state, gemm_args[5],
                                            conv.weight, conv.bias, conv.out_scale)
    conv_kernel_calls = []
    real = gemm.causal_conv1d_update_silu_int8
    monkeypatch.setattr(gemm, "causal_conv1d_update_silu_int8",
                        lambda *a, **k: conv_kernel_calls.append(1) or real(*a, **k))
    out, u = int8_gemm_conv_step(*gemm_args, conv)
    assert torch.equal(out, want)
    # One row: the GEMV's epilogue ran the step (no conv kernel); more rows: the conv kernel.
    assert len(conv_kernel_calls) == (M > 1)
    if EXACT or M > 1:
        assert torch.equal(u, want_u) and torch.equal(conv.state, state)
    else:  # CUDA: the conv kernel's `acc + w * x` may contract into an FMA, the GEMV's does not
        assert (u.int() - want_u.int()).abs().max() <= 1 and torch.equal(conv.state, state)


def _gemv_fails_to_compile_with(monkeypatch, keyword: str, message: str) -> None:
    """gemv.launch raises `message`, as a failed compile would, whenever it is given `keyword`
    (its conv epilogue); off the interpreter, with no launch remembered."""
    real_launch = gemv.launch

    def launch(*args, **kwargs):
        if kwargs.get(keyword) is not None:
            raise RuntimeError(message)
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(gemv, "launch", launch)
    monkeypatch.setattr(gemm, "_INTERPRET", False)  # compile failures are tolerated off the interpreter
    monkeypatch.setattr(gemm, "_USES_ALTERNATIVE", {})


@pytest.mark.skipif(not EXACT, reason="runs the GEMV on CPU tensors: needs TRITON_INTERPRET=1")
def test_a_gemv_conv_step_that_fails_to_compile_falls_back_to_the_two_kernels(monkeypatch):
    """If the GEMV with the conv epilogue cannot be built on the device, a warning says so once and
    the GEMV then the conv kernel run, with the same results (and the state advanced once)."""
    _gemv_fails_to_compile_with(monkeypatch, "conv", "no such instruction on this device")
    gemm_args, conv = _conv_step_case(1, 64, 40, 4, True, seed=9, device="cpu")
    state = conv.state.clone()
    want = int8_gemm_reference(*gemm_args)
    want_u = causal_conv1d_update_silu_int8(want.reshape(1, -1)[:, :40], state, gemm_args[5], conv.weight,
                                            conv.bias, conv.out_scale)
    with pytest.warns(RuntimeWarning, match="GEMV with a conv epilogue failed on this device .*no such instruction"):
        out, u = int8_gemm_conv_step(*gemm_args, conv)
    assert torch.equal(out, want) and torch.equal(u, want_u) and torch.equal(conv.state, state)
    assert False in gemm._USES_ALTERNATIVE.values()
    with warnings.catch_warnings(record=True) as seen:  # no second try, no second warning
        warnings.simplefilter("always")
        int8_gemm_conv_step(*gemm_args, conv)
    assert not any("conv epilogue" in str(w.message) for w in seen)


def test_conv_step_on_the_reference_path_and_its_errors():
    gemm_args, conv = _conv_step_case(1, 16, 8, 4, True, seed=3, device="cpu")
    state = conv.state.clone()
    want = int8_gemm_reference(*gemm_args)
    want_u = causal_conv1d_update_silu_int8(want.reshape(1, -1)[:, :8], state, gemm_args[5], conv.weight,
                                            conv.bias, conv.out_scale)
    out, u = int8_gemm_conv_step(*gemm_args, conv)
    assert torch.equal(out, want) and torch.equal(u, want_u) and torch.equal(conv.state, state)
    with pytest.raises(ValueError, match="a conv step needs the GEMM's int8 output with one per-tensor out_scale"):
        int8_gemm_conv_step(*gemm_args[:5], scale(0.3, "cpu", (22,)), conv)
    with pytest.raises(ValueError, match=r"conv.state must be int8 \[M, D, W-1\] with start \+ D <= N = 22"):
        int8_gemm_conv_step(*gemm_args, ConvStep(torch.zeros(1, 30, 3, dtype=torch.int8), conv.weight, None,
                                                 conv.out_scale))
    with pytest.raises(ValueError, match="from column 15"):  # 8 channels from column 15 end past 22
        int8_gemm_conv_step(*gemm_args, dataclasses.replace(conv, start=15))
    with pytest.raises(ValueError, match="conv must be a ConvStep"):
        int8_gemm_conv_step(*gemm_args, "conv")


@pytest.mark.parametrize("K,N,want", [
    # The 2.8b projections, with the config the rule gives each (bn, bk words, split, warps).
    (2560, 10240, (16, 128, 1, 8)), (5120, 192, (16, 128, 8, 8)), (160, 5120, (16, 64, 1, 4)),
    (5120, 2560, (16, 128, 4, 8)), (4, 1, (16, 8, 1, 4)),
])
def test_gemv_config_rule(K, N, want):
    """16 columns a program, K steps of at most 128 words, and K splits (a power of two, each with
    at least one step) only while the programs do not yet fill the SMs four times over; 8 warps
    for full 128-word steps."""
    k_words = K // 4
    c = gemv.gpu_config(N, k_words, sms=132)
    bn, bk, split = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
    assert (bn, bk, split, c.num_warps) == want
    assert split == 1 or -(-N // bn) * split // 2 < 4 * 132
    assert split <= max(1, -(-k_words // bk))


@pytest.mark.parametrize("K,offset,supported", [(64, 0, True), (62, 0, False), (64, 2, False), (64, 4, True)])
def test_gemv_needs_whole_aligned_words(K, offset, supported):
    """The GEMV reads int32 words: K and the operands' addresses must be multiples of four bytes;
    otherwise int8_gemm runs the tensor-core kernel (still the reference's result)."""
    w = torch.zeros(8, K + offset, dtype=torch.int8)[:, offset:]
    x = torch.zeros(1, K + offset, dtype=torch.int8)[:, offset:]
    assert gemv.supported(x, w) is supported


@needs_kernel
def test_split_scratch_is_shared_and_grows(monkeypatch):
    """One scratch per device and stream, grown to the largest need and kept, counters zeroed."""
    monkeypatch.setattr(split_k, "_SCRATCH", {})
    dev = torch.device(DEVICE)
    small = split_k.scratch(dev, 64, 4)
    assert split_k.scratch(dev, 32, 2) is small
    big = split_k.scratch(dev, 128, 3)
    assert big[0].numel() == 128 and big[1].numel() == 4 and int(big[1].abs().sum()) == 0
    assert split_k.scratch(dev, 64, 4) is big


def test_split_scratch_need():
    metas = [dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=1), dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=4),
             dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=2)]
    # 40 x 70: 3 x 3 tiles of 16 x 32 (4 splits), 3 x 2 tiles of 16 x 64 (2 splits)
    assert split_k.scratch_need(40, 70, metas) == (9 * 4 * 16 * 32, 9)
    assert split_k.scratch_need(40, 70, metas[:1]) == (0, 0)


@needs_kernel
def test_kernel_path_is_taken(monkeypatch):
    """Guards the comparisons above: the wrapper must not fall back to the reference."""
    def boom(*args, **kwargs):
        raise AssertionError("wrapper fell back to the reference")

    monkeypatch.setattr(gemm, "int8_gemm_reference", boom)
    gen = torch.Generator().manual_seed(0)
    x = int8_values(gen, (3, 40), "uniform").to(DEVICE)
    w = int8_values(gen, (20, 40), "uniform").to(DEVICE)
    for kw in (dict(out_scale=scale(0.5, DEVICE)), dict(out_dtype=torch.float16), dict(out_dtype=torch.bfloat16), {}):
        int8_gemm(x, scale(0.02, DEVICE), w, scale(0.01, DEVICE, (20,)), None, **kw)


@needs_kernel
def test_fast_path_after_tuning(monkeypatch):
    """The second call of a problem launches the recorded config directly, with the same result."""
    gen = torch.Generator().manual_seed(7)
    # 70 rows: more than gemm_skinny's, the pointer kernel; K % 32 != 0: EVEN_K must be recomputed
    x = int8_values(gen, (70, 50), "uniform").to(DEVICE)
    w = int8_values(gen, (45, 50), "uniform").to(DEVICE)
    args = (x, scale(0.02, DEVICE), w, scale(0.01, DEVICE, (45,)), None, scale(0.3, DEVICE, (45,)))
    monkeypatch.setattr(gemm, "_TUNED", {})
    first = int8_gemm(*args)
    assert len(gemm._TUNED) == 1
    (key, meta), = gemm._TUNED.items()
    assert key[:3] == (45, 50, 128) and {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"} <= set(meta)

    class NoTuner:
        def __getitem__(self, grid):
            raise AssertionError("the autotuned entry was used again")

    monkeypatch.setattr(gemm, "_int8_gemm_kernel", NoTuner())
    assert torch.equal(int8_gemm(*args), first)
    assert_match(first, int8_gemm_reference(*args))


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    calls = reference_calls(monkeypatch, gemm, "int8_gemm_reference")
    gen = torch.Generator().manual_seed(0)
    x = int8_values(gen, (2, 8), "uniform")
    w = int8_values(gen, (4, 8), "uniform")
    out = int8_gemm(x, scale(0.1, "cpu"), w, scale(0.1, "cpu"), out_scale=scale(1.0, "cpu"))
    assert calls == [1] and out.dtype == torch.int8


@needs_kernel
def test_scales_changed_in_place_take_effect():
    gen = torch.Generator().manual_seed(1)
    M, K, N = 5, 70, 40
    x = int8_values(gen, (M, K), "uniform").to(DEVICE)
    w = int8_values(gen, (N, K), "uniform").to(DEVICE)
    xs, ws, os_ = scale(0.02, DEVICE), scale(0.003, DEVICE, (N,)), scale(2.0, DEVICE, (1,))
    bias = torch.zeros(N, device=DEVICE)
    first = int8_gemm(x, xs, w, ws, bias, os_)
    for t, v in ((xs, 0.03), (ws, 0.002), (os_, 1.5), (bias, 0.25)):
        t.fill_(v)
        second = int8_gemm(x, xs, w, ws, bias, os_)
        assert not torch.equal(first, second)
        assert_match(second, int8_gemm_reference(x, xs, w, ws, bias, os_))
        first = second


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_ties_round_half_to_even(use_kernel):
    """K = 1, unit weights and scales: y / out_scale = x / 2 lands exactly on .5 for odd x."""
    device = DEVICE if use_kernel else "cpu"
    fn = int8_gemm if use_kernel else int8_gemm_reference
    xs_int = torch.arange(-128, 128, dtype=torch.int8)
    x = xs_int.view(-1, 1).to(device)
    w = torch.ones(1, 1, dtype=torch.int8, device=device)
    out = fn(x, scale(1.0, device), w, scale(1.0, device), None, scale(2.0, device))
    expected = torch.tensor([round(v / 2) for v in xs_int.tolist()], dtype=torch.int8)  # Python: half-even
    assert torch.equal(out.cpu().view(-1), expected)
    # Sanity: the case really has ties, where half-away-from-zero would answer differently.
    assert expected.tolist() != [math.floor(v / 2 + 0.5) for v in xs_int.tolist()]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, in the interpreter
@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_saturation_and_overflowing_quotient(use_kernel):
    device = DEVICE if use_kernel else "cpu"
    fn = int8_gemm if use_kernel else int8_gemm_reference
    x = torch.tensor([[127, 127], [-128, -128], [1, 0], [-1, 0], [0, 0]], dtype=torch.int8, device=device)
    w = torch.tensor([[127, 127], [1, 0]], dtype=torch.int8, device=device)
    bias = torch.tensor([0.0, 0.25], device=device)
    # Column 0: y = +-32258 or +-127 -> far past +-127.5 (saturates); column 1: +-1 + 0.25.
    out = fn(x, scale(1.0, device), w, scale(1.0, device), bias, scale(0.5, device))
    assert out.cpu().tolist() == [[127, 127], [-128, -128], [127, 2], [-128, -2], [0, 0]]
    # A quotient past fp32's range (inf) still saturates.
    tiny = fn(x, scale(1.0, device), w, scale(1.0, device), None, scale(1e-38, device))
    assert tiny.cpu()[:, 0].tolist() == [127, -128, 127, -128, 0]


def _near_tie_outputs(out_scales) -> tuple:
    """fp32 outputs y within 4 ulps of each (k + 0.5) * out_scale, k = -128..126, per scale.

    Returns (y, the out_scale of each, the int8 the contract gives it (numpy: IEEE division), and
    whether multiplying by the rounded reciprocal 1 / out_scale instead would give another int8).
    """
    f32 = np.float32
    ys, scales = [], []
    for v in out_scales:
        os_ = f32(v)
        centre = ((np.arange(-128, 127, dtype=np.float32) + f32(0.5)) * os_).astype(np.float32)
        bits = centre.view(np.int32)[:, None] + np.arange(-4, 5, dtype=np.int32)[None, :]
        ys.append(bits.reshape(-1).view(np.float32))
        scales.append(np.full(bits.size, os_, dtype=np.float32))
    y, osv = np.concatenate(ys), np.concatenate(scales)
    want = np.rint(np.clip(y / osv, -128, 127))
    by_reciprocal = np.rint(np.clip(y * (f32(1) / osv), -128, 127))
    return y, osv, want.astype(np.int8), want != by_reciprocal


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_near_ties_follow_the_contract(use_kernel, per_channel):
    """Adversarial requantization: zero weights, so y == bias exactly, with biases placed within
    a few ulps of .5 boundaries, where y * (1 / out_scale) would round differently from the IEEE
    division. Compared with the contract computed here in numpy, not with the reference code."""
    y, osv, want, flips = _near_tie_outputs([0.3, 0.0123, 1.7] if per_channel else [0.1])
    assert flips.sum() >= 20, "the search should find division-sensitive values"
    _check_near_ties(use_kernel, per_channel, y, osv, want, seed=6)


def _check_near_ties(use_kernel: bool, per_channel: bool, y, osv, want, seed: int) -> None:
    """int8_gemm (or its reference) with zero weights, so that its output is requantize(bias)."""
    device = DEVICE if use_kernel else "cpu"
    fn = int8_gemm if use_kernel else int8_gemm_reference
    N = y.size
    x = torch.randint(-128, 128, (2, 3), dtype=torch.int8, generator=torch.Generator().manual_seed(seed)).to(device)
    w = torch.zeros(N, 3, dtype=torch.int8, device=device)
    out_scale = torch.from_numpy(osv if per_channel else osv[:1]).to(device)
    out = fn(x, scale(0.05, device), w, scale(0.01, device), torch.from_numpy(y).to(device), out_scale)
    want_t = torch.from_numpy(want).expand(2, N)
    if use_kernel:
        assert_match(out, want_t)
    else:
        assert torch.equal(out, want_t)


_EXTREME_OUT_SCALES = [1e-35, 3e-39, 2.0 ** 110, 7e35]  # 3e-39: subnormal


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_near_ties_with_extreme_out_scales(use_kernel, per_channel):
    """The requantization's reciprocal product is exact only for scales far from fp32's limits;
    the kernels rescale first, so the contract (IEEE division) holds for any finite scale."""
    scales = _EXTREME_OUT_SCALES if per_channel else _EXTREME_OUT_SCALES[1:2]
    y, osv, want, _ = _near_tie_outputs(scales)
    _check_near_ties(use_kernel, per_channel, y, osv, want, seed=8)


# ---------------------------------------------------------------------------------------------
# The persistent TMA kernel (gemm_tma.py): prefill-sized M on CUDA; here forced for any M
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tma_path(monkeypatch):
    """Route every TMA-addressable problem to gemm_tma and record the configs it launches."""
    from quamba_fx.kernels import gemm_tma

    monkeypatch.setattr(gemm, "_TMA_MIN_M", 1)
    # On CUDA the wrapper would also time the pointer kernel against it: skip that race here.
    monkeypatch.setattr(gemm, "_USES_ALTERNATIVE", {})
    monkeypatch.setattr(gemm, "_alternative_is_faster", lambda alternative, pointer: True)
    monkeypatch.setattr(gemm_tma, "_TUNED", {})
    launched = []
    real = gemm_tma.launch_config

    def spy(c, *args, **kwargs):
        launched.append(c)
        return real(c, *args, **kwargs)

    monkeypatch.setattr(gemm_tma, "launch_config", spy)
    return launched


_OUT_ALIGN = {"int8": 16, "int8_per_channel": 16, "fp16": 8, "bf16": 8, "fp32": 4}  # 16-byte rows


@st.composite
def tma_cases(draw):
    # 16-byte aligned row strides (the TMA rule): K a multiple of 16 for contiguous x and w, N one
    # of 16 / itemsize for the output. Tiles of 16 x 32 x 32 over 3 programs: several tiles per
    # program, ragged M and N edges, K tails (K % 32 == 16) and K below one tile.
    case = draw(cases())
    out = case["out"]
    align = _OUT_ALIGN[out]
    case["K"] = 16 * draw(st.integers(1, 9))
    case["N"] = align * draw(st.integers(1, 96 // align))
    if case["layout"] == "slice":
        case["layout"] = "contiguous"  # a slice's row stride K + pad is rarely 16-byte aligned
    return case


@needs_kernel
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=tma_cases())
def test_tma_kernel_matches_int8_linear(case, tma_path):
    # The fixture is shared by the examples: its launch record only grows.
    launched = len(tma_path)
    kwargs = build(case, DEVICE)
    got = int8_gemm(**kwargs)
    assert len(tma_path) > launched, "the TMA kernel was not used"
    assert_match(got, int8_gemm_reference(**kwargs))


@needs_kernel
@pytest.mark.parametrize("split", [False, True])
def test_tma_kernel_tiles_and_split_epilogue(split, tma_path, monkeypatch):
    """Every tile of a 4 x 3 grid written once by 3 persistent programs, with a wide K tail, with
    the epilogue stored whole or as two halves; the second call uses the recorded config."""
    from quamba_fx.kernels import gemm_tma

    if EXACT:  # the interpreter's config; on CUDA the tuner picks among the real candidates
        monkeypatch.setattr(gemm_tma, "_INTERPRETER_CONFIG", gemm_tma._INTERPRETER_CONFIG._replace(split=split))
    gen = torch.Generator().manual_seed(11)
    M, K, N = 61, 80, 96  # 4 M tiles (the last ragged), 3 N tiles, 3 K steps (the last half empty)
    x = int8_values(gen, (M, K), "uniform").to(DEVICE)
    w = int8_values(gen, (N, K), "uniform").to(DEVICE)
    ws = (torch.rand(N, generator=gen) * 0.01 + 1e-4).to(DEVICE)
    bias = torch.randn(N, generator=gen).to(DEVICE)
    for kw in (dict(out_scale=scale(0.4, DEVICE)), dict(out_dtype=torch.float16), dict(out_dtype=torch.bfloat16)):
        got = int8_gemm(x, scale(0.02, DEVICE), w, ws, bias, **kw)
        assert_match(got, int8_gemm_reference(x, scale(0.02, DEVICE), w, ws, bias, **kw))
        again = int8_gemm(x, scale(0.02, DEVICE), w, ws, bias, **kw)
        assert torch.equal(again, got)
    assert len(gemm_tma._TUNED) == 3  # one tuning per output dtype, none for the repeated calls
    if EXACT:  # (on CUDA the record also holds the tuner's timing launches)
        assert len(tma_path) == 6 and all(c.split == split for c in tma_path)


@needs_kernel
def test_tma_kernel_reads_row_slices_in_place(tma_path):
    """dt_proj's input is x_proj's output sliced to its first `rank` columns: an aligned row
    stride wider than K, read through the descriptor without a copy."""
    gen = torch.Generator().manual_seed(12)
    K, N = 40, 64  # K not a multiple of 16: only the row strides (48) need alignment
    x = int8_values(gen, (37, 48), "uniform").to(DEVICE)[:, :K]
    w = int8_values(gen, (N, 48), "uniform").to(DEVICE)[:, :K]
    ws, bias = scale(0.004, DEVICE, (N,)), torch.randn(N, generator=gen).to(DEVICE)
    got = int8_gemm(x, scale(0.02, DEVICE), w, ws, bias, scale(0.5, DEVICE))
    assert tma_path
    assert_match(got, int8_gemm_reference(x, scale(0.02, DEVICE), w, ws, bias, scale(0.5, DEVICE)))


@pytest.mark.skipif(not EXACT, reason="fake timings of interpreted kernels; needs TRITON_INTERPRET=1")
def test_a_failing_alternative_kernel_falls_back_to_the_pointer_kernel(monkeypatch):
    """A one-row problem on CUDA times the GEMV against the pointer kernel; if the GEMV cannot
    compile or run on the device, a warning says so and the pointer kernel runs it, then and
    later, with the same result as the reference."""
    from quamba_fx.kernels import gemm_tma

    def broken(*args, **kwargs):
        raise RuntimeError("no such instruction on this device")

    monkeypatch.setattr(gemv, "launch", broken)
    monkeypatch.setattr(gemm_tma, "gpu_time_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(gemm, "_INTERPRET", False)  # time the two, as on CUDA
    monkeypatch.setattr(gemm, "_USES_ALTERNATIVE", {})
    gen = torch.Generator().manual_seed(15)
    x = int8_values(gen, (1, 48), "uniform")
    w = int8_values(gen, (24, 48), "uniform")
    args = (x, scale(0.02, "cpu"), w, scale(0.003, "cpu", (24,)), None, scale(0.5, "cpu"))
    with pytest.warns(RuntimeWarning, match="gemv_kernel failed on this device .*no such instruction"):
        first = int8_gemm(*args)
    assert list(gemm._USES_ALTERNATIVE.values()) == [False]
    assert torch.equal(int8_gemm(*args), first)  # no second try, no second warning
    assert_match(first, int8_gemm_reference(*args))


@pytest.mark.skipif(not EXACT, reason="runs the GEMV on CPU tensors: needs TRITON_INTERPRET=1")
def test_an_untimed_alternative_launches_once_on_first_sight(monkeypatch):
    """On CUDA a one-row problem's first call launches the GEMV once: that launch both shows that
    it runs on the device and computes the call's output (it used to be launched a second time)."""
    launches = []
    real = gemv.launch
    monkeypatch.setattr(gemv, "launch", lambda *a, **k: (launches.append(1), real(*a, **k))[1])
    monkeypatch.setattr(gemm, "_INTERPRET", False)  # the choice as on CUDA
    monkeypatch.setattr(gemm, "_USES_ALTERNATIVE", {})
    gen = torch.Generator().manual_seed(16)
    x = int8_values(gen, (1, 64), "uniform")
    w = int8_values(gen, (32, 64), "uniform")
    args = (x, scale(0.02, "cpu"), w, scale(0.003, "cpu", (32,)), None, scale(0.5, "cpu"))
    first = int8_gemm(*args)
    assert len(launches) == 1 and list(gemm._USES_ALTERNATIVE.values()) == [True]
    assert torch.equal(int8_gemm(*args), first) and len(launches) == 2
    assert_match(first, int8_gemm_reference(*args))


@pytest.mark.skipif(not EXACT, reason="fake timings of interpreted kernels; needs TRITON_INTERPRET=1")
def test_prefill_kernel_choice_is_timed_once_and_recorded(monkeypatch):
    """On CUDA a prefill problem runs whichever kernel timed faster on first sight (e.g. the pointer
    kernel for 2.8b's out_proj at 2048 rows on an H200), and later calls reuse the choice."""
    from quamba_fx.kernels import gemm_tma

    calls = []

    def fake_gpu_time(fn):  # pointer kernel "faster": timed second, smaller
        fn()
        calls.append(fn)
        return 2.0 if len(calls) == 1 else 1.0

    launched = []
    real_launch = gemm_tma.launch_config
    monkeypatch.setattr(gemm_tma, "launch_config", lambda c, *a, **k: (launched.append(c), real_launch(c, *a, **k)))
    monkeypatch.setattr(gemm_tma, "gpu_time_ms", fake_gpu_time)
    monkeypatch.setattr(gemm_tma, "_TUNED", {})
    monkeypatch.setattr(gemm, "_INTERPRET", False)  # time the two, as on CUDA
    monkeypatch.setattr(gemm, "_TMA_MIN_M", 1)
    monkeypatch.setattr(gemm, "_USES_ALTERNATIVE", {})
    gen = torch.Generator().manual_seed(14)
    x = int8_values(gen, (20, 32), "uniform")
    w = int8_values(gen, (16, 32), "uniform")
    args = (x, scale(0.02, "cpu"), w, scale(0.003, "cpu", (16,)), None, scale(0.5, "cpu"))
    first = int8_gemm(*args)
    assert len(calls) == 2 and list(gemm._USES_ALTERNATIVE.values()) == [False]
    tma_launches = len(launched)
    assert tma_launches >= 1  # the TMA kernel was tuned and timed, then not chosen
    assert torch.equal(int8_gemm(*args), first)
    assert len(calls) == 2 and len(launched) == tma_launches  # no new timing, no TMA launch
    assert_match(first, int8_gemm_reference(*args))


@needs_kernel
def test_unaligned_layouts_stay_on_the_pointer_kernel(tma_path):
    """Rows TMA cannot address (N * itemsize or the x row stride not a multiple of 16 bytes) run
    the pointer kernel, with the same results."""
    gen = torch.Generator().manual_seed(13)
    for M, K, N, kw in ((20, 48, 40, dict(out_scale=scale(0.5, DEVICE))),  # int8 rows of 40 bytes
                        (20, 50, 32, dict(out_dtype=torch.float16))):       # x rows of 50 bytes
        x = int8_values(gen, (M, K), "uniform").to(DEVICE)
        w = int8_values(gen, (N, K), "uniform").to(DEVICE)
        ws = scale(0.003, DEVICE, (N,))
        got = int8_gemm(x, scale(0.02, DEVICE), w, ws, None, **kw)
        assert_match(got, int8_gemm_reference(x, scale(0.02, DEVICE), w, ws, None, **kw))
    assert not tma_path


def test_tma_candidates_fit_and_clip():
    """The GPU candidates (pure Python): clipped to the problem, within shared memory, unique."""
    from quamba_fx.kernels import gemm_tma

    for n, k, out_bytes in ((10240, 2560, 1), (2560, 5120, 2), (192, 5120, 1), (5120, 160, 1), (16, 16, 4)):
        got = gemm_tma._clip_candidates(gemm_tma._PREFILL, n, k, out_bytes)
        assert got and len(set(got)) == len(got)
        for c in got:
            assert c.block_n <= max(16, 1 << (n - 1).bit_length()) and c.block_k <= max(32, 1 << (k - 1).bit_length())
            assert gemm_tma._smem_bytes(c, out_bytes) <= gemm_tma._SMEM_LIMIT


@needs_kernel
def test_row_strides_and_shapes():
    gen = torch.Generator().manual_seed(2)
    K, N = 48, 80  # 130m's dt_proj: K below one tile on the GPU, N not a tile multiple
    w = int8_values(gen, (N, K), "uniform").to(DEVICE)
    ws, b = (torch.rand(N, generator=gen) * 0.01).to(DEVICE), torch.randn(N, generator=gen).to(DEVICE)
    wide = int8_values(gen, (2, 7, K + 32), "uniform").to(DEVICE)
    for x in (wide[..., :K], wide[:, 3, :K], wide[1:, :, 5:5 + K], wide[:, :, :K].transpose(0, 1)):
        for kw in (dict(out_scale=scale(0.5, DEVICE)), dict(out_dtype=torch.float16)):
            got = int8_gemm(x, scale(0.02, DEVICE), w, ws, b, **kw)
            assert got.shape == (*x.shape[:-1], N)
            assert_match(got, int8_gemm_reference(x, scale(0.02, DEVICE), w, ws, b, **kw))
    # A weight with a row stride > K (a slice), and one whose K stride is not 1 (copied).
    w_wide = int8_values(gen, (N, K + 16), "uniform").to(DEVICE)
    w_t = w.t().contiguous().t()
    x = wide[0, :, :K]
    for wq in (w_wide[:, 8:8 + K], w_t):
        assert_match(int8_gemm(x, scale(0.02, DEVICE), wq, ws, b),
                     int8_gemm_reference(x, scale(0.02, DEVICE), wq, ws, b))


def test_rows_view_avoids_copies():
    wide = torch.zeros(2, 7, 50, dtype=torch.int8)
    x = wide[..., :40]
    rows = gemm._as_rows(x, 14, 40)
    assert rows.data_ptr() == x.data_ptr() and rows.stride() == (50, 1)
    x = wide[:, 2:5, 3:43]
    rows = gemm._as_rows(x, 6, 40)
    assert rows.is_contiguous() and torch.equal(rows, x.reshape(6, 40))  # (2, 3) rows do not merge
    x = wide[1, :, 10:50]
    rows = gemm._as_rows(x, 7, 40)
    assert rows.data_ptr() == x.data_ptr() and rows.stride() == (50, 1)
    cols = torch.zeros(40, 6, dtype=torch.int8).t()  # K stride 6: must be copied
    assert gemm._as_rows(cols, 6, 40).stride() == (40, 1)


@needs_kernel
@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16), (4, 0)])
def test_empty_dims(shape):
    K = shape[-1]
    x = torch.zeros(shape, dtype=torch.int8, device=DEVICE)
    w = torch.ones(5, K, dtype=torch.int8, device=DEVICE)
    bias = torch.arange(5, dtype=torch.float32, device=DEVICE)
    got = int8_gemm(x, scale(0.1, DEVICE), w, scale(0.1, DEVICE), bias)
    assert got.shape == (*shape[:-1], 5)
    assert_match(got, int8_gemm_reference(x, scale(0.1, DEVICE), w, scale(0.1, DEVICE), bias))
    w0 = torch.ones(0, K, dtype=torch.int8, device=DEVICE)
    assert int8_gemm(x, scale(0.1, DEVICE), w0, scale(0.1, DEVICE)).shape == (*shape[:-1], 0)


@needs_kernel
def test_other_dtypes():
    """Non-fp32 scales / bias are converted like the reference does; an fp64 output falls back."""
    gen = torch.Generator().manual_seed(3)
    x = int8_values(gen, (9, 33), "uniform").to(DEVICE)
    w = int8_values(gen, (17, 33), "uniform").to(DEVICE)
    xs = torch.tensor([0.0213], dtype=torch.float64, device=DEVICE)
    ws = (torch.rand(17, generator=gen) * 0.01).to(DEVICE, torch.float16)
    bias = torch.randn(34, generator=gen).to(DEVICE, torch.bfloat16)[::2]  # strided, bf16
    os_ = torch.full((17,), 0.7, dtype=torch.float64, device=DEVICE)
    for kw in (dict(out_scale=os_), dict(out_dtype=torch.float32), dict(out_dtype=torch.float64)):
        assert_match(int8_gemm(x, xs, w, ws, bias, **kw), int8_gemm_reference(x, xs, w, ws, bias, **kw))


# ---------------------------------------------------------------------------------------------
# Autotune configs (pure Python: checks the GPU config families whatever the machine)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,K,N", [(1, 48, 1536), (1, 5120, 192), (16, 2560, 10240), (64, 1536, 80),
                                   (1, 5120, 2560), (128, 2560, 10240), (2048, 160, 5120), (16384, 5120, 2560),
                                   (1, 1, 1)])
def test_config_pruning(M, K, N):
    m_bucket = min(1 << (M - 1).bit_length(), gemm._M_BUCKET_CAP)
    pruned = gemm._prune_configs([], {"M_BUCKET": m_bucket, "N": N, "K": K})
    assert pruned
    sigs = [gemm._config_sig(c) for c in pruned]
    assert len(set(sigs)) == len(sigs)
    for bm, bn, bk, group_m, stages, _, split in sigs:
        assert bm >= 16 and bn >= 16 and bk >= 32  # tl.dot / int8 MMA minimums
        k_tiles = -(-K // bk)
        assert 1 <= split <= k_tiles or split == 1  # every split has K tiles to sum
        assert 2 <= stages <= max(2, -(-k_tiles // split))  # no more stages than a split's K tiles
        assert bn <= max(16, 1 << (N - 1).bit_length()) and bk <= max(32, 1 << (K - 1).bit_length())
        if M <= gemm.SKINNY_MAX_M:
            # One M tile, the weight read once; from 128 rows also two, side by side (GROUP_M).
            assert bm == max(16, m_bucket) or (m_bucket >= 128 and bm == m_bucket // 2)
            assert group_m == max(16, m_bucket) // bm
        else:
            assert bm >= 64
            tiles = -(-m_bucket // bm) * -(-N // bn)
            # Split only where SMs idle, to at most four programs an SM, keeping 4 K steps a split.
            assert split == 1 or (gemm._split_helps(tiles, split, 132) and tiles * split <= 4 * 132
                                  and k_tiles // split >= 4)


@pytest.mark.parametrize("M, K, N, splits", [(2048, 5120, 192, True), (2048, 5120, 2560, True),
                                              (2048, 2560, 10240, False), (2048, 160, 5120, False),
                                              (16384, 5120, 2560, False)])
def test_prefill_configs_split_k_only_where_tiles_leave_sms_idle(M, K, N, splits):
    """x_proj at 2048 rows (N = 192) has fewer tiles than SMs whatever the tile, out_proj a last
    wave 21% full with 128 x 256 tiles: some candidates split K. in_proj and dt_proj at 2048 rows,
    and out_proj at 16384, fill the SMs unsplit."""
    pruned = gemm._prune_configs([], {"M_BUCKET": M, "N": N, "K": K})
    assert any(c.kwargs["SPLIT_K"] > 1 for c in pruned) == splits


@pytest.mark.parametrize("tiles, split, helps", [(96, 2, True), (96, 8, False), (40, 2, False), (160, 2, True),
                                                 (160, 8, False), (320, 2, False), (640, 2, False)])
def test_when_a_prefill_split_helps(tiles, split, helps):
    """132 SMs: 96 tiles split in two reach every SM, in eight pass four an SM; 40 in two still
    leave SMs idle; 160 tiles (two waves, the last 21% full) split in two fill 81%; 320 tiles
    (81%) and 640 (97%) gain too little."""
    assert gemm._split_helps(tiles, split, 132) == helps


@pytest.mark.parametrize("M, halves", [(16, False), (64, False), (65, True), (128, True)])
def test_short_prompts_also_try_two_row_tiles(M, halves):
    """At 65-128 rows the activation is most of what a program streams: the family also has row
    tiles of half the bucket, the two of a weight tile launched side by side (GROUP_M 2)."""
    m_bucket = 1 << (M - 1).bit_length()
    pruned = gemm._prune_configs([], {"M_BUCKET": m_bucket, "N": 2560, "K": 5120})
    rows = {(c.kwargs["BLOCK_M"], c.kwargs["GROUP_M"]) for c in pruned}
    assert rows == ({(m_bucket, 1), (m_bucket // 2, 2)} if halves else {(max(16, m_bucket), 1)})


def test_skinny_configs_split_k_when_column_tiles_are_few():
    """out_proj at decode (N = 2560, K = 5120) has 40 column tiles of 64 for 132 SMs: some of its
    candidates split K so that every SM streams part of the weight."""
    pruned = gemm._prune_configs([], {"M_BUCKET": 1, "N": 2560, "K": 5120})
    most = max(-(-2560 // c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] for c in pruned)
    assert most >= 2 * 132
    # Never more splits than needed to fill the SMs twice (each split adds a partial tile's traffic).
    for c in pruned:
        tiles = -(-2560 // c.kwargs["BLOCK_N"])
        assert c.kwargs["SPLIT_K"] == 1 or tiles * c.kwargs["SPLIT_K"] // 2 < 2 * 132


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _good():
    return dict(x_q=torch.zeros(3, 4, dtype=torch.int8), x_scale=scale(0.1, "cpu"),
                w_q=torch.zeros(5, 4, dtype=torch.int8), w_scale=scale(0.1, "cpu", (5,)),
                bias=torch.zeros(5), out_scale=None, out_dtype=None)


SHARED_ERRORS = [
    (dict(x_q=torch.zeros(3, 4)), r"x_q must be int8"),
    (dict(w_q=torch.zeros(5, 4, dtype=torch.int16)), r"w_q must be int8"),
    (dict(w_q=torch.zeros(1, 5, 4, dtype=torch.int8)), r"w_q must be \[N, K\]"),
    (dict(x_q=torch.tensor(1, dtype=torch.int8)), r"at least one dim"),
    (dict(x_q=torch.zeros(3, 5, dtype=torch.int8)), r"x_q has K=5 but w_q \(5, 4\) has K=4"),
    (dict(x_q=torch.zeros(1, MAX_INT8_LINEAR_K + 1, dtype=torch.int8),
          w_q=torch.zeros(5, MAX_INT8_LINEAR_K + 1, dtype=torch.int8)), r"could overflow an int32 accumulator"),
    (dict(x_scale=scale(0.1, "cpu", (2,))), r"x_scale must be per-tensor"),
    (dict(w_scale=scale(0.1, "cpu", (4,))), r"w_scale must have shape \[\], \[1\] or \[N=5\]"),
    (dict(bias=torch.zeros(4)), r"bias must have shape \[N=5\]"),
    (dict(out_scale=scale(0.1, "cpu", (3,))), r"out_scale must have shape"),
    (dict(w_scale=torch.ones(5, dtype=torch.int32)), r"w_scale must be a floating-point tensor"),
    (dict(out_scale=scale(0.1, "cpu"), out_dtype=torch.float16), r"out_scale requantizes to int8"),
    (dict(out_dtype=torch.int32), r"out_dtype must be a floating dtype"),
]
OWN_ERRORS = [
    (dict(x_scale=0.1), r"x_scale must be a torch.Tensor, got float"),
    (dict(w_scale=[0.1] * 5), r"w_scale must be a torch.Tensor, got list"),
    # The kernel reads every scale from memory: all must be on x_q's device.
    (dict(x_q=torch.zeros(3, 4, dtype=torch.int8, device="meta"),
          w_q=torch.zeros(5, 4, dtype=torch.int8, device="meta")), r"x_scale is on cpu but x_q is on meta"),
]


@pytest.mark.parametrize("fn", [int8_gemm, int8_gemm_reference])
@pytest.mark.parametrize("override,match", SHARED_ERRORS)
def test_rejects_bad_inputs(fn, override, match):
    with pytest.raises(ValueError, match=match):
        fn(**{**_good(), **override})


@pytest.mark.parametrize("override,match", OWN_ERRORS)
def test_rejects_bad_inputs_kernel_rules(override, match):
    with pytest.raises(ValueError, match=match):
        int8_gemm(**{**_good(), **override})
