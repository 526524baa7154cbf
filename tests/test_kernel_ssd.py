"""The Mamba-2 scan kernel (kernels/ssd.py) against the PyTorch reference, under the Triton interpreter."""

from __future__ import annotations

import json
import math

import hypothesis.strategies as st
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings

from quamba_fx.kernels import ssd
from quamba_fx.errors import InputError
from quamba_fx.kernels.dispatch import INTERPRET
from quamba_fx.ssd_reference import ssd_scan_reference

from .benchmark_scripts import BENCHMARKS, load_benchmark, run_without_interpreter

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="the kernel runs on CUDA or under TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item() / max(1e-6, expected.abs().max().item())


_SCAN_PROBLEMS = dict(
    batch=st.integers(1, 2), length=st.integers(1, 80), heads=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(1, 70), groups=st.sampled_from([1, 2]), state=st.integers(1, 40),
    dt_max=st.sampled_from([math.inf, 0.2]), with_state=st.booleans(), with_d=st.booleans(),
    chunk=st.sampled_from([3, 16, 24, 128]), seed=st.integers(0, 2**16))


# Interpreted, an example costs up to seconds: the fast suite takes a dozen, CI's slow run more.
@given(**_SCAN_PROBLEMS)
@settings(max_examples=12, deadline=None)
def test_kernel_matches_the_reference(batch, length, heads, head_dim, groups, state, dt_max, with_state, with_d,
                                      chunk, seed):
    check_kernel_against_reference(batch, length, heads, head_dim, groups, state, dt_max, with_state, with_d,
                                   chunk, seed)


@pytest.mark.slow
@given(**_SCAN_PROBLEMS)
@settings(max_examples=60, deadline=None)
def test_kernel_matches_the_reference_on_more_problems(batch, length, heads, head_dim, groups, state, dt_max,
                                                       with_state, with_d, chunk, seed):
    check_kernel_against_reference(batch, length, heads, head_dim, groups, state, dt_max, with_state, with_d,
                                   chunk, seed)


def check_kernel_against_reference(batch, length, heads, head_dim, groups, state, dt_max, with_state, with_d,
                                   chunk, seed):
    if heads % groups:
        groups = 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g)
    dt, A = torch.randn(batch, length, heads, generator=g), -torch.rand(heads, generator=g) * 4
    B, C = (torch.randn(batch, length, groups, state, generator=g) for _ in range(2))
    D = torch.randn(heads, generator=g) if with_d else None
    bias = torch.randn(heads, generator=g)
    start = torch.randn(batch, heads, head_dim, state, generator=g) if with_state else None
    args = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (x, dt, A, B, C, D, bias)]
    y, final = ssd.ssd_scan(*args, True, 0.0, dt_max, chunk, initial_state=None if start is None else start.to(DEVICE),
                            return_final_state=True)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, D, bias, True, 0.0, dt_max, chunk, initial_state=start)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and final.shape == final_ref.shape
    # fp32 sums in another order (tiles of the kernels' products), over up to 80 steps and 40
    # states, some cancelling: a few 1e-6 of the magnitude observed.
    assert relative_error(y.cpu(), y_ref) < 5e-5
    assert relative_error(final.cpu(), final_ref) < 5e-5


def test_kernel_reads_strided_slices_of_in_proj_output_in_place():
    # x, B and C are views into the conv output [b, L, d_inner + 2 G N], dt a view into in_proj's.
    torch.manual_seed(0)
    xbc = torch.randn(2, 9, 32 + 2 * 8, device=DEVICE)
    zxbcdt = torch.randn(2, 9, 50, device=DEVICE)
    x = xbc[..., :32].unflatten(-1, (2, 16))
    B, C = xbc[..., 32:40].unflatten(-1, (1, 8)), xbc[..., 40:].unflatten(-1, (1, 8))
    dt, A = zxbcdt[..., -2:], -torch.rand(2, device=DEVICE)
    y = ssd.ssd_scan(x, dt, A, B, C, None, None, True, 0.0, math.inf, 4)
    y_ref, _ = ssd_scan_reference(*(t.cpu() for t in (x, dt, A, B, C)), None, None, True, 0.0, math.inf, 4)
    assert relative_error(y.cpu(), y_ref) < 1e-5


