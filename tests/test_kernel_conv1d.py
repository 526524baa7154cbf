"""Tests for the fused int8 causal conv1d + SiLU kernels (quamba_fx.kernels.conv1d).

Run on CPU with the Triton interpreter, where kernel and reference must agree bit for bit:

    TRITON_INTERPRET=1 python -m pytest tests/test_kernel_conv1d.py -q

Without the interpreter, kernel tests run on CUDA when present (allowing the documented one-step
difference) and are skipped otherwise; reference and validation tests always run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import conv1d
from quamba_fx.kernels.conv1d import (
    causal_conv1d_silu_int8,
    causal_conv1d_silu_int8_reference,
    causal_conv1d_update_silu_int8,
    causal_conv1d_update_silu_int8_reference,
)

from .kernel_support import DEVICE, EXACT, needs_kernel, reference_calls

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def assert_int8_match(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-exact under the interpreter; on CUDA at most one step apart (exp/div approximations)."""
    assert got.dtype == want.dtype == torch.int8
    assert got.shape == want.shape
    if torch.equal(got.cpu(), want.cpu()):
        return
    diff = (got.cpu().int() - want.cpu().int()).abs()
    msg = f"{int((diff != 0).sum())} of {diff.numel()} int8 values differ, max |diff| {int(diff.max())}"
    assert not EXACT, msg
    assert int(diff.max()) <= 1, msg


def make_x(gen: torch.Generator, B: int, D: int, L: int, layout: str, device: str) -> torch.Tensor:
    """int8 [B, D, L] in one of several memory layouts."""
    if layout == "inproj":  # the x half of in_proj's output: xz [B, L, 2D] contiguous
        xz = torch.randint(-128, 128, (B, L, 2 * D), dtype=torch.int8, generator=gen)
        return xz.to(device).transpose(1, 2)[:, :D]
    if layout == "contiguous":
        return torch.randint(-128, 128, (B, D, L), dtype=torch.int8, generator=gen).to(device)
    # "strided": every other time step of a [B, D, 2L] buffer (stride 2 along L, 2L along D)
    big = torch.randint(-128, 128, (B, D, 2 * L), dtype=torch.int8, generator=gen)
    return big.to(device)[:, :, ::2]


def make_params(gen: torch.Generator, D: int, W: int, has_bias: bool, device: str):
    weight = (torch.randn(D, W, generator=gen) * 0.5).to(device)
    bias = (torch.randn(D, generator=gen) * 0.5).to(device) if has_bias else None
    return weight, bias


def rand_state(gen: torch.Generator, B: int, D: int, W: int, device: str) -> torch.Tensor:
    return torch.randint(-128, 128, (B, D, W - 1), dtype=torch.int8, generator=gen).to(device)


def scale(v: float, device: str, shape=()) -> torch.Tensor:
    return torch.full(shape, v, dtype=torch.float32, device=device)


@st.composite
def cases(draw, max_b=3, max_d=70, max_l=40):
    B = draw(st.integers(1, max_b))
    # The interpreter runs 64-channel, 8-step tiles (prefill) and 32-channel ones (decode): hit
    # the edges, and lengths below the kernel's 4-step prefetch.
    D = draw(st.one_of(st.integers(1, max_d), st.sampled_from([d for d in (1, 31, 33, 63, 64, 65, 70) if d <= max_d])))
    L = draw(st.one_of(st.integers(1, max_l), st.sampled_from([1, 2, 3, 4, 5, 8, 9, 17])))
    W = draw(st.integers(2, 4))
    layout = draw(st.sampled_from(["inproj", "contiguous", "strided"]))
    has_bias = draw(st.booleans())
    has_state = draw(st.booleans())
    x_scale = draw(st.floats(0.001, 0.1))
    # Relative to x_scale: from heavy saturation (0.2) to mostly in range (3).
    out_factor = draw(st.floats(0.2, 3.0))
    # One output scale, or one a channel (Quamba2's Mamba-2 conv output).
    per_channel_out = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, D=D, L=L, W=W, layout=layout, has_bias=has_bias, has_state=has_state,
                x_scale=x_scale, out_scale=x_scale * out_factor, per_channel_out=per_channel_out, seed=seed)


