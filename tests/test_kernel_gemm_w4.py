"""The 4-bit-weight GEMM kernels (kernels/gemm_w4.py) against their references, under the Triton
interpreter on CPU (on CUDA as they are)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import dequant_w4, gemm_w4, gemm_w4_skinny, gemv_w4
from quamba_fx.kernels.dispatch import INTERPRET, use_triton
from quamba_fx.kernels.int4_codes import nibbles, nibbles_x16
from quamba_fx.quant.int4 import (dequantize_weight_int4, quantize_weight_int4, w4_embedding, w4a8_linear,
                                  w4a16_linear)

from .benchmark_scripts import BENCHMARKS, run_without_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def weights(n: int, k: int, group: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    packed, scale = quantize_weight_int4(torch.randn(n, k, generator=generator), group)
    return packed.to(DEVICE), scale.to(DEVICE)


@settings(max_examples=25)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 200), group=st.sampled_from([32, 64, 128]),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 999))
def test_w4a16_gemm_matches_the_reference(m, n, k, group, bias, dtype, seed):
    packed, scale = weights(n, k, group, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    b = torch.randn(n, device=DEVICE) if bias else None
    got = gemm_w4.w4a16_gemm(x, packed, scale, group, b)
    expected = w4a16_linear(x, packed, scale, group, b)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance * (1 + k ** 0.5))


@settings(max_examples=25)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 300), group=st.sampled_from([32, 128]),
       bias=st.booleans(), requant=st.booleans(), seed=st.integers(0, 999))
def test_w4a8_gemm_matches_the_reference(m, n, k, group, bias, requant, seed):
    packed, scale = weights(n, k, group, seed)
    x_q = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.int8).to(DEVICE)
    x_scale = torch.tensor(0.02, device=DEVICE)
    b = torch.randn(n, device=DEVICE) if bias else None
    out_scale = torch.tensor(0.25, device=DEVICE) if requant else None
    got = gemm_w4.w4a8_gemm(x_q, x_scale, packed, scale, group, b, out_scale)
    expected = w4a8_linear(x_q, x_scale, packed, scale, group, b, out_scale)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if requant:  # the group sums add in another order: a quotient at a tie may round the other way
        assert int((got.int() - expected.int()).abs().max()) <= 1
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def w4a8_problem(m: int, n: int, k: int, group: int, bias: bool, requant: bool, seed: int):
    """Random int8 activations, 4-bit weights and per-tensor scales of an `m x n x k` W4A8 Linear."""
    packed, scale = weights(n, k, group, seed)
    x_q = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.int8)
    return dict(x_q=x_q.to(DEVICE), x_scale=torch.tensor(0.02, device=DEVICE), w_packed=packed, w_scale=scale,
                group_size=group, bias=torch.randn(n, device=DEVICE) if bias else None,
                out_scale=torch.tensor(0.25, device=DEVICE) if requant else None)


def assert_w4a8_matches(got: torch.Tensor, problem: dict) -> None:
    expected = w4a8_linear(**problem)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if problem["out_scale"] is not None:  # group sums in another order: a tie may round the other way
        assert int((got.int() - expected.int()).abs().max()) <= 1
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=25)
@given(m=st.integers(1, 64), n=st.integers(1, 150), k=st.integers(1, 400), group=st.sampled_from([64, 128]),
       block_n=st.sampled_from([16, 32, 64]), block_k=st.sampled_from([64, 128]), splits=st.integers(1, 3),
       bias=st.booleans(), requant=st.booleans(), seed=st.integers(0, 999))
def test_the_skinny_w4a8_kernel_matches_the_reference(m, n, k, group, block_n, block_k, splits, bias, requant, seed):
    # Odd K (a half-empty last byte), K steps past K in the last split, splits of no whole step,
    # columns and rows past a tile's edge.
    block_k = min(block_k, group)
    problem = w4a8_problem(m, n, k, group, bias, requant, seed)
    got = gemm_w4.w4a8_gemm(**problem, skinny=(block_n, block_k, splits, 1, 1))
    assert_w4a8_matches(got, problem)


@triton.jit
def _codes_kernel(packed_ptr, out_ptr, PTX: tl.constexpr):
    offs = tl.arange(0, 256)
    packed = tl.load(packed_ptr + offs)
    low, high = nibbles(packed, PTX)
    low16, high16 = nibbles_x16(packed, PTX)
    tl.store(out_ptr + offs, low)
    tl.store(out_ptr + 256 + offs, high)
    tl.store(out_ptr + 512 + offs, low16)
    tl.store(out_ptr + 768 + offs, high16)


def test_the_codes_times_16_are_16_times_the_codes_of_every_byte():
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEVICE)
    out = torch.empty((4, 256), dtype=torch.int8, device=DEVICE)
    _codes_kernel[(1,)](packed, out, PTX=not INTERPRET)
    low, high, low16, high16 = out.cpu().int()
    byte = torch.arange(256)
    assert torch.equal(low, ((byte & 0xF) ^ 8) - 8) and torch.equal(high, ((byte >> 4) ^ 8) - 8)
    assert torch.equal(low16, 16 * low) and torch.equal(high16, 16 * high)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 64), n=st.integers(1, 100), k=st.integers(1, 300), group=st.sampled_from([64, 128]),
       splits=st.integers(1, 2), requant=st.booleans(), seed=st.integers(0, 999))
def test_the_skinny_kernels_two_step_forms_give_the_same_bits(m, n, k, group, splits, requant, seed):
    # One dot over reordered columns or two (even, odd): the same exact int32 sums a step.
    problem = w4a8_problem(m, n, k, group, False, requant, seed)
    outs = []
    for one_dot in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gemm_w4_skinny, "ONE_DOT_A_STEP", one_dot)
            outs.append(gemm_w4.w4a8_gemm(**problem, skinny=(32, 64, splits, 1, 1)))
    assert torch.equal(outs[0], outs[1])


# The skinny kernel's K loop built for sm_90 (benchmarks/sass_loop.py) in a child process: under
# TRITON_INTERPRET=1 the kernels are interpreted functions, which Triton cannot compile. Prints the
# loop's wgmma waits for each rows count and step form.
_COUNT_WAITS = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    from sass_loop import KERNELS, compile_sm90, disassemble, hottest_loop

    module, function, signature, constexprs, multiples, _ = KERNELS["gemm_w4_skinny"]
    for rows in (16, 64):
        for one_dot in (True, False):
            built = compile_sm90(module, function, signature, {**constexprs, "BLOCK_M": rows, "ONE_DOT": one_dot},
                                 multiples, 4, 6)
            print(rows, one_dot, sum("WARPGROUP.DEPBAR" in line for line in hottest_loop(disassemble(built))))
''')


@pytest.mark.slow
def test_the_skinny_kernels_one_dot_step_waits_on_its_wgmmas_once():
    lines = run_without_interpreter(["-c", _COUNT_WAITS, str(BENCHMARKS)]).split("\n")
    assert [line for line in lines if line] == ["16 True 1", "16 False 2", "64 True 1", "64 False 2"]


def test_w4a8_decode_rows_run_the_skinny_kernel_unless_it_is_off(monkeypatch):
    launched = []
    real_launch = gemm_w4_skinny.launch
    monkeypatch.setattr(gemm_w4_skinny, "launch", lambda *a, **kw: launched.append(a[0].shape) or real_launch(*a, **kw))
    assert gemm_w4.W4A8_SKINNY_MAX_M == gemm_w4_skinny.MAX_M  # on by default
    for m, group, runs_it in ((5, 128, True), (64, 128, True), (65, 128, False), (5, 32, False)):
        problem = w4a8_problem(m, 40, 256, group, False, True, m)
        problem["x_q"] = problem["x_q"].reshape(1, m, 256)  # leading dims flatten into rows
        launched.clear()
        assert_w4a8_matches(gemm_w4.w4a8_gemm(**problem), problem)
        assert launched == ([torch.Size([m, 256])] if runs_it else []), (m, group)
    monkeypatch.setattr(gemm_w4, "W4A8_SKINNY_MAX_M", 0)
    problem = w4a8_problem(5, 40, 256, 128, True, False, 7)
    launched.clear()
    assert_w4a8_matches(gemm_w4.w4a8_gemm(**problem), problem)
    assert not launched


def test_skinny_w4a8_configs_and_problems_it_cannot_run_are_refused():
    problem = w4a8_problem(4, 32, 128, 128, False, False, 0)
    for config in ((64, 32, 1, 4, 3), (64, 96, 1, 4, 3)):
        with pytest.raises(ValueError, match="BLOCK_K=.* must be one of"):
            gemm_w4.w4a8_gemm(**problem, skinny=config)
    with pytest.raises(ValueError, match="at most 64 rows"):
        gemm_w4.w4a8_gemm(**w4a8_problem(65, 32, 128, 128, False, False, 0), skinny=(64, 64, 1, 4, 3))
    with pytest.raises(ValueError, match="groups of 64k columns"):
        gemm_w4.w4a8_gemm(**w4a8_problem(4, 32, 128, 32, False, False, 0), skinny=(64, 64, 1, 4, 3))


@pytest.mark.parametrize("k", [256, 104])
def test_one_fp16_row_runs_the_gemv_and_both_kernels_agree(k):
    packed, scale = weights(48, k, 32, 3)
    x = torch.randn(1, k, device=DEVICE).half()
    bias = torch.randn(48, device=DEVICE)
    expected = w4a16_linear(x.float(), packed, scale, 32, bias)
    assert gemv_w4.supported(x, packed, 32)
    # The rule's GEMV; one group a block; blocks of two and four groups (104 columns: the last
    # block partial, its second group absent); K in 3 splits; the tensor-core kernel.
    for kwargs in ({}, {"gemv": (16, 32, 4, 1)}, {"gemv": (8, 64, 4, 1)}, {"gemv": (16, 128, 4, 2)},
                   {"gemv": (8, 32, 4, 3)}, {"config": (16, 32, 32, 4, 2)}):
        got = gemm_w4.w4a16_gemm(x, packed, scale, 32, bias, **kwargs)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-2)


@settings(max_examples=30)
@given(n=st.integers(1, 70), words=st.integers(1, 48), group=st.sampled_from([32, 64, 128]),
       block_n=st.sampled_from([8, 16, 32, 64]), block_k=st.sampled_from([32, 64, 128, 256, 512]),
       warps=st.sampled_from([1, 2, 4]), splits=st.integers(1, 4), seed=st.integers(0, 999))
def test_gemv_configs_match_the_reference(n, words, group, block_n, block_k, warps, splits, seed):
    # Every split length, including splits of less than one block and a partial last block; tiles
    # whose threads lie over one row or several, and each take one row or several.
    k = 8 * words
    packed, scale = weights(n, k, group, seed)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed + 1)).half().to(DEVICE)
    got = gemm_w4.w4a16_gemm(x, packed, scale, group, gemv=(block_n, block_k, warps, splits))
    torch.testing.assert_close(got.float(), w4a16_linear(x.float(), packed, scale, group), rtol=2e-3,
                               atol=2e-3 * (1 + k ** 0.5))


@settings(max_examples=12)
@given(rows=st.sampled_from([2, 4]), n=st.integers(1, 100), words=st.integers(1, 100),
       group=st.sampled_from([32, 64, 128]), block_k=st.sampled_from([128, 256, 512]), warps=st.sampled_from([2, 4, 8]),
       splits=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 999))
def test_a_gemv_whose_threads_take_several_rows_matches_the_reference(rows, n, words, group, block_k, warps, splits,
                                                                      bias, seed):
    # Each thread takes `rows` rows, each a weight tile of its own that meets the shared
    # activation pairs (gemv_w4.py): rows past N (wrapped onto valid ones), K of partial blocks
    # and groups, K split, a bias.
    thread_rows = 32 * warps // (block_k // 32)  # the threads lie over the chunks first
    config = (rows * thread_rows, block_k, warps, splits)
    assert gemv_w4._tile(config) == (rows, thread_rows, block_k // 32)
    k = 8 * words
    packed, scale = weights(n, k, group, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, k, generator=generator).half().to(DEVICE)
    b = torch.randn(n, generator=generator).to(DEVICE) if bias else None
    got = gemm_w4.w4a16_gemm(x, packed, scale, group, b, gemv=config)
    torch.testing.assert_close(got.float(), w4a16_linear(x.float(), packed, scale, group, b), rtol=2e-3,
                               atol=2e-3 * (1 + k ** 0.5))


def test_a_gemv_config_that_is_not_a_tile_is_refused():
    packed, scale = weights(16, 64, 32, 0)
    x = torch.randn(1, 64, device=DEVICE).half()
    for config in ((16, 48, 4, 1), (12, 64, 4, 1), (16, 16, 4, 1), (16, 64, 0, 1)):
        with pytest.raises(ValueError, match="gemv_w4: BLOCK_K"):
            gemm_w4.w4a16_gemm(x, packed, scale, 32, gemv=config)


def test_an_fp32_row_multiplied_in_fp16_runs_the_gemv_on_the_rounded_row():
    packed, scale = weights(40, 96, 32, 4)
    x = torch.randn(1, 96, device=DEVICE) * 3
    expected = w4a16_linear(x.half().float(), packed, scale, 32)
    got = gemm_w4.w4a16_gemm(x, packed, scale, 32, act_dtype=torch.float16, gemv=(8, 64, 4, 2))
    assert got.dtype == torch.float32
    # On the GPU the GEMV sums sixteen products in fp16 (gemv_w4.py): fp16 tolerances.
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-2)
    rows = torch.randn(5, 96, device=DEVICE)  # the tensor-core kernel rounds the same way
    torch.testing.assert_close(gemm_w4.w4a16_gemm(rows, packed, scale, 32, act_dtype=torch.float16),
                               w4a16_linear(rows.half().float(), packed, scale, 32), rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError, match="act_dtype must be"):
        gemm_w4.w4a16_gemm(x, packed, scale, 32, act_dtype=torch.int8)


def test_rows_the_gemv_does_not_take_run_the_tensor_core_kernel():
    packed, scale = weights(48, 77, 32, 3)
    assert not gemv_w4.supported(torch.randn(1, 77, device=DEVICE).half(), packed, 32)  # K not a multiple of 8
    # An fp32 row the recipe does not round: the GEMV (fp16 products) is not allowed to take it.
    packed, scale = weights(48, 64, 32, 3)
    x = torch.randn(1, 64, device=DEVICE)
    torch.testing.assert_close(gemm_w4.w4a16_gemm(x, packed, scale, 32), w4a16_linear(x, packed, scale, 32),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="GEMV takes one fp16 row"):
        gemm_w4.w4a16_gemm(x, packed, scale, 32, gemv=(16, 32, 4, 1))


def test_groups_the_kernel_does_not_take_run_the_reference():
    packed, scale = weights(8, 24, 8, 0)
    x = torch.randn(3, 24, device=DEVICE)
    assert not gemm_w4.supported(8)
    assert torch.equal(gemm_w4.w4a16_gemm(x, packed, scale, 8), w4a16_linear(x, packed, scale, 8))


def test_the_graph_ops_take_leading_dims_and_have_fakes():
    packed, scale = weights(40, 64, 32, 1)
    x = torch.randn(2, 5, 64, device=DEVICE)
    out = torch.ops.quamba.w4a16_gemm(x, packed, scale, 32)
    torch.testing.assert_close(out, w4a16_linear(x, packed, scale, 32), rtol=1e-5, atol=1e-4)
    with torch.device("meta"):
        fake = torch.ops.quamba.w4a8_gemm(torch.empty(2, 5, 64, dtype=torch.int8), torch.empty(()),
                                          packed.to("meta"), scale.to("meta"), 32, None, None, torch.float16)
    assert fake.shape == (2, 5, 40) and fake.dtype == torch.float16


@pytest.mark.parametrize("k, group", [(160, 128), (77, 32)])
def test_the_dequantize_kernel_writes_the_reference_weight(k, group):
    packed, scale = weights(37, k, group, 5)
    want = dequantize_weight_int4(packed.cpu(), scale.cpu(), group, k)
    torch.testing.assert_close(dequant_w4.dequantize(packed, scale, group, k, torch.float32).cpu(), want, rtol=0, atol=0)
    assert torch.equal(dequant_w4.dequantize(packed, scale, group, k, torch.float16).cpu(), want.half())


@settings(max_examples=12)
@given(vocab=st.integers(1, 40), dim=st.integers(1, 300), group=st.sampled_from([32, 128]),
       shape=st.sampled_from([(1, 1), (2, 5), (3,), (1, 17)]), dtype=st.sampled_from([torch.float16, torch.float32]),
       index_dtype=st.sampled_from([torch.int64, torch.int32]), seed=st.integers(0, 999))
def test_the_embedding_gather_gives_the_reference_rows_bit_for_bit(vocab, dim, group, shape, dtype, index_dtype, seed):
    # An odd dim (a zero nibble pads each packed row), rows of a partial last group, ids of any shape.
    packed, scale = weights(vocab, dim, group, seed)
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed), dtype=index_dtype)
    got = dequant_w4.w4_embedding_gather(ids.to(DEVICE), packed, scale, group, dim, dtype)
    assert got.shape == (*shape, dim) and got.dtype == dtype
    assert torch.equal(got.cpu(), w4_embedding(ids, packed.cpu(), scale.cpu(), group, dim, dtype))


def test_an_id_outside_the_table_is_a_nan_row_in_the_kernel_and_an_error_in_the_reference():
    packed, scale = weights(10, 64, 32, 1)
    ids = torch.tensor([[3, 10, -1, 9]])
    got = dequant_w4.w4_embedding_gather(ids.to(DEVICE), packed, scale, 32, 64, torch.float16).cpu()
    assert got[0, 1].isnan().all() and got[0, 2].isnan().all()
    assert torch.equal(got[0, [0, 3]], w4_embedding(ids[:, [0, 3]], packed.cpu(), scale.cpu(), 32, 64, torch.float16)[0])
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 10\)"):
        w4_embedding(ids, packed.cpu(), scale.cpu(), 32, 64, torch.float16)
    with pytest.raises(ValueError, match="w_packed must be uint8"):
        dequant_w4.w4_embedding_gather(ids.to(DEVICE), packed, scale, 32, 100, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_rows_run_a_gemm_on_the_dequantized_weight(dtype):
    packed, scale = weights(24, 64, 32, 6)
    x = torch.randn(gemm_w4.DEQUANT_MIN_ROWS + 3, 64, device=DEVICE).to(dtype)
    bias = torch.randn(24, device=DEVICE)
    got = gemm_w4.w4a16_gemm(x, packed, scale, 32, bias)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), w4a16_linear(x.float(), packed, scale, 32, bias), rtol=tolerance,
                               atol=10 * tolerance)


_CONV_STEP_CASES = dict(n=st.integers(2, 80), words=st.integers(1, 24), group=st.sampled_from([32, 64]),
                       width=st.integers(2, 4), bias=st.booleans(), conv_bias=st.booleans(),
                       state_dtype=st.sampled_from([torch.float16, torch.float32]), splits=st.integers(1, 3),
                       rows=st.sampled_from([1, 2, 4]), data=st.data())


@settings(max_examples=10)
@given(**_CONV_STEP_CASES)
def test_the_gemv_with_the_conv_step_gives_the_bits_of_the_two_kernels(n, words, group, width, bias, conv_bias,
                                                                       state_dtype, splits, rows, data):
    check_gemv_conv_step(n, words, group, width, bias, conv_bias, state_dtype, splits, rows, data)


@pytest.mark.slow
@settings(max_examples=40)
@given(**_CONV_STEP_CASES)
def test_the_gemv_with_the_conv_step_gives_the_bits_of_the_two_kernels_on_more_cases(n, words, group, width, bias,
                                                                                     conv_bias, state_dtype, splits,
                                                                                     rows, data):
    check_gemv_conv_step(n, words, group, width, bias, conv_bias, state_dtype, splits, rows, data)


def check_gemv_conv_step(n, words, group, width, bias, conv_bias, state_dtype, splits, rows, data):
    # A decode step's W4A16 in_proj with the conv1d step in its epilogue (D <= N channels from
    # column `start`: Mamba-1's x half from 0, Mamba-2's xBC after z) against w4a16_gemm then the
    # conv update kernel: the same output, u and state.
    from quamba_fx.kernels.conv1d_float import conv1d_silu_update

    k = 8 * words
    channels = data.draw(st.integers(1, n))
    start = data.draw(st.integers(0, n - channels))
    g = torch.Generator().manual_seed(n * 1000 + k)
    packed, scale = weights(n, k, group, n + k)
    x = torch.randn(1, 1, k, generator=g).half().to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    conv_w = torch.randn(channels, 1, width, generator=g).to(DEVICE)
    conv_b = torch.randn(channels, generator=g).to(DEVICE) if conv_bias else None
    state = torch.randn(1, channels, width - 1, generator=g).to(DEVICE, state_dtype)
    expected_state = state.clone()
    # 64-column blocks: up to three a row, so every split count here has blocks to take. A warp's
    # 32 threads over 2 chunks and 16 rows, each thread taking `rows` rows (16 x rows a tile).
    config = (16, 64, 4, splits) if rows == 1 else (16 * rows, 64, 1, splits)
    assert gemv_w4._tile(config)[0] == rows
    expected_xz = gemm_w4.w4a16_gemm(x, packed, scale, group, b, torch.float16, gemv=config)
    expected_u = conv1d_silu_update(expected_xz[:, 0, start:start + channels], conv_w, conv_b,
                                    expected_state)[..., None]

    xz, u = gemm_w4.w4a16_gemm_conv_step(x, packed, scale, group, b, torch.float16, conv_w, conv_b, state,
                                         gemv=config, conv_start=start)
    assert xz.shape == (1, 1, n) and u.shape == (1, channels, 1) and u.dtype == xz.dtype == torch.float16
    assert torch.equal(xz, expected_xz) and torch.equal(u, expected_u) and torch.equal(state, expected_state)


def test_the_conv_step_runs_after_the_gemm_where_the_gemv_does_not_take_the_rows():
    packed, scale = weights(48, 64, 32, 5)
    x = (torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(5)) / 8).half().to(DEVICE)
    conv_w = torch.randn(20, 1, 4, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    state = torch.randn(3, 20, 3, generator=torch.Generator().manual_seed(7)).half().to(DEVICE)
    reference_state = state.clone()
    xz, u = gemm_w4.w4a16_gemm_conv_step(x, packed, scale, 32, None, None, conv_w, None, state, conv_start=28)
    expected_xz = gemm_w4.w4a16_gemm(x, packed, scale, 32)
    from quamba_fx.kernels.conv1d_float import conv1d_silu_update_reference

    expected_u = conv1d_silu_update_reference(expected_xz[:, 0, 28:], conv_w, None, reference_state)
    assert torch.equal(xz, expected_xz) and u.shape == (3, 20, 1) and torch.equal(state, reference_state)
    torch.testing.assert_close(u[..., 0], expected_u, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="conv_state"):
        gemm_w4.w4a16_gemm_conv_step(x, packed, scale, 32, None, None, conv_w, None, state[:, :, :2])
    with pytest.raises(ValueError, match="conv_start 29"):  # its 20 channels would end past the 48 columns
        gemm_w4.w4a16_gemm_conv_step(x, packed, scale, 32, None, None, conv_w, None, state, conv_start=29)


@pytest.mark.skipif(not INTERPRET, reason="runs the GEMV on CPU tensors: needs TRITON_INTERPRET=1")
def test_a_fused_w4a16_gemv_that_fails_to_compile_falls_back_to_the_separate_kernels(monkeypatch):
    """If the GEMV with the conv step in its epilogue cannot be built on the device, a warning says
    so once and the GEMV then the conv kernel run, with the same results and the state advanced
    once; later calls do not try again."""
    import warnings

    from quamba_fx.kernels import gemm
    from quamba_fx.kernels.conv1d_float import conv1d_silu_update

    real_launch = gemv_w4.launch

    def launch(*args, **kwargs):
        if kwargs.get("conv") is not None or (len(args) > 7 and args[7] is not None):
            raise RuntimeError("no such instruction on this device")
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(gemv_w4, "launch", launch)
    monkeypatch.setattr(gemm, "_INTERPRET", False)  # compile failures are tolerated off the interpreter
    monkeypatch.setattr(gemm, "_USES_ALTERNATIVE", {})
    gen = torch.Generator().manual_seed(31)
    packed, scale = weights(96, 64, 32, seed=31)
    x = torch.randn(1, 1, 64, generator=gen).half().to(DEVICE)
    conv_w = torch.randn(40, 1, 4, generator=gen).to(DEVICE)
    state = torch.randn(1, 40, 3, generator=gen).half().to(DEVICE)
    want_state = state.clone()
    want_xz = gemm_w4.w4a16_gemm(x, packed, scale, 32)
    want_u = conv1d_silu_update(want_xz[:, 0, :40], conv_w, None, want_state)[..., None]
    with pytest.warns(RuntimeWarning, match="GEMV with a conv epilogue failed on this device .*no such instruction"):
        xz, u = gemm_w4.w4a16_gemm_conv_step(x, packed, scale, 32, None, None, conv_w, None, state)
    assert torch.equal(xz, want_xz) and torch.equal(u, want_u) and torch.equal(state, want_state)
    assert list(gemm._USES_ALTERNATIVE.values()).count(False) == 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gemm_w4.w4a16_gemm_conv_step(x, packed, scale, 32, None, None, conv_w, None, state)
    assert not any("failed on this device" in str(w.message) for w in seen)