def test_bad_shapes_are_refused_before_launching():
    x = torch.zeros(1, 4, 2, 3, device=DEVICE)
    with pytest.raises(InputError, match="dt must be"):
        ssd.ssd_scan(x, torch.zeros(1, 4, 3, device=DEVICE), -torch.ones(2, device=DEVICE),
                     torch.zeros(1, 4, 1, 5, device=DEVICE), torch.zeros(1, 4, 1, 5, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_take_16_bit_products_and_stay_close(dtype):
    # What an fp16 model's in_proj and conv hand the scan: products in that dtype, sums and the
    # state in fp32. The bound is the dtype's rounding of the weighted terms, not fp32's.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 70, 4, 24, generator=g).to(dtype)
    dt = (torch.randn(2, 70, 4, generator=g) * 0.5).to(dtype)
    A = -torch.rand(4, generator=g) * 4 - 0.5
    B, C = (torch.randn(2, 70, 2, 20, generator=g).to(dtype) for _ in range(2))
    D, bias = torch.randn(4, generator=g), torch.randn(4, generator=g) - 1
    args = [t.to(DEVICE) for t in (x, dt, A, B, C, D, bias)]
    y, final = ssd.ssd_scan(*args, True, 0.0, math.inf, 32, return_final_state=True)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, D, bias, True, 0.0, math.inf, 32)
    tolerance = 1e-2 if dtype == torch.float16 else 4e-2
    assert relative_error(y.cpu(), y_ref) < tolerance
    assert relative_error(final.cpu(), final_ref) < tolerance


def test_fp32_inputs_with_16_bit_products_track_the_reference_at_16_bit_precision():
    # A graph lowered to fp16 hands the scan dequantized fp32 and asks for fp16 products.
    g = torch.Generator().manual_seed(8)
    x, dt = torch.randn(1, 40, 2, 16, generator=g), torch.randn(1, 40, 2, generator=g) * 0.5
    A = -torch.rand(2, generator=g) - 0.5
    B, C = (torch.randn(1, 40, 1, 16, generator=g) for _ in range(2))
    args = [t.to(DEVICE) for t in (x, dt, A, B, C)]
    y_ref, _ = ssd_scan_reference(x, dt, A, B, C, chunk_size=16)
    half = ssd.ssd_scan(*args, chunk_size=16, product_dtype=torch.float16).cpu()
    assert 1e-6 < relative_error(half, y_ref) < 1e-2  # rounded, as an fp16 model's products are
    with pytest.raises(InputError, match="product_dtype"):
        ssd.ssd_scan(*args, product_dtype=torch.int8)


def test_the_chunk_length_orders_sums_but_does_not_change_the_result():
    g = torch.Generator().manual_seed(5)
    x, dt = torch.randn(1, 50, 2, 16, generator=g), torch.randn(1, 50, 2, generator=g)
    A = -torch.rand(2, generator=g)
    B, C = (torch.randn(1, 50, 1, 16, generator=g) for _ in range(2))
    args = [t.to(DEVICE) for t in (x, dt, A, B, C)]
    outputs = [ssd.ssd_scan(*args, None, None, True, 0.0, math.inf, chunk).cpu() for chunk in (1, 7, 16, 50, 256)]
    for y in outputs[1:]:
        assert relative_error(y, outputs[0]) < 1e-5


def _step_inputs(batch, length, heads, head_dim, groups, state, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, length, heads, head_dim, generator=g),
                dt=torch.randn(batch, length, heads, generator=g), A=-torch.rand(heads, generator=g) * 4,
                B=torch.randn(batch, length, groups, state, generator=g),
                C=torch.randn(batch, length, groups, state, generator=g), D=torch.randn(heads, generator=g),
                dt_bias=torch.randn(heads, generator=g))