def build(case: dict, device: str):
    gen = torch.Generator().manual_seed(case["seed"])
    B, D, L, W = case["B"], case["D"], case["L"], case["W"]
    x = make_x(gen, B, D, L, case["layout"], device)
    weight, bias = make_params(gen, D, W, case["has_bias"], device)
    state = rand_state(gen, B, D, W, device) if case["has_state"] else None
    out_scale = scale(case["out_scale"], device, (1,))
    if case.get("per_channel_out"):  # within 4x of the drawn scale, each channel its own
        out_scale = (out_scale.cpu() * 4 ** (2 * torch.rand(D, generator=gen) - 1)).to(device)
    return x, scale(case["x_scale"], device), weight, bias, out_scale, state


# ---------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------


@needs_kernel
@settings(max_examples=20, **SETTINGS)
@given(case=cases())
def test_prefill_matches_reference(case):
    check_prefill(case)


@pytest.mark.slow
@needs_kernel
@settings(max_examples=60, **SETTINGS)
@given(case=cases())
def test_prefill_matches_reference_on_more_cases(case):
    check_prefill(case)


def check_prefill(case: dict) -> None:
    """The kernel against the reference on one drawn case: output, final state, layouts."""
    x, xs, w, b, os_, s0 = build(case, DEVICE)
    out, final = causal_conv1d_silu_int8(x, xs, w, b, os_, s0, return_final_state=True)
    ref, ref_final = causal_conv1d_silu_int8_reference(x, xs, w, b, os_, s0, return_final_state=True)
    assert_int8_match(out, ref)
    assert torch.equal(final, ref_final)
    B, D, L = x.shape
    # Memory layout [B, L, D] (what x_proj's GEMM wants) and a contiguous final state.
    assert out.shape == (B, D, L) and out.stride() == (L * D, 1, D)
    assert final.shape == (B, D, case["W"] - 1) and final.is_contiguous()
    # Without return_final_state the result is the bare tensor.
    alone = causal_conv1d_silu_int8(x, xs, w, b, os_, s0)
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, out)


@needs_kernel
@pytest.mark.parametrize("per_channel_out", [False, True])
def test_model_sized_prefill_matches_reference(per_channel_out):
    # Model-sized shapes take another tile (under the interpreter, a wide one that keeps
    # model-level tests affordable): same contract, ragged last L tile, initial state.
    case = dict(B=2, D=520, L=70, W=4, layout="inproj", has_bias=True, has_state=True, seed=5,
                x_scale=0.03, out_scale=0.02, per_channel_out=per_channel_out)
    x, xs, w, b, os_, s0 = build(case, DEVICE)
    out, final = causal_conv1d_silu_int8(x, xs, w, b, os_, s0, return_final_state=True)
    ref, ref_final = causal_conv1d_silu_int8_reference(x, xs, w, b, os_, s0, return_final_state=True)
    assert_int8_match(out, ref)
    assert torch.equal(final, ref_final)


@needs_kernel
@settings(max_examples=15, **SETTINGS)
@given(case=cases(max_l=30), data=st.data())
def test_chunked_prefill_equals_whole(case, data):
    x, xs, w, b, os_, s0 = build(case, DEVICE)
    L = x.shape[2]
    # cut may be 0 or L: an empty chunk must pass the state through unchanged.
    cut = data.draw(st.integers(0, L), label="cut")
    whole, whole_final = causal_conv1d_silu_int8(x, xs, w, b, os_, s0, return_final_state=True)
    o1, f1 = causal_conv1d_silu_int8(x[:, :, :cut], xs, w, b, os_, s0, return_final_state=True)
    o2, f2 = causal_conv1d_silu_int8(x[:, :, cut:], xs, w, b, os_, f1, return_final_state=True)
    assert_int8_match(torch.cat([o1, o2], dim=2), whole)
    assert torch.equal(f2, whole_final)


