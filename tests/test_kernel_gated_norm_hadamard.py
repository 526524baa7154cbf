"""Mamba-2's gated norm fused into out_proj's Hadamard quantize (`gated_rmsnorm_hadamard_quantize`,
kernels/hadamard.py) or rotation (`gated_rmsnorm_hadamard_rotate`, before a W4A16 out_proj)
against the two kernels each replaces, under the Triton interpreter, and their decode-graph rule."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import quamba_fx
from quamba_fx.errors import InputError
from quamba_fx.graph_info import op_name
from quamba_fx.kernels import hadamard
from quamba_fx.kernels.dispatch import INTERPRET
from quamba_fx.kernels.gated_norm import gated_rmsnorm
from quamba_fx.passes.kernel_lowering import cached_graph
from quamba_fx.passes.lowering import gated_norm as gated_norm_lowering

from .test_capture import assert_close_to_magnitude
from .test_kernel_hadamard import assert_int8_close
from .test_mamba2 import make_mamba2, mamba2_config

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="the kernel runs on CUDA or under TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

# (width, groups) the packed kernel takes: Paley factor M times Sylvester order P >= 16, every
# group a whole number of P-wide tile rows. 192 = 12 x 16 and 320 = 20 x 16 are small; 5120 is
# mamba2-2.7b's d_inner (20 x 256).
PACKED = [(192, 1), (192, 2), (192, 12), (320, 4), (1280, 2), (5120, 1)]


def inputs(rows: int, width: int, int8_gate: bool, seed: int, z_columns: int = 0):
    """y as the scan writes it (fp16), a gate z that is a column slice of a wider in_proj output
    (its rows strided), the norm weight and the scales."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(rows, width, generator=g) * 2).half()
    if int8_gate:
        wide = torch.randint(-128, 128, (rows, width + z_columns), generator=g, dtype=torch.int8)
        z_scale = torch.tensor(0.04)
    else:
        wide = torch.randn(rows, width + z_columns, generator=g).half() * 3
        z_scale = None
    z = wide[:, z_columns:]
    weight = 1 + 0.3 * torch.randn(width, generator=g)
    return y, z, z_scale, weight, torch.tensor(0.03)


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def two_kernels(y, z, z_scale, weight, group_size, scale, norm_dtype=torch.float16, eps=1e-5):
    return hadamard.hadamard_quantize(gated_rmsnorm(y, z, z_scale, weight, eps, norm_dtype, group_size), scale)