@given(batch=st.integers(1, 3), length=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]),
       head_dim=st.integers(1, 70), groups=st.sampled_from([1, 2]), state=st.integers(1, 40),
       dt_max=st.sampled_from([math.inf, 0.2]), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_state_update_continues_the_scan_in_place(batch, length, heads, head_dim, groups, state, dt_max, seed):
    if heads % groups:
        groups = 1
    inputs = _step_inputs(batch, length, heads, head_dim, groups, state, seed)
    start = torch.randn(batch, heads, head_dim, state, generator=torch.Generator().manual_seed(seed + 1))
    cache = start.clone().to(DEVICE)
    y = ssd.ssd_state_update(cache, **{k: v.to(DEVICE) for k, v in inputs.items()}, dt_max=dt_max)
    y_ref, final_ref = ssd_scan_reference(**inputs, dt_max=dt_max, chunk_size=1, initial_state=start)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert relative_error(y.cpu(), y_ref) < 1e-5
    assert relative_error(cache.cpu(), final_ref) < 1e-5


def test_a_16_bit_state_is_rounded_once_after_the_steps():
    inputs = _step_inputs(2, 1, 2, 8, 1, 16, seed=9)
    start = torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(10)).half()
    cache = start.clone().to(DEVICE)
    ssd.ssd_state_update(cache, **{k: v.to(DEVICE) for k, v in inputs.items()})
    _, final_ref = ssd_scan_reference(**inputs, initial_state=start.float())
    assert cache.dtype == torch.float16
    assert torch.allclose(cache.cpu().float(), final_ref.half().float(), rtol=1e-3, atol=1e-3)


def test_state_update_refuses_a_state_of_the_wrong_shape():
    inputs = {k: v.to(DEVICE) for k, v in _step_inputs(1, 1, 2, 8, 1, 16, seed=0).items()}
    with pytest.raises(InputError, match="the state must be"):
        ssd.ssd_state_update(torch.zeros(1, 2, 8, 15, device=DEVICE), **inputs)


def test_cached_op_prefills_then_decodes_as_one_long_scan():
    # The prompt through the chunked kernels leaves its final state in the cache; two decode steps
    # then continue from it: together, the scan of the whole sequence.
    inputs = _step_inputs(2, 13, 4, 16, 2, 16, seed=4)
    args = lambda sl: [inputs[k][:, sl].to(DEVICE) for k in ("x", "dt")] + [inputs["A"].to(DEVICE)] + [
        inputs[k][:, sl].to(DEVICE) for k in ("B", "C")] + [inputs["D"].to(DEVICE), inputs["dt_bias"].to(DEVICE)]
    cache = torch.zeros(2, 4, 16, 16, device=DEVICE)
    op = torch.ops.quamba.ssd_scan_triton_cached
    no_scales = [None] * 4
    ys = [op(*args(slice(0, 11)), True, 0.0, math.inf, 4, None, *no_scales, None, cache, False)]
    for t in (11, 12):
        ys.append(op(*args(slice(t, t + 1)), True, 0.0, math.inf, 4, None, *no_scales, None, cache, True))
    y_ref, final_ref = ssd_scan_reference(**inputs, chunk_size=4)
    assert relative_error(torch.cat(ys, dim=1).cpu(), y_ref) < 1e-5
    assert relative_error(cache.cpu(), final_ref) < 1e-5


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_y_comes_in_the_asked_dtype_rounded_once_from_the_fp32_sums(out_dtype):
    # A graph lowered to fp16 asks for fp16 y (half the bytes the gated norm reads); the sums
    # are the fp32 ones, rounded at the store (within one ulp: the interpreter's bf16 cast
    # truncates). Same for a decode step.
    def rounded_from(low, high):
        return low.dtype == out_dtype and bool(((low.float() - high).abs() <= high.abs() * 2.0**-7).all())

    inputs = {k: v.to(DEVICE) for k, v in _step_inputs(2, 21, 4, 16, 2, 16, seed=8).items()}
    y32 = ssd.ssd_scan(**inputs, chunk_size=8, product_dtype=torch.float32)
    y16 = ssd.ssd_scan(**inputs, chunk_size=8, product_dtype=torch.float32, out_dtype=out_dtype)
    assert rounded_from(y16, y32)
    state = torch.randn(2, 4, 16, 16, device=DEVICE)
    step = {k: v[:, :1] if v.dim() > 1 else v for k, v in inputs.items()}
    y_step32 = ssd.ssd_state_update(state.clone(), **step)
    y_step16 = ssd.ssd_state_update(state.clone(), **step, out_dtype=out_dtype)
    assert rounded_from(y_step16, y_step32)
    with pytest.raises(InputError, match="out_dtype"):
        ssd.ssd_scan(**inputs, out_dtype=torch.int8)