@needs_kernel
@settings(max_examples=20, **SETTINGS)
@given(case=cases(max_d=40, max_l=10))
def test_decode_chain_equals_prefill(case):
    x, xs, w, b, os_, s0 = build(case, DEVICE)
    B, D, L = x.shape
    W = case["W"]
    prefill, final = causal_conv1d_silu_int8(x, xs, w, b, os_, s0, return_final_state=True)
    start = s0 if s0 is not None else torch.zeros(B, D, W - 1, dtype=torch.int8, device=DEVICE)
    # A non-contiguous state buffer: the kernel must honour its strides when updating in place.
    state = torch.empty(B, W - 1, D, dtype=torch.int8, device=DEVICE).transpose(1, 2)
    state.copy_(start)
    ref_state = start.clone()
    for t in range(L):
        y = causal_conv1d_update_silu_int8(x[:, :, t], state, xs, w, b, os_)
        y_ref = causal_conv1d_update_silu_int8_reference(x[:, :, t], ref_state, xs, w, b, os_)
        assert y.shape == (B, D) and y.is_contiguous()
        assert_int8_match(y, y_ref)
        assert_int8_match(y, prefill[:, :, t])
        assert torch.equal(state, ref_state)
    assert torch.equal(state, final)


@needs_kernel
def test_kernel_path_is_taken(monkeypatch):
    """Guards the comparisons above: the wrappers must not fall back to the reference."""
    def boom(*args, **kwargs):
        raise AssertionError("wrapper fell back to the reference")

    monkeypatch.setattr(conv1d, "causal_conv1d_silu_int8_reference", boom)
    monkeypatch.setattr(conv1d, "causal_conv1d_update_silu_int8_reference", boom)
    gen = torch.Generator().manual_seed(0)
    x = make_x(gen, 1, 8, 5, "inproj", DEVICE)
    w, b = make_params(gen, 8, 4, True, DEVICE)
    causal_conv1d_silu_int8(x, scale(0.05, DEVICE), w, b, scale(0.05, DEVICE))
    causal_conv1d_update_silu_int8(x[:, :, 0], rand_state(gen, 1, 8, 4, DEVICE), scale(0.05, DEVICE), w, b,
                                   scale(0.05, DEVICE))


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    calls = reference_calls(monkeypatch, conv1d, "causal_conv1d_silu_int8_reference")
    gen = torch.Generator().manual_seed(0)
    x = make_x(gen, 1, 4, 3, "contiguous", "cpu")
    w, b = make_params(gen, 4, 3, False, "cpu")
    causal_conv1d_silu_int8(x, scale(0.05, "cpu"), w, b, scale(0.05, "cpu"))
    assert calls == [1]


