"""Tests for the fused Hadamard transform + int8 or e4m3 quantize kernels (quamba_fx.kernels.hadamard).

Run on CPU with the Triton interpreter:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest tests/test_kernel_hadamard.py -q

Without the interpreter, kernel tests run on CUDA when present and are skipped otherwise; reference
and validation tests always run. Kernel and reference sum the same exact +-x terms in different
orders, so (see the module docstring) the fp32 transform is compared at 1e-5 of the row's scale and
int8 results may differ by one step on rare .5 boundaries; integer-valued inputs, whose sums are
exact, must agree bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import hadamard
from quamba_fx.kernels.hadamard import (
    hadamard_quantize,
    hadamard_quantize_fp8,
    hadamard_quantize_fp8_reference,
    hadamard_quantize_reference,
    hadamard_transform_reference,
    hadamard_transform_triton,
)
from quamba_fx.quant.hadamard import _decompose, hadamard_matrix

from .kernel_support import DEVICE, assert_fp8_close, needs_kernel, reference_calls

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Sizes exercising every kernel path (see _mode): powers of two (no dense factor), tensor-core
# dense factors (M_PAD and P >= 16; several rows packed per tile, e.g. 5 x 12 for 192, 3 x 20 for
# 320, or one, 28 in 32 for 448, 36 in 64 for 576) and the FMA fallback (P < 16, or M_PAD > 64 as for 68 * 16).
SMALL_SIZES = [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 40, 44, 48, 64, 96, 144, 160, 192, 320, 384, 448, 576, 640, 1088]
MAMBA_SIZES = [1536, 2048, 2560, 3072, 4096, 5120]  # d_inner of the 130m ... 2.8b models
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _mode(n: int) -> int:
    bases, k = _decompose(n)
    m = math.prod(bases)
    return hadamard._dense_mode(m, 1 << (m - 1).bit_length(), 1 << k)


def assert_transform_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """|got - want| <= 1e-5 * (|want| + rms(row)): rounding-level, relative to the output's scale."""
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape and got.is_contiguous()
    got, want = got.cpu(), want.cpu()
    rms = want.pow(2).mean(-1, keepdim=True).sqrt()
    err = (got - want).abs() / (want.abs() + rms + 1e-30)
    assert float(err.max()) <= 1e-5, f"max relative error {float(err.max()):.3g}"


def assert_int8_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """At most one step apart, on at most 0.1% of the elements (+1): .5 boundaries only."""
    assert got.dtype == want.dtype == torch.int8
    assert got.shape == want.shape and got.is_contiguous()
    diff = (got.cpu().int() - want.cpu().int()).abs()
    n_diff = int((diff != 0).sum())
    msg = f"{n_diff} of {diff.numel()} int8 values differ, max |diff| {int(diff.max()) if diff.numel() else 0}"
    assert n_diff == 0 or int(diff.max()) <= 1, msg
    assert n_diff <= 1 + diff.numel() // 1000, msg


def fp8_scale_for(y: torch.Tensor, factor: float, device: str) -> torch.Tensor:
    """absmax(y) / 448 * factor: factor < 1 saturates the largest values."""
    return (y.abs().amax().float().clamp_min(1e-6) / 448 * factor).reshape(()).to(device)