def test_the_kernel_op_has_a_fake_and_the_references_result():
    inputs = _step_inputs(1, 9, 2, 8, 1, 16, seed=6)
    args = [inputs[k].to(DEVICE) for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")] + [True, 0.0, math.inf, 4, None]
    torch.library.opcheck(torch.ops.quamba.ssd_scan_triton.default, args)
    expected, _ = ssd_scan_reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args[:-1]])
    assert relative_error(torch.ops.quamba.ssd_scan_triton(*args).cpu(), expected) < 1e-5
    half = args + [None] * 4 + [torch.float16]
    torch.library.opcheck(torch.ops.quamba.ssd_scan_triton.default, half)
    assert torch.ops.quamba.ssd_scan_triton(*half).dtype == torch.float16


@pytest.mark.slow  # 15 s of offline builds on 2 cores; the kernels' own tests are in the fast suite
def test_mamba2_kernels_compile_for_sm90_without_spills_and_multiply_on_tensor_cores():
    # Offline builds in a child process (the interpreter's kernels cannot be compiled), at the
    # tiles mamba2-2.7b runs: what the interpreter cannot show. fp16 products, from fp16 inputs
    # or a lowered graph's fp32 ones, put the three product kernels on wgmma; fp32 products run
    # in IEEE fp32 on CUDA cores.
    output = run_without_interpreter([str(BENCHMARKS / "mamba2_sm90.py")])
    rows = {(build, kernel): [int(v) for v in counts]
            for build, kernel, *counts in (line.split() for line in output.splitlines()[1:])}
    # Four builds of the six SSD kernels and the gated norm (fp16, int8 with per-tensor scales,
    # int8 with per-channel x scales, fp32); the three 16-bit ones also the gated norm fused into
    # the Hadamard quantize (an fp32 lowering keeps the two kernels), whose decode tiles of 32
    # rows are below wgmma's 64 (mma.sync instead).
    assert len(rows) == 31
    products = {"_chunk_cb_kernel", "_chunk_state_kernel", "_chunk_scan_kernel"}
    for (build, kernel), (stores, loads, wgmma, shared) in rows.items():
        assert stores == loads == 0, (build, kernel)
        assert shared <= 232448, (build, kernel)  # sm_90's most a program may ask: more fails to launch
        assert (wgmma > 0) == (build.endswith(":fp16") and kernel in products), (build, kernel)