@needs_kernel
def test_scale_changed_in_place_takes_effect():
    gen = torch.Generator().manual_seed(1)
    B, D, L, W = 2, 40, 12, 4
    x = make_x(gen, B, D, L, "inproj", DEVICE)
    w, b = make_params(gen, D, W, True, DEVICE)
    state = rand_state(gen, B, D, W, DEVICE)
    xs, os_ = scale(0.02, DEVICE), scale(0.02, DEVICE, (1,))
    first = causal_conv1d_silu_int8(x, xs, w, b, os_)
    dec_state = state.clone()
    first_dec = causal_conv1d_update_silu_int8(x[:, :, 0], dec_state, xs, w, b, os_)

    xs.fill_(0.03)
    os_.fill_(0.05)
    second = causal_conv1d_silu_int8(x, xs, w, b, os_)
    dec_state2 = state.clone()
    second_dec = causal_conv1d_update_silu_int8(x[:, :, 0], dec_state2, xs, w, b, os_)

    assert not torch.equal(first, second)
    assert not torch.equal(first_dec, second_dec)
    assert_int8_match(second, causal_conv1d_silu_int8_reference(x, xs, w, b, os_))
    ref_state = state.clone()
    assert_int8_match(second_dec, causal_conv1d_update_silu_int8_reference(x[:, :, 0], ref_state, xs, w, b, os_))


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_ties_round_half_to_even(use_kernel):
    """For acc >= 17, 1 + exp(-acc) == 1 in fp32, so SiLU is the identity and y = x * 0.5 lands
    exactly on .5 for odd x: a direct test of the rounding rule, independent of the reference."""
    device = DEVICE if use_kernel else "cpu"
    fn = causal_conv1d_silu_int8 if use_kernel else causal_conv1d_silu_int8_reference
    xs_int = torch.arange(34, 128, dtype=torch.int8)  # 17.0, 17.5, ..., 63.5
    L = xs_int.numel()
    x = xs_int.view(1, 1, L).to(device)
    w = torch.tensor([[0.0, 1.0]], device=device)  # y[t] = x[t] * x_scale
    out = fn(x, scale(0.5, device), w, None, scale(1.0, device))
    expected = torch.tensor([round(v / 2) for v in xs_int.tolist()], dtype=torch.int8)  # Python: half-even
    assert torch.equal(out.cpu().view(-1), expected)
    # Sanity: the case really has ties, where half-away-from-zero would answer differently.
    assert expected.tolist() != [math.floor(v / 2 + 0.5) for v in xs_int.tolist()]


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_saturation(use_kernel):
    device = DEVICE if use_kernel else "cpu"
    fn = causal_conv1d_silu_int8 if use_kernel else causal_conv1d_silu_int8_reference
    # SiLU's minimum is about -0.2785 (at -1.2785); with out_scale 1e-3 it saturates both ways.
    x = torch.tensor([[[127, -13, 1, -128]]], dtype=torch.int8, device=device)
    w = torch.tensor([[0.0, 1.0]], device=device)
    out = fn(x, scale(0.1, device), w, None, scale(1e-3, device))
    # 12.7 -> 127 (sat), -1.3 -> silu -0.2784 -> -128 (sat), 0.1 -> 0.0524/1e-3 = 52.4 -> 52, -12.8 -> ~ -3.5e-5 -> 0
    assert out.cpu().view(-1).tolist() == [127, -128, 52, 0]


