"""Tests for the kernels' fp32 rounding primitives (quamba_fx.kernels.rounding), bit for bit.

    TRITON_INTERPRET=1 python -m pytest tests/test_kernel_rounding.py -q

`fma_rn` is checked against exact rational arithmetic rounded to fp32, on the cases where two
roundings and naive float64 emulation give other bits; `quantize_rn` against torch's IEEE division.
Under the interpreter this checks the emulation; on CUDA, the hardware FMA.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from quamba_fx.kernels.rounding import fma_rn, quantize_e4m3_rn, quantize_rn

from .kernel_support import DEVICE, needs_kernel

BLOCK = 1024


@triton.jit
def _fma_block_kernel(a_ptr, b_ptr, c_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, fma_rn(a, b, c), mask=mask)


@triton.jit
def _quantize_block_kernel(y_ptr, scale_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, quantize_rn(y, tl.load(scale_ptr)), mask=mask)


def run_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    out = torch.empty(a.numel(), dtype=torch.float32, device=DEVICE)
    _fma_block_kernel[(triton.cdiv(a.numel(), BLOCK),)](a.to(DEVICE), b.to(DEVICE), c.to(DEVICE), out, a.numel(),
                                                        BLOCK=BLOCK)
    return out.cpu()


def round_to_fp32(x: Fraction) -> np.float32:
    """The fp32 nearest to the exact rational x, ties to even (finite results only)."""
    guess = np.float32(float(x))  # within an ulp: float() and the cast each round once
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]

    def key(v: np.float32):
        return abs(Fraction(float(v)) - x), int(np.array(v).view(np.int32)) & 1  # nearest, then even

    return min(candidates, key=key)


def exact_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    want = [round_to_fp32(Fraction(x) * Fraction(y) + Fraction(z))
            for x, y, z in zip(a.double().tolist(), b.double().tolist(), c.double().tolist())]
    return torch.tensor(np.array(want, dtype=np.float32))


def bits(t: torch.Tensor) -> list:
    return t.view(torch.int32).tolist()


@needs_kernel
def test_fma_rn_rounds_once_where_two_roundings_differ():
    # (1 + 2**-12)**2 - (1 + 2**-11) = 2**-24 exactly: rounding the product first loses it.
    # 2**-25 * (1 - 2**-46) + (1 - 2**-24) = 1 - 2**-25 - 2**-71, just below the midpoint between
    # 1 - 2**-24 and 1: float64 rounds it onto the midpoint, whose tie then goes to 1.0 (double
    # rounding); the single rounding gives 1 - 2**-24. Negated, the same on the other side.
    a = torch.tensor([1 + 2**-12, 2**-12 * (1 - 2**-23), -(2**-12) * (1 - 2**-23)], dtype=torch.float32)
    b = torch.tensor([1 + 2**-12, 2**-13 * (1 + 2**-23), 2**-13 * (1 + 2**-23)], dtype=torch.float32)
    c = torch.tensor([-(1 + 2**-11), 1 - 2**-24, -(1 - 2**-24)], dtype=torch.float32)
    got = run_fma(a, b, c)
    assert got.tolist() == [2**-24, 1 - 2**-24, -(1 - 2**-24)]
    assert bits(got) == bits(exact_fma(a, b, c))


@needs_kernel
def test_fma_rn_matches_exact_arithmetic():
    """Random triples over many binades, half of them with a * b and c cancelling to a few bits."""
    gen = torch.Generator().manual_seed(0)
    n = 4000

    def rand():
        mant = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
        sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        return (sign * mant * 2.0 ** torch.randint(-40, 40, (n,), generator=gen)).float()

    a, b, c = rand(), rand(), rand()
    cancel = torch.arange(n) % 2 == 0
    nudge = 1 + (torch.randint(-8, 9, (n,), generator=gen) * 2.0**-23)
    c[cancel] = (-(a.double() * b.double()) * nudge).float()[cancel]
    assert bits(run_fma(a, b, c)) == bits(exact_fma(a, b, c))


@needs_kernel
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy: 3e38 * 3e38 in fp32
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: 0 * inf
def test_fma_rn_non_finite():
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([inf, 1.0, 3e38, 0.0, nan], dtype=torch.float32)
    b = torch.tensor([2.0, 1.0, 3e38, inf, 1.0], dtype=torch.float32)
    c = torch.tensor([1.0, -inf, 0.0, 1.0, 1.0], dtype=torch.float32)
    got = run_fma(a, b, c)
    assert got[:3].tolist() == [inf, -inf, inf]
    assert got[3:].isnan().all()


@needs_kernel
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, for the +-3e38 inputs
@pytest.mark.parametrize("scale", [1.0, 0.0371, 3.3e-4, 7.77, 1e-8, 0.1, 1.0e30, 0.013717, 0.0191])
def test_quantize_step_matches_ieee_division(scale):
    """The kernels' quantize step (reciprocal product + one FMA correction) against torch's IEEE
    division, bit for bit, on quotients within a few ulps of every .5 boundary, random ones and
    overflowing ones: a wrong correctly-rounded quotient would flip a value at a boundary."""
    s = torch.tensor(scale, dtype=torch.float32)
    targets = torch.arange(-130, 131, dtype=torch.float64) + 0.5
    near = (targets * scale).float()
    nudged = [near]
    for _ in range(4):  # up to 4 ulps on each side
        nudged = [torch.nextafter(nudged[0], torch.tensor(-float("inf")))] + nudged
        nudged = nudged + [torch.nextafter(nudged[-1], torch.tensor(float("inf")))]
    rand = (torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 300 - 150) * scale
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3e38, -3e38, 1e-45])
    # The saturation bounds the kernel clamps y to, -128 * scale and RN(127 * scale), +-4 ulps.
    edges = [(torch.tensor([-128.0, 127.0], dtype=torch.float64) * scale).float()]
    for _ in range(4):
        edges = [torch.nextafter(edges[0], torch.tensor(-float("inf")))] + edges
        edges = edges + [torch.nextafter(edges[-1], torch.tensor(float("inf")))]
    y = torch.cat(nudged + edges + [rand.float(), special])
    want = torch.round(torch.clamp(y / s, -128, 127)).to(torch.int8)
    out = torch.empty(y.numel(), dtype=torch.int8, device=DEVICE)
    _quantize_block_kernel[(triton.cdiv(y.numel(), BLOCK),)](y.to(DEVICE), s.to(DEVICE), out, y.numel(), BLOCK=BLOCK)
    assert torch.equal(out.cpu(), want)


# ---------------------------------------------------------------------------------------------
# quantize_e4m3_rn: against quamba_fx.quant.fp8.quantize_fp8, bit for bit
# ---------------------------------------------------------------------------------------------


@triton.jit
def _quantize_e4m3_block_kernel(y_ptr, scale_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, quantize_e4m3_rn(y, tl.load(scale_ptr)), mask=mask)


def run_e4m3(y: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32, device=DEVICE)
    out = torch.empty(y.numel(), dtype=torch.float8_e4m3fn, device=DEVICE)
    _quantize_e4m3_block_kernel[(triton.cdiv(y.numel(), BLOCK),)](y.to(DEVICE), s, out, y.numel(), BLOCK=BLOCK)
    return out.cpu()


def e4m3_codes(t: torch.Tensor) -> list:
    return t.view(torch.uint8).tolist()


def nudged(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """x and its fp32 neighbours up to `ulps` away on each side."""
    out, lo, hi = [x], x, x
    for _ in range(ulps):
        lo = torch.nextafter(lo, torch.tensor(-float("inf")))
        hi = torch.nextafter(hi, torch.tensor(float("inf")))
        out += [lo, hi]
    return torch.cat(out)


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value and every midpoint between neighbours (the ties), as fp64."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    values = torch.unique(codes[~codes.isnan()])
    mids = (values[1:] + values[:-1]) / 2
    return torch.cat([values, mids, torch.tensor([464.0, -464.0, 500.0, 2.0**-10, 2.0**-11])])


def assert_matches_quantize_fp8(y: torch.Tensor, scale: float) -> None:
    from quamba_fx.quant.fp8 import quantize_fp8

    want = quantize_fp8(y, torch.tensor(scale, dtype=torch.float32))
    got = run_e4m3(y, scale)
    nan = want.float().isnan()
    assert torch.equal(got.float().isnan(), nan)
    assert e4m3_codes(got[~nan]) == e4m3_codes(want[~nan])


@needs_kernel
def test_e4m3_rounding_of_every_value_and_tie():
    """scale 1: every e4m3 value, every midpoint (ties to even, subnormal ones included) and the fp32
    values 1-3 ulps either side of them, both signs, saturation, zeros."""
    y = nudged(e4m3_grid().float(), 3)
    y = torch.cat([y, -y, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, 3e38, -3e38])])
    assert_matches_quantize_fp8(y, 1.0)


@needs_kernel
def test_e4m3_negative_zero_and_tiny_negatives_keep_their_sign():
    got = run_e4m3(torch.tensor([-0.0, -2.0**-11, -2.0**-10, 0.0]), 1.0)
    assert e4m3_codes(got) == [0x80, 0x80, 0x80, 0x00]


@needs_kernel
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, for the +-3e38 inputs
@pytest.mark.parametrize("scale", [1.0, 0.0371, 3.3e-4, 7.77, 1e-8, 0.1, 1.0e30, 0.013717, 0.0191, 2.0**-90,
                                   2.0**118, 0.00223214])
def test_e4m3_quotients_match_ieee_division(scale):
    """y = (grid point) * scale +-4 ulps: the quotient's correct rounding decides every case close to
    a tie; random quotients over the whole range, saturating ones and non-finite inputs."""
    targets = (e4m3_grid() * scale).float()
    gen = torch.Generator().manual_seed(1)
    rand = (torch.rand(20000, generator=gen, dtype=torch.float64) * 2 - 1) * 2.0 ** torch.randint(
        -14, 10, (20000,), generator=gen)
    edges = (torch.tensor([448.0, -448.0], dtype=torch.float64) * scale).float()
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3e38, -3e38, 1e-45, float("nan")])
    y = torch.cat([nudged(targets, 4), -nudged(targets, 4), nudged(edges, 4), (rand * scale).float(), special])
    assert_matches_quantize_fp8(y, scale)


@needs_kernel
def test_e4m3_many_random_scales():
    gen = torch.Generator().manual_seed(2)
    for scale in (2.0 ** (torch.rand(40, generator=gen, dtype=torch.float64) * 60 - 40)).float().tolist():
        y = (torch.randn(3000, generator=gen, dtype=torch.float64) * 300 * scale
             * 2.0 ** torch.randint(-12, 2, (3000,), generator=gen)).float()
        assert_matches_quantize_fp8(torch.cat([y, nudged((e4m3_grid() * scale).float(), 1)]), scale)