@pytest.mark.slow  # 23 s on 2 cores; the kernels' own tests are in the fast suite
@pytest.mark.skipif(not INTERPRET, reason="the smoke run is the CPU interpreter's")
def test_the_benchmark_script_runs_its_smoke_rows(tmp_path):
    # benchmarks/ssd.py compares with mamba_ssm on the GPU; this keeps its code paths from rotting.
    script = load_benchmark("ssd.py", "ssd_benchmark")
    before = {kernel: dict(settings) for kernel, settings in ssd.LAUNCH.items()}
    assert script.main(["--smoke", "--json", str(tmp_path / "ssd.json"), "--launch", "scan.num_warps=4,8",
                        "--launch", "state.BLOCK_S=16"]) == 0
    result = json.loads((tmp_path / "ssd.json").read_text())
    assert [(row["batch"], row["L"]) for row in result["prefill"]] == [(1, 40), (2, 24)]
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    for row in result["prefill"]:
        assert row["reference_op_error"] == 0 and row["ours_fp16_error"] < 1e-2 and row["ours_lowered_error"] < 1e-2
        assert row["ours_lowered_channel_error"] < 1e-2
    assert all(row["ours_state_error"] < 1e-2 for row in result["decode"])
    # The sweep: every combination at every shape, ours only, and the settings put back after.
    assert [(row["launch"], row["batch"]) for row in result["launch"]] == [
        (f"scan.num_warps={w}, state.BLOCK_S=16", b) for w in (4, 8) for b in (1, 2)]
    assert all(row["ours_lowered_error"] < 1e-2 and "mamba_ssm_ms" not in row for row in result["launch"])
    assert ssd.LAUNCH == before


@pytest.mark.skipif(not INTERPRET, reason="the smoke run is the CPU interpreter's")
@pytest.mark.parametrize("argv, message", [(["--launch", "scan.warps=4"], "KERNEL.KEY one of"),
                                           (["--launch", "scan.num_warps=four"], "must be integers"),
                                           (["--kernels"], "profiles CUDA kernels")])
def test_the_benchmark_script_refuses_bad_sweeps(argv, message, capsys):
    script = load_benchmark("ssd.py", "ssd_benchmark")
    with pytest.raises(SystemExit):
        script.main(["--smoke", *argv])
    assert message in capsys.readouterr().err


def _int8_inputs(seed: int, per_channel: bool = False):
    """int8 x, dt, B, C (2 groups of 2 heads) with their scales: per tensor, or x's per channel and
    B's and C's per group (as Quamba2 quantizes them)."""
    g = torch.Generator().manual_seed(seed)
    codes = dict(x=torch.randint(-128, 128, (2, 37, 4, 16), generator=g, dtype=torch.int8),
                 dt=torch.randint(-128, 128, (2, 37, 4), generator=g, dtype=torch.int8),
                 B=torch.randint(-128, 128, (2, 37, 2, 16), generator=g, dtype=torch.int8),
                 C=torch.randint(-128, 128, (2, 37, 2, 16), generator=g, dtype=torch.int8))
    if per_channel:  # scales spread over 64x, so that a channel read with another's scale shows
        spread = lambda *shape: 0.001 * 64 ** torch.rand(shape, generator=g)  # noqa: E731
        scales = dict(x=spread(4, 16), dt=torch.tensor(0.01), B=spread(2), C=spread(2))
    else:
        scales = dict(x=torch.tensor(0.02), dt=torch.tensor(0.01), B=torch.tensor(0.03), C=torch.tensor(0.015))
    rest = dict(A=-torch.rand(4, generator=g) * 4, D=torch.randn(4, generator=g), dt_bias=torch.randn(4, generator=g))
    return codes, scales, rest


def _dequantized(codes: dict, scales: dict) -> dict:
    shapes = dict(x=(4, 16), dt=(), B=(2, 1), C=(2, 1))
    return {k: codes[k].float() * (scales[k].reshape(shapes[k]) if scales[k].numel() > 1 else scales[k]) for k in codes}


@pytest.mark.parametrize("product_dtype, per_channel", [(torch.float32, False), (torch.float16, False),
                                                        (torch.float32, True), (torch.float16, True)])