def _near_tie_accumulators(out_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp32 pre-activations whose int8 result hinges on the last bit of exp.

    For acc in [-8, -5.3] SiLU is monotone and exp(-acc) is large, so a 1-ulp change of exp moves
    s = silu(acc) / out_scale by about an ulp. We bisect (on float bit patterns) for the acc where
    s crosses each .5 boundary in [-127.5, -14.5] and keep a few neighbours on each side. Returns
    the accumulators, the int8 values the contract gives them (numpy fp32, i.e. the interpreter's
    exp), and a mask of those that a 1-ulp error in exp would flip.
    """
    f32 = np.float32
    inv = f32(1) / f32(out_scale)

    def quant(acc, e):
        s = (acc / (f32(1) + e)) * inv
        return np.round(np.clip(s, f32(-128), f32(127)))

    def s_of_bits(bits):  # magnitude bits -> s; increasing in bits on this range
        acc = -bits.astype(np.int32).view(np.float32)
        return (acc / (f32(1) + np.exp(-acc))) * inv

    targets = np.arange(-127.5, -14, 1.0, dtype=np.float32)
    lo = np.full(targets.shape, np.array(5.3, np.float32).view(np.int32), dtype=np.int64)
    hi = np.full(targets.shape, np.array(8.0, np.float32).view(np.int32), dtype=np.int64)
    for _ in range(32):
        mid = (lo + hi) // 2
        above = s_of_bits(mid) >= targets
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    bits = (hi[:, None] + np.arange(-3, 4)[None, :]).reshape(-1).astype(np.int32)
    acc = -bits.view(np.float32)
    e = np.exp(-acc)
    want = quant(acc, e)
    flips = (quant(acc, np.nextafter(e, f32(np.inf))) != want) | (quant(acc, np.nextafter(e, f32(-np.inf))) != want)
    return acc, want.astype(np.int8), flips


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_near_ties_follow_the_contract(use_kernel):
    """Adversarial inputs for bit-exactness: bias-only channels (zero weights, so acc == bias
    exactly) placed where one ulp of exp decides the int8 result. Compared with the contract
    computed here in numpy, not with the reference code."""
    out_scale = 2e-4
    acc, want, flips = _near_tie_accumulators(out_scale)
    assert flips.sum() >= 20, "the search should find exp-sensitive values"
    device = DEVICE if use_kernel else "cpu"
    fn = causal_conv1d_silu_int8 if use_kernel else causal_conv1d_silu_int8_reference
    D = acc.size
    x = torch.randint(-128, 128, (1, D, 3), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    w = torch.zeros(D, 2)
    out = fn(x.to(device), scale(0.1, device), w.to(device), torch.from_numpy(acc).to(device),
             scale(out_scale, device))
    want_t = torch.from_numpy(want)[None, :, None].expand(1, D, 3)
    if use_kernel:
        assert_int8_match(out, want_t)
    else:
        assert torch.equal(out, want_t)


@needs_kernel
def test_empty_sequence_passes_state_through():
    gen = torch.Generator().manual_seed(2)
    x = torch.empty(2, 5, 0, dtype=torch.int8, device=DEVICE)
    w, b = make_params(gen, 5, 3, True, DEVICE)
    s0 = rand_state(gen, 2, 5, 3, DEVICE)
    out, final = causal_conv1d_silu_int8(x, scale(0.1, DEVICE), w, b, scale(0.1, DEVICE), s0, True)
    assert out.shape == (2, 5, 0)
    assert torch.equal(final, s0) and final.data_ptr() != s0.data_ptr()
    _, zero = causal_conv1d_silu_int8(x, scale(0.1, DEVICE), w, b, scale(0.1, DEVICE), None, True)
    assert torch.equal(zero, torch.zeros_like(s0))


# ---------------------------------------------------------------------------------------------
# Reference vs an independent float computation
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(case=cases(max_l=60))
def test_reference_agrees_with_float_conv1d(case):
    x, xs, w, b, os_, s0 = build(case, "cpu")
    B, D, L = x.shape
    W = case["W"]
    ref, ref_final = causal_conv1d_silu_int8_reference(x, xs, w, b, os_, s0, return_final_state=True)

    # fp32 through F.conv1d (oneDNN's own summation order; fp64 depthwise conv is pathologically
    # slow on CPU): padding=W-1 and slicing realise causality when there is no state.
    xin = x.float() * xs
    w3 = w[:, None, :]
    if s0 is None:
        v = F.conv1d(xin, w3, b, padding=W - 1, groups=D)[..., :L]
        want_final = torch.cat([torch.zeros(B, D, W - 1, dtype=torch.int8), x], dim=2)[..., -(W - 1):]
    else:
        v = F.conv1d(torch.cat([s0.float() * xs, xin], dim=2), w3, b, groups=D)
        want_final = torch.cat([s0, x], dim=2)[..., -(W - 1):]
    q = torch.clamp(torch.round(F.silu(v) / (os_.reshape(-1, 1) if os_.numel() > 1 else os_)), -128, 127)
    diff = (ref.float() - q).abs()
    assert diff.max() <= 1, f"max |diff| {diff.max()}"
    # Off-by-one only where rounding differences move a value across a .5 boundary: rare.
    assert int((diff > 0).sum()) <= 1 + diff.numel() // 100
    assert torch.equal(ref_final, want_final)


def test_reference_decode_rolls_state():
    gen = torch.Generator().manual_seed(3)
    B, D, W = 2, 6, 4
    state = rand_state(gen, B, D, W, "cpu")
    before = state.clone()
    x = torch.randint(-128, 128, (B, D), dtype=torch.int8, generator=gen)
    w, b = make_params(gen, D, W, True, "cpu")
    y = causal_conv1d_update_silu_int8_reference(x, state, scale(0.05, "cpu"), w, b, scale(0.05, "cpu"))
    assert torch.equal(state[..., :-1], before[..., 1:]) and torch.equal(state[..., -1], x)
    v = b.double() + (torch.cat([before, x[..., None]], -1).double() * 0.05 * w.double()).sum(-1)
    q = torch.clamp(torch.round(F.silu(v) / 0.05), -128, 127)
    assert (y.double() - q).abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _good(B=2, D=4, L=5, W=3):
    gen = torch.Generator().manual_seed(4)
    x = make_x(gen, B, D, L, "inproj", "cpu")
    w, b = make_params(gen, D, W, True, "cpu")
    return dict(x_q=x, x_scale=scale(0.1, "cpu"), weight=w, bias=b, out_scale=scale(0.1, "cpu"))


PREFILL_ERRORS = [
    (dict(x_q=torch.zeros(2, 4, 5)), r"x_q must be int8"),
    (dict(x_q=torch.zeros(2, 4, dtype=torch.int8)), r"x_q must have 3 dims"),
    (dict(x_scale=0.1), r"x_scale must be a 0-dim or 1-element float32 tensor"),
    (dict(out_scale=torch.tensor([0.1, 0.2])), r"out_scale must be a 0-dim or 1-element float32 tensor"),
    (dict(x_scale=torch.tensor(0.1, dtype=torch.float64)), r"x_scale must be .*float32"),
    (dict(weight=torch.zeros(4, 5)), r"W must be in 2..4, got W=5"),
    (dict(weight=torch.zeros(4, 1)), r"W must be in 2..4, got W=1"),
    (dict(weight=torch.zeros(3, 3)), r"weight has 3 channels but x_q has D=4"),
    (dict(weight=torch.zeros(4, 3, dtype=torch.float16)), r"weight must be a float32 \[D, W\] tensor"),
    (dict(bias=torch.zeros(5)), r"bias must be None or a float32 tensor of shape \(4,\)"),
    (dict(initial_state=torch.zeros(2, 4, 3, dtype=torch.int8)),
     r"initial_state must have shape \(B, D, W-1\) = \(2, 4, 2\)"),
    (dict(initial_state=torch.zeros(2, 4, 2)), r"initial_state must be int8"),
]


@pytest.mark.parametrize("fn", [causal_conv1d_silu_int8, causal_conv1d_silu_int8_reference])
@pytest.mark.parametrize("override,match", PREFILL_ERRORS)
def test_prefill_rejects_bad_inputs(fn, override, match):
    kwargs = {**_good(), **override}
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


UPDATE_ERRORS = [
    (dict(x_q=torch.zeros(2, 4, 1, dtype=torch.int8)), r"x_q must have 2 dims"),
    (dict(conv_state=torch.zeros(2, 4, 3, dtype=torch.int8)),
     r"conv_state must have shape \(B, D, W-1\) = \(2, 4, 2\)"),
    (dict(conv_state=torch.zeros(2, 4, 2, dtype=torch.int16)), r"conv_state must be int8"),
    (dict(out_scale=1.0), r"out_scale must be a 0-dim or 1-element float32 tensor"),
]


@pytest.mark.parametrize("fn", [causal_conv1d_update_silu_int8, causal_conv1d_update_silu_int8_reference])
@pytest.mark.parametrize("override,match", UPDATE_ERRORS)
def test_update_rejects_bad_inputs(fn, override, match):
    good = _good()
    kwargs = dict(x_q=good["x_q"][:, :, 0], conv_state=torch.zeros(2, 4, 2, dtype=torch.int8),
                  x_scale=good["x_scale"], weight=good["weight"], bias=good["bias"], out_scale=good["out_scale"])
    kwargs.update(override)
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