def make_x(gen: torch.Generator, lead: tuple, n: int, dtype: torch.dtype, layout: str, device: str) -> torch.Tensor:
    """A `[*lead, n]` tensor in one of several memory layouts, with a few outlier channels."""
    def randn(*shape):
        v = torch.randn(*shape, generator=gen)
        v[..., : max(1, n // 16)] *= 10
        return v.to(dtype)

    if layout == "contiguous":
        x = randn(*lead, n)
    elif layout == "row_stride":  # rows of a wider buffer, e.g. one half of a [.., 2n] projection
        x = randn(*lead, 2 * n)[..., :n]
    elif layout == "transposed":  # leading dims that do not collapse into one row stride
        x = randn(*reversed(lead), n).transpose(0, -2) if len(lead) > 1 else randn(*lead, n)
    else:  # "every_other": strided rows and strided leading dims
        x = randn(*lead[:-1], 2 * lead[-1], n)[..., ::2, :]
    return x.to(device)


def scale_for(y: torch.Tensor, factor: float, device: str) -> torch.Tensor:
    """absmax(y) / 127 * factor: factor < 1 saturates the largest values."""
    return (y.abs().amax().float().clamp_min(1e-6) / 127 * factor).reshape(()).to(device)


@st.composite
def cases(draw):
    n = draw(st.sampled_from(SMALL_SIZES))
    rows = draw(st.integers(1, 20))
    lead = draw(st.sampled_from([(rows,), (1, rows), (2, (rows + 1) // 2), (rows, 1)]))
    return dict(
        n=n, lead=lead,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "row_stride", "transposed", "every_other"])),
        factor=draw(st.sampled_from([0.3, 0.7, 1.0, 2.0])),
        scale_shape=draw(st.sampled_from([(), (1,)])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ---------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------


def test_sizes_cover_every_kernel_path():
    assert {_mode(n) for n in SMALL_SIZES} == {0, 1, 2}
    assert {_mode(n) for n in MAMBA_SIZES} == {0, 1}


@needs_kernel
@settings(max_examples=25, **SETTINGS)
@given(case=cases())
def test_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_x(gen, case["lead"], case["n"], case["dtype"], case["layout"], DEVICE)
    y = hadamard_transform_triton(x)
    y_ref = hadamard_transform_reference(x)
    assert y.shape == x.shape
    assert_transform_close(y, y_ref)
    scale = scale_for(y_ref, case["factor"], DEVICE).reshape(case["scale_shape"])
    q = hadamard_quantize(x, scale)
    q_ref = hadamard_quantize_reference(x, scale)
    assert q.shape == x.shape
    assert_int8_close(q, q_ref)
    if case["factor"] < 1:
        assert int(q.int().abs().max()) >= 127, "the scale should saturate some values"


@needs_kernel
@settings(max_examples=15, **SETTINGS)
@given(case=cases())
def test_fp8_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = make_x(gen, case["lead"], case["n"], case["dtype"], case["layout"], DEVICE)
    scale = fp8_scale_for(hadamard_transform_reference(x), case["factor"], DEVICE).reshape(case["scale_shape"])
    q = hadamard_quantize_fp8(x, scale)
    assert q.shape == x.shape
    assert_fp8_close(q, hadamard_quantize_fp8_reference(x, scale))
    if case["factor"] < 1:
        assert float(q.float().abs().max()) == 448.0, "the scale should saturate some values"


def test_packing_fills_the_tensor_core_tile():
    """Rows per tile for the tensor-core path: the densest power-of-two tile of at most 64 rows."""
    assert hadamard._packing(20, 256) == (3, 64)  # 5120: 60 live rows of 64
    assert hadamard._packing(12, 128) == (5, 64)  # 1536
    assert hadamard._packing(28, 16) == (1, 32)  # 2 x 28 in 64 is no denser: the smaller tile
    assert hadamard._packing(36, 16) == (1, 64)
    assert hadamard._packing(20, 1024) == (1, 32)  # 3 rows would exceed _PACKED_MAX_TILE


def test_calls_with_fewer_packed_tiles_than_programs_use_one_row_tiles():
    """Short calls (decode steps, short prompts) run one row a tile when packing would leave SMs
    idle; the interpreter (programs = 1) packs whenever a tile's worth of rows exists."""
    assert hadamard._packing_for(1, 20, 32, 256, 1) == (1, 32)
    assert hadamard._packing_for(2, 20, 32, 256, 1) == (1, 32)
    assert hadamard._packing_for(3, 20, 32, 256, 1) == (3, 64)
    assert hadamard._packing_for(16, 20, 32, 256, 132) == (1, 32)
    assert hadamard._packing_for(128, 20, 32, 256, 132) == (1, 32)
    assert hadamard._packing_for(393, 20, 32, 256, 132) == (1, 32)  # 131 packed tiles
    assert hadamard._packing_for(394, 20, 32, 256, 132) == (3, 64)  # 132, the last one short
    assert hadamard._packing_for(2048, 20, 32, 256, 132) == (3, 64)
    assert hadamard._packing_for(16384, 12, 16, 128, 132) == (5, 64)
    x = torch.randn(1, 1, 5120, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(0.05)
    got = hadamard.hadamard_quantize(x, scale)
    want = hadamard.hadamard_quantize_reference(x, scale)
    assert (got.int() - want.int()).abs().max() <= 1


def test_schedule_of_the_packed_kernel(monkeypatch):
    """Grid and pipelining depth on CUDA (the interpreter always uses 3 programs, 1 stage)."""
    monkeypatch.setattr(hadamard, "_INTERPRET", False)
    monkeypatch.setattr(hadamard, "sm_count", lambda device: 132)
    dev = torch.device("cuda")
    # 5120 (64 x 256 tile): 2 programs per SM, 3 stages of fp16; fp32 inputs are not pipelined.
    assert hadamard._schedule(3, 5462, 64 * 256, 2, dev) == (264, 3)
    assert hadamard._schedule(3, 5462, 64 * 256, 4, dev) == (264, 1)
    # 1536 / 2560 (64 x 128): 3 per SM; fewer blocks than that: one program each.
    assert hadamard._schedule(5, 3277, 64 * 128, 2, dev) == (396, 3)
    assert hadamard._schedule(5, 100, 64 * 128, 2, dev) == (100, 3)
    # Unpacked tiles keep one program per row, no pipelining.
    assert hadamard._schedule(1, 1000, 32 * 512, 2, dev) == (1000, 1)
    monkeypatch.setattr(hadamard, "_INTERPRET", True)
    assert hadamard._schedule(3, 10, 64 * 256, 2, dev) == (3, 1)


@needs_kernel
@pytest.mark.parametrize("n,rows", [(192, 11), (320, 7), (448, 5), (576, 4)])
def test_packed_blocks_and_partial_last_block(n, rows):
    """Every row of every block, the last one partial, through the persistent loop (under the
    interpreter 3 programs, so each takes several blocks), against the reference; rows of one tile
    must not mix (the block-diagonal dense factor)."""
    gen = torch.Generator().manual_seed(rows)
    x = make_x(gen, (rows,), n, torch.float16, "contiguous", DEVICE)
    x[rows // 2] = 0  # a zero row between non-zero ones stays zero
    y = hadamard_transform_triton(x)
    assert_transform_close(y, hadamard_transform_reference(x))
    assert not y[rows // 2].any()
    scale = scale_for(y, 0.9, DEVICE)
    assert_int8_close(hadamard_quantize(x, scale), hadamard_quantize_reference(x, scale))


@needs_kernel
@pytest.mark.parametrize("n", MAMBA_SIZES)
def test_mamba_sizes(n):
    gen = torch.Generator().manual_seed(n)
    # A [B, L, D] view of a wider buffer, as the scan output may be.
    x = make_x(gen, (2, 2), n, torch.float16, "row_stride", DEVICE)
    y_ref = hadamard_transform_reference(x)
    assert_transform_close(hadamard_transform_triton(x), y_ref)
    scale = scale_for(y_ref, 0.5, DEVICE)
    assert_int8_close(hadamard_quantize(x, scale), hadamard_quantize_reference(x, scale))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_largest_size_other_dtypes(dtype):
    """5120 (Mamba-2.8b) through the bf16 and the exact three-way split of fp32 inputs."""
    gen = torch.Generator().manual_seed(7)
    x = make_x(gen, (3,), 5120, dtype, "contiguous", DEVICE)
    if dtype == torch.float32:  # values over many binades: every bit of the split matters
        x = x * torch.logspace(-6, 6, 5120, device=DEVICE)
    y_ref = hadamard_transform_reference(x)
    assert_transform_close(hadamard_transform_triton(x), y_ref)
    scale = scale_for(y_ref, 0.8, DEVICE)
    assert_int8_close(hadamard_quantize(x, scale), hadamard_quantize_reference(x, scale))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 8, 12, 24, 96, 192, 320, 1088, 1536, 2560])
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_inputs_are_exact(n, dtype):
    """Small integers make every partial sum exact in fp32 (also in the tensor cores), whatever the
    order; both sides then multiply by the same fp32 1/sqrt(n): results must be bit-identical."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-8, 9, (3, n), generator=gen).to(dtype).to(DEVICE)
    y = hadamard_transform_triton(x)
    y_ref = hadamard_transform_reference(x)
    assert torch.equal(y.cpu(), y_ref.cpu())
    scale = scale_for(y_ref, 0.6, DEVICE)
    assert torch.equal(hadamard_quantize(x, scale).cpu(), hadamard_quantize_reference(x, scale).cpu())


@needs_kernel
@pytest.mark.parametrize("n", [12, 64, 192, 2560])
def test_matches_explicit_matrix(n):
    """Against x @ H.T in float64 with H = hadamard_matrix(n), independently of the reference op."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, n, generator=gen)
    want = (x.double() @ hadamard_matrix(n, dtype=torch.float64).T).float()
    assert_transform_close(hadamard_transform_triton(x.to(DEVICE)), want)


@needs_kernel
def test_kernel_path_is_taken(monkeypatch):
    """Guards the comparisons above: the entry points must not fall back to the references."""
    def boom(*args, **kwargs):
        raise AssertionError("entry point fell back to the reference")

    monkeypatch.setattr(hadamard, "hadamard_quantize_reference", boom)
    monkeypatch.setattr(hadamard, "hadamard_transform_reference", boom)
    x = torch.randn(2, 24, device=DEVICE)
    hadamard_quantize(x, torch.tensor(0.1, device=DEVICE))
    hadamard_transform_triton(x)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    calls = reference_calls(monkeypatch, hadamard, "hadamard_quantize_reference")
    x = torch.randn(2, 12)
    q = hadamard_quantize(x, torch.tensor(0.05))
    assert calls == [1] and q.dtype == torch.int8


@needs_kernel
def test_scale_changed_in_place_takes_effect():
    gen = torch.Generator().manual_seed(1)
    x = make_x(gen, (3,), 192, torch.float16, "contiguous", DEVICE)
    scale = torch.tensor([0.05], device=DEVICE)
    first = hadamard_quantize(x, scale)
    scale.fill_(0.2)
    second = hadamard_quantize(x, scale)
    assert not torch.equal(first, second)
    assert_int8_close(second, hadamard_quantize_reference(x, scale))


@needs_kernel
def test_empty_rows():
    x = torch.empty(0, 3, 64, device=DEVICE)
    assert hadamard_quantize(x, torch.tensor(1.0, device=DEVICE)).shape == (0, 3, 64)
    assert hadamard_transform_triton(x).shape == (0, 3, 64)


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_ties_round_half_to_even(use_kernel):
    """Exact .5 quotients, independent of the reference: n = 1 is the identity, and for n = 4,
    x = (v, 0, 0, 0) gives y = (v/2, v/2, v/2, v/2) exactly."""
    device = DEVICE if use_kernel else "cpu"
    fn = hadamard_quantize if use_kernel else hadamard_quantize_reference
    v = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -127.5, 200.0, -300.0])
    got = fn(v[:, None].to(device), torch.tensor(1.0, device=device))
    expected = [max(-128, min(127, round(float(t)))) for t in v]  # Python's round is half-to-even
    assert got.cpu().view(-1).tolist() == expected
    x4 = torch.zeros(v.numel(), 4)
    x4[:, 0] = 2 * v
    got4 = fn(x4.to(device), torch.tensor(1.0, device=device))
    assert got4.cpu().tolist() == [[e] * 4 for e in expected]


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _x(n=24, dtype=torch.float32):
    return torch.zeros(2, n, dtype=dtype)


QUANT_ERRORS = [
    (dict(x=_x(10)), r"no Hadamard matrix construction for n=10.*nearest supported sizes: 8 and 12"),
    (dict(x=_x(6)), r"n=6.*nearest supported sizes: 4 and 8"),
    (dict(x=_x(0)), r"no Hadamard matrix construction for n=0"),
    (dict(x=torch.zeros(2, 24, dtype=torch.int8)), r"x must be float16, bfloat16 or float32, got torch.int8"),
    (dict(x=_x(24, torch.float64)), r"x must be float16, bfloat16 or float32, got torch.float64"),
    (dict(x=torch.tensor(1.0)), r"at least one dim"),
    (dict(x=[1.0, 2.0]), r"x must be a torch.Tensor, got list"),
    (dict(scale=0.1), r"scale must be a 0-dim or 1-element float32 tensor .*got float"),
    (dict(scale=torch.tensor(0.1, dtype=torch.float64)), r"scale must be a 0-dim or 1-element float32 tensor, got torch.float64"),
    (dict(scale=torch.tensor([0.1, 0.2])), r"scale must be .*of shape \(2,\)"),
]


@pytest.mark.parametrize("fn", [hadamard_quantize, hadamard_quantize_reference, hadamard_quantize_fp8,
                                hadamard_quantize_fp8_reference])
@pytest.mark.parametrize("override,match", QUANT_ERRORS)
def test_quantize_rejects_bad_inputs(fn, override, match):
    kwargs = {"x": _x(), "scale": torch.tensor(0.1), **override}
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


@pytest.mark.parametrize("fn", [hadamard_transform_triton, hadamard_transform_reference])
@pytest.mark.parametrize("x,match", [
    (_x(10), r"nearest supported sizes: 8 and 12"),
    (torch.zeros(3, dtype=torch.int32), r"x must be float16, bfloat16 or float32"),
])
def test_transform_rejects_bad_inputs(fn, x, match):
    with pytest.raises(ValueError, match=match):
        fn(x)


@needs_kernel
def test_rows_wider_than_the_kernel_takes_run_the_reference(monkeypatch):
    """One rule for every entry point: past MAX_N the reference computes the same function."""
    monkeypatch.setattr(hadamard, "MAX_N", 32)
    monkeypatch.setattr(hadamard, "_launch", lambda *a, **k: pytest.fail("the kernel ran past MAX_N"))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    scale = torch.tensor(0.05, device=DEVICE)
    assert torch.equal(hadamard_quantize(x, scale), hadamard.hadamard_quantize_reference(x, scale))
    assert torch.equal(hadamard.hadamard_quantize_fp8(x, scale).view(torch.int8),
                       hadamard_quantize_fp8_reference(x, scale).view(torch.int8))
    assert torch.equal(hadamard.hadamard_transform_triton(x), hadamard_transform_reference(x))
    assert torch.equal(hadamard.hadamard_rotate_op(x), torch.ops.quamba.hadamard(x))


def test_scale_device_mismatch_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match=r"scale is on cpu but x is on cuda"):
        hadamard_quantize(_x().cuda(), torch.tensor(0.1))


# ---------------------------------------------------------------------------------------------
# float8 e4m3 output (hadamard_quantize_fp8): the int8 tests' cases, e4m3 budget
# ---------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("n,rows", [(192, 11), (320, 7), (448, 5), (576, 4), (1088, 3), (64, 5)])
def test_fp8_packed_blocks_and_every_path(n, rows):
    """The packed kernel's blocks (last one partial), the FMA path (1088) and no dense factor (64)."""
    gen = torch.Generator().manual_seed(rows)
    x = make_x(gen, (rows,), n, torch.float16, "contiguous", DEVICE)
    x[rows // 2] = 0
    scale = fp8_scale_for(hadamard_transform_reference(x), 0.9, DEVICE)
    q = hadamard_quantize_fp8(x, scale)
    assert_fp8_close(q, hadamard_quantize_fp8_reference(x, scale))
    assert not q[rows // 2].float().any()


@needs_kernel
@pytest.mark.parametrize("n", MAMBA_SIZES)
def test_fp8_mamba_sizes(n):
    gen = torch.Generator().manual_seed(n)
    x = make_x(gen, (2, 2), n, torch.float16, "row_stride", DEVICE)
    scale = fp8_scale_for(hadamard_transform_reference(x), 0.5, DEVICE)
    assert_fp8_close(hadamard_quantize_fp8(x, scale), hadamard_quantize_fp8_reference(x, scale))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_largest_size_other_dtypes(dtype):
    gen = torch.Generator().manual_seed(7)
    x = make_x(gen, (3,), 5120, dtype, "contiguous", DEVICE)
    if dtype == torch.float32:
        x = x * torch.logspace(-6, 6, 5120, device=DEVICE)
    scale = fp8_scale_for(hadamard_transform_reference(x), 0.8, DEVICE)
    assert_fp8_close(hadamard_quantize_fp8(x, scale), hadamard_quantize_fp8_reference(x, scale))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 8, 12, 24, 96, 192, 320, 1088, 1536, 2560])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_integer_inputs_are_exact(n, dtype):
    """Exact partial sums (see test_integer_inputs_are_exact): the e4m3 codes must be identical."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-8, 9, (3, n), generator=gen).to(dtype).to(DEVICE)
    scale = fp8_scale_for(hadamard_transform_reference(x), 0.6, DEVICE)
    got = hadamard_quantize_fp8(x, scale).cpu().view(torch.uint8)
    assert torch.equal(got, hadamard_quantize_fp8_reference(x, scale).cpu().view(torch.uint8))


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_fp8_ties_subnormals_and_saturation(use_kernel):
    """Exact e4m3 midpoints (ties to even), subnormal ones, saturation and -0.0, independent of the
    reference: n = 1 is the identity, and x = (2v, 0, 0, 0) gives y = (v, v, v, v) for n = 4."""
    device = DEVICE if use_kernel else "cpu"
    fn = hadamard_quantize_fp8 if use_kernel else hadamard_quantize_fp8_reference
    v = torch.tensor([1.0625, 1.1875, -1.1875, 2.0**-10, 3 * 2.0**-10, 464.0, -0.0, -2.0**-11, 1000.0, -1e30])
    expected = [1.0, 1.25, -1.25, 0.0, 2.0**-8, 448.0, -0.0, -0.0, 448.0, -448.0]
    want = torch.tensor(expected).to(torch.float8_e4m3fn).view(torch.uint8)
    got = fn(v[:, None].to(device), torch.tensor(1.0, device=device))
    assert torch.equal(got.cpu().view(torch.uint8).view(-1), want)
    keep = v != 0  # the butterfly's -0 + 0 is +0: a -0.0 row does not survive n = 4
    x4 = torch.zeros(int(keep.sum()), 4)
    x4[:, 0] = 2 * v[keep]
    got4 = fn(x4.to(device), torch.tensor(1.0, device=device)).cpu().view(torch.uint8)
    assert torch.equal(got4, want[keep][:, None].expand(-1, 4))


@needs_kernel
def test_fp8_kernel_path_is_taken_and_scale_is_read_at_run_time(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = make_x(gen, (3,), 192, torch.float16, "contiguous", DEVICE)
    scale = torch.tensor([0.05], device=DEVICE)
    want_first = hadamard_quantize_fp8_reference(x, scale)

    def boom(*args, **kwargs):
        raise AssertionError("entry point fell back to the reference")

    monkeypatch.setattr(hadamard, "hadamard_quantize_fp8_reference", boom)
    first = hadamard_quantize_fp8(x, scale)
    scale.fill_(0.2)
    second = hadamard_quantize_fp8(x, scale)
    monkeypatch.undo()
    assert_fp8_close(first, want_first)
    assert_fp8_close(second, hadamard_quantize_fp8_reference(x, scale))
    assert hadamard_quantize_fp8(torch.empty(0, 3, 64, device=DEVICE), scale).shape == (0, 3, 64)


def test_fp8_cpu_without_interpreter_uses_reference(monkeypatch):
    calls = reference_calls(monkeypatch, hadamard, "hadamard_quantize_fp8_reference")
    q = hadamard_quantize_fp8(torch.randn(2, 12), torch.tensor(0.05))
    assert calls == [1] and q.dtype == torch.float8_e4m3fn


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_rotation_can_be_returned_in_half_precision_by_the_kernel_itself(dtype):
    x = torch.randn(3, 5, 160, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    want = hadamard_transform_triton(x)  # fp32
    got = hadamard_transform_triton(x.half(), out_dtype=dtype)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, hadamard_transform_triton(x.half()).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    rotated = torch.ops.quamba.hadamard_rotate(x.half(), dtype)
    assert rotated.dtype == dtype and torch.equal(rotated, got)
    with pytest.raises(ValueError, match="out_dtype must be"):
        hadamard_transform_triton(x, out_dtype=torch.int8)