def test_int8_inputs_with_their_scales_equal_the_scan_of_their_dequantized_values(product_dtype, per_channel):
    codes, scales, rest = _int8_inputs(seed=12, per_channel=per_channel)
    dequantized = _dequantized(codes, scales)
    y_ref, final_ref = ssd_scan_reference(**dequantized, **rest, chunk_size=8)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    input_scales = tuple(on(scales[k]) for k in ("x", "dt", "B", "C"))
    y, final = ssd.ssd_scan(on(codes["x"]), on(codes["dt"]), on(rest["A"]), on(codes["B"]), on(codes["C"]),
                            on(rest["D"]), on(rest["dt_bias"]), chunk_size=8, return_final_state=True,
                            product_dtype=product_dtype, input_scales=input_scales)
    # int8 codes are exact in fp16 products; only the decayed weights and the state round there.
    tolerance = 1e-5 if product_dtype == torch.float32 else 1e-2
    assert relative_error(y.cpu(), y_ref) < tolerance and relative_error(final.cpu(), final_ref) < tolerance
    state = torch.zeros(2, 4, 16, 16, device=DEVICE)
    steps = [ssd.ssd_state_update(state, *(on(codes[k][:, t:t + 1]) for k in ("x", "dt")), on(rest["A"]),
                                  *(on(codes[k][:, t:t + 1]) for k in ("B", "C")), on(rest["D"]), on(rest["dt_bias"]),
                                  input_scales=input_scales)
             for t in range(3)]
    y_steps, _ = ssd_scan_reference(**{k: v[:, :3] for k, v in dequantized.items()}, **rest, chunk_size=8)
    assert relative_error(torch.cat(steps, dim=1).cpu(), y_steps) < 1e-5


def test_int8_inputs_need_their_scales_and_float_inputs_none():
    codes, scales, rest = _int8_inputs(seed=13)
    with pytest.raises(InputError, match="need their input_scales"):
        ssd.ssd_scan(codes["x"], codes["dt"], rest["A"], codes["B"], codes["C"])
    with pytest.raises(InputError, match="are four scales"):
        ssd.ssd_scan(codes["x"].float(), codes["dt"], rest["A"], codes["B"], codes["C"],
                     input_scales=tuple(scales.values()))


@pytest.mark.parametrize("which, shape, message", [
    ("x", (4,), r"x's scale must be one value or one per channel \(64\)"),  # per head: no kernel takes it
    ("dt", (4,), "dt's scale must be one value, got shape"),
    ("B", (2, 16), r"B's scale must be one value or one per group \(2\)"),  # per state: no factoring out of C B^T
    ("C", (3,), r"C's scale must be one value or one per group \(2\)"),
])
def test_scales_of_another_granularity_are_refused(which, shape, message):
    codes, scales, rest = _int8_inputs(seed=14)
    scales[which] = torch.full(shape, 0.01)
    with pytest.raises(InputError, match=message):
        ssd.ssd_scan(codes["x"], codes["dt"], rest["A"], codes["B"], codes["C"],
                     input_scales=tuple(scales[k] for k in ("x", "dt", "B", "C")))


@triton.jit
def _widen_kernel(x_ptr, out_ptr, DTYPE: tl.constexpr):
    offs = tl.arange(0, 256)
    widened = ssd._widen(tl.load(x_ptr + offs), DTYPE)
    tl.static_assert(widened.dtype == DTYPE)
    # Stored as fp32 (exact for these values): the interpreter stores bfloat16 tensors wrongly.
    tl.store(out_ptr + offs, widened.to(tl.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_codes_widen_exactly_through_the_bit_trick(dtype):
    # Every int8 value, through the integer add and bitcast that replace I2F in the scan's loads.
    codes = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
    out = torch.empty(256, device=DEVICE)
    _widen_kernel[(1,)](codes, out, DTYPE={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                                           torch.float32: tl.float32}[dtype])
    assert torch.equal(out.cpu(), torch.arange(-128, 128, dtype=torch.float32))