@given(shape=st.sampled_from(PACKED), rows=st.integers(1, 9), int8_gate=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_fused_kernel_equals_the_two_kernels(shape, rows, int8_gate, strided, seed):
    width, groups = shape
    assert hadamard.packs_gated_norm(width, width // groups, torch.float16)
    y, z, z_scale, weight, scale = on_device(*inputs(rows, width, int8_gate, seed, z_columns=8 if strided else 0))
    got = hadamard.gated_rmsnorm_hadamard_quantize(y, z, z_scale, weight, 1e-5, width // groups, torch.float16, scale)
    # The norm's sum of squares is added in another order: a normed fp16 value may move by an
    # ulp, and then an int8 code by one step, rarely.
    assert_int8_close(got, two_kernels(y, z, z_scale, weight, width // groups, scale))


@given(shape=st.sampled_from(PACKED), rows=st.integers(1, 9), int8_gate=st.booleans(), strided=st.booleans(),
       out_dtype=st.sampled_from([None, torch.float16, torch.float32]), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_fused_rotation_equals_the_two_kernels(shape, rows, int8_gate, strided, out_dtype, seed):
    width, groups = shape
    y, z, z_scale, weight, _ = on_device(*inputs(rows, width, int8_gate, seed, z_columns=8 if strided else 0))
    got = hadamard.gated_rmsnorm_hadamard_rotate(y, z, z_scale, weight, 1e-5, width // groups, torch.float16,
                                                 out_dtype)
    normed = gated_rmsnorm(y, z, z_scale, weight, 1e-5, torch.float16, width // groups)
    want = hadamard.hadamard_transform_triton(normed, out_dtype or torch.float16)
    assert got.dtype == want.dtype and got.shape == (rows, width)
    # A normed fp16 value may move by an ulp (its sum of squares added in another order): the
    # rotation then moves by at most about that ulp, and an fp16 output by one rounding step more.
    assert_close_to_magnitude(got.float(), want.float(), rel=2e-3)


def test_the_rotation_runs_the_kernel_and_refuses_bf16_out(monkeypatch):
    monkeypatch.setattr(hadamard, "gated_rmsnorm", lambda *args: pytest.fail("fell back to the two kernels"))
    y, z, z_scale, weight, _ = on_device(*inputs(2, 192, False, seed=9))
    args = (y, z, z_scale, weight, 1e-5, None, torch.float16)
    assert hadamard.gated_rmsnorm_hadamard_rotate(*args).dtype == torch.float16
    with pytest.raises(ValueError, match="out_dtype must be float16 or float32"):
        hadamard.gated_rmsnorm_hadamard_rotate(*args, torch.bfloat16)
    torch.library.opcheck(torch.ops.quamba.gated_rmsnorm_hadamard_rotate.default, [*args, torch.float32])


def test_three_dim_rows_and_a_whole_row_group():
    # [batch, length, width] with the gate a slice of a [batch, length, 2 * width] tensor: the
    # leading dims collapse to one row index for both tensors, at their own strides.
    y, z, z_scale, weight, scale = on_device(*inputs(6, 320, True, seed=3, z_columns=320))
    y3, z3 = y.reshape(2, 3, 320), z.unflatten(0, (2, 3))
    assert z3.stride() == (3 * 640, 640, 1)
    got = hadamard.gated_rmsnorm_hadamard_quantize(y3, z3, z_scale, weight, 1e-5, None, torch.float16, scale)
    assert got.shape == (2, 3, 320)
    assert_int8_close(got, two_kernels(y3, z3, z_scale, weight, None, scale))


@pytest.mark.parametrize("width, group_size, norm_dtype", [
    (256, None, torch.float16),     # a power of two: no dense factor, no tensor-core tile
    (192, 8, torch.float16),        # groups that split a 16-wide tile row
    (192, None, torch.float32),     # fp32 normed values (the kernel's operands are 16-bit)
    (192, None, torch.bfloat16),
])
def test_what_the_kernel_does_not_pack_runs_the_two_kernels(width, group_size, norm_dtype, monkeypatch):
    assert not hadamard.packs_gated_norm(width, group_size, norm_dtype)
    launches, launch = [], hadamard._launch

    def spy(*args, **kwargs):
        launches.append(kwargs.get("gate"))
        return launch(*args, **kwargs)

    monkeypatch.setattr(hadamard, "_launch", spy)
    y, z, z_scale, weight, scale = on_device(*inputs(3, width, True, seed=4))
    got = hadamard.gated_rmsnorm_hadamard_quantize(y, z, z_scale, weight, 1e-5, group_size, norm_dtype, scale)
    assert torch.equal(got, two_kernels(y, z, z_scale, weight, group_size, scale, norm_dtype))
    assert launches and not any(launches)  # the plain Hadamard kernel, never the gated one


def test_the_kernel_path_is_taken(monkeypatch):
    """Guards the comparisons above: a packed size must not fall back to the two kernels."""
    monkeypatch.setattr(hadamard, "gated_rmsnorm", lambda *args: pytest.fail("fell back to the two kernels"))
    y, z, z_scale, weight, scale = on_device(*inputs(2, 192, True, seed=5))
    hadamard.gated_rmsnorm_hadamard_quantize(y, z, z_scale, weight, 1e-5, None, torch.float16, scale)


def test_inputs_the_kernel_cannot_take_are_refused_by_name():
    y, z, z_scale, weight, scale = inputs(2, 192, True, seed=6)
    with pytest.raises(InputError, match="one shape"):
        hadamard.gated_rmsnorm_hadamard_quantize(y, z[:, :96], z_scale, weight, 1e-5, None, torch.float16, scale)
    with pytest.raises(InputError, match="needs its scale"):
        hadamard.gated_rmsnorm_hadamard_quantize(y, z, None, weight, 1e-5, None, torch.float16, scale)
    with pytest.raises(InputError, match="does not divide"):
        hadamard.gated_rmsnorm_hadamard_quantize(y, z, z_scale, weight, 1e-5, 100, torch.float16, scale)
    with pytest.raises(ValueError, match="scale must be"):
        hadamard.gated_rmsnorm_hadamard_quantize(y, z, z_scale, weight, 1e-5, None, torch.float16, scale.double())


def test_the_graph_op_has_a_fake_and_the_functions_result():
    y, z, z_scale, weight, scale = on_device(*inputs(4, 192, True, seed=7))
    args = [y, z, z_scale, weight, 1e-5, 96, torch.float16, scale]
    torch.library.opcheck(torch.ops.quamba.gated_rmsnorm_hadamard_quantize.default, args)
    assert torch.equal(torch.ops.quamba.gated_rmsnorm_hadamard_quantize(*args),
                       hadamard.gated_rmsnorm_hadamard_quantize(*args))


MAMBA2_192 = dict(hidden_size=96, num_heads=12, head_dim=16, chunk_size=4)
CALIBRATION_IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized_192():
    # d_inner 192 (12 heads of 16): a width the fused kernel packs, in two groups of 96.
    gm = quamba_fx.capture(make_mamba2(mamba2_config(**MAMBA2_192), seed=8))
    return quamba_fx.quantize(gm, CALIBRATION_IDS, progress=False)


def _decode_logits(lowered, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits of `steps` greedy decode steps after `prompt`, stacked: the decode graph's work."""
    generator = quamba_fx.Generator(lowered, batch_size=prompt.shape[0], cuda_graph=False)
    token = generator.prefill(prompt)[:, -1].argmax(-1)
    logits = []
    for _ in range(steps):
        logits.append(generator.decode(token))
        token = logits[-1].argmax(-1)
    return torch.stack(logits, dim=1)


def assert_decode_fuses_the_norm(lowered, fused_op: str, rotation_op: str, monkeypatch) -> None:
    """The lowered graph runs `gated_rmsnorm` and `rotation_op` (a prefill keeps the two kernels,
    faster from 2048 rows up); its decode graph runs `fused_op` in their place in both blocks, and
    three greedy decode steps give the unfused decode graph's logits."""
    assert {"gated_rmsnorm", rotation_op} <= {op_name(n) for n in lowered.graph.nodes}
    decode = [op_name(n) for n in cached_graph(lowered, decode=True).graph.nodes]
    assert decode.count(fused_op) == 2
    assert "gated_rmsnorm" not in decode and rotation_op not in decode
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    fused = _decode_logits(lowered, prompt, steps=3)
    monkeypatch.setattr(gated_norm_lowering, "FUSE_IN_DECODE", False)
    assert "gated_rmsnorm" in {op_name(n) for n in cached_graph(lowered, decode=True).graph.nodes}
    assert_close_to_magnitude(fused.float(), _decode_logits(lowered, prompt, steps=3).float(), rel=1e-2)


@pytest.mark.slow
def test_the_fp16_decode_graph_fuses_the_norm_into_the_hadamard_and_steps_the_same(quantized_192, monkeypatch):
    assert_decode_fuses_the_norm(quamba_fx.lower(quantized_192, dtype=torch.float16),
                                 "gated_rmsnorm_hadamard_quantize", "hadamard_quantize", monkeypatch)


def test_an_fp32_lowering_keeps_the_two_kernels_in_its_decode_graph(quantized_192):
    decode = cached_graph(quamba_fx.lower(quantized_192, dtype=torch.float32), decode=True)
    ops = {op_name(n) for n in decode.graph.nodes}
    assert {"gated_rmsnorm", "hadamard_quantize"} <= ops and "gated_rmsnorm_hadamard_quantize" not in ops


@pytest.mark.slow
def test_a_w4a16_decode_graph_fuses_the_norm_into_the_rotation_and_steps_the_same(monkeypatch):
    gm = quamba_fx.capture(make_mamba2(mamba2_config(**MAMBA2_192), seed=8))
    quantized = quamba_fx.quantize(gm, CALIBRATION_IDS, recipe="quamba2-w4a16", progress=False)
    assert_decode_fuses_the_norm(quamba_fx.lower(quantized, dtype=torch.float16),
                                 "gated_rmsnorm_hadamard_rotate", "hadamard_rotate", monkeypatch)
