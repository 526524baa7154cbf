"""The decode conv step and x_proj in one launch (kernels/conv_x_proj.py) against the conv kernel
then the GEMM: bit for bit under the interpreter, within one int8 code of the conv's output on
CUDA (the conv kernel may contract an FMA that this kernel, compiled as the GEMM is, does not)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import conv_x_proj, gemm
from quamba_fx.kernels.conv1d import causal_conv1d_update_silu_int8
from quamba_fx.kernels.conv_x_proj import Projection, conv_step_x_proj, in_proj_conv_x_proj
from quamba_fx.kernels.gemm import ConvStep, int8_gemm

from .kernel_support import DEVICE, EXACT, needs_kernel, reference_calls


def _case(m: int, d: int, n: int, width: int, conv_bias: bool, proj_bias: bool, per_channel: bool, seed: int,
          device: str | None = DEVICE):
    """in_proj's int8 rows (an x half of D channels, a z half), a conv step and an x_proj."""
    gen = torch.Generator().manual_seed(seed)
    xz = torch.randint(-128, 128, (m, 2 * d), dtype=torch.int8, generator=gen).to(device)
    conv = ConvStep(state=torch.randint(-128, 128, (m, d, width - 1), dtype=torch.int8, generator=gen).to(device),
                    weight=torch.randn(d, width, generator=gen).to(device),
                    bias=torch.randn(d, generator=gen).to(device) if conv_bias else None,
                    out_scale=torch.tensor(0.05, device=device))
    w_scale = torch.rand(n, generator=gen) * 1e-3 + 1e-4 if per_channel else torch.tensor(4e-4)
    proj = Projection(weight=torch.randint(-128, 128, (n, d), dtype=torch.int8, generator=gen).to(device),
                      weight_scale=w_scale.to(device),
                      bias=torch.randn(n, generator=gen).to(device) if proj_bias else None,
                      out_scale=torch.tensor(0.2, device=device))
    return xz, torch.tensor(0.3, device=device), conv, proj


def _two_kernels(xz, x_scale, conv: ConvStep, proj: Projection):
    state = conv.state.clone()
    d = state.shape[1]
    u = causal_conv1d_update_silu_int8(xz[:, :d], state, x_scale, conv.weight, conv.bias, conv.out_scale)
    return u, int8_gemm(u, conv.out_scale, proj.weight, proj.weight_scale, proj.bias, proj.out_scale), state


def _check_against_two_kernels(xz, x_scale, conv: ConvStep, proj: Projection) -> None:
    want_u, want_out, want_state = _two_kernels(xz, x_scale, conv, proj)
    u, out = conv_step_x_proj(xz[:, :conv.state.shape[1]], x_scale, conv, proj)
    assert torch.equal(conv.state, want_state)
    if EXACT:
        assert torch.equal(u, want_u) and torch.equal(out, want_out)
    else:  # CUDA: u within one code of the conv kernel's; x_proj's output exactly the GEMM's on this u
        assert (u.int() - want_u.int()).abs().max() <= 1
        assert torch.equal(out, int8_gemm(u, conv.out_scale, proj.weight, proj.weight_scale, proj.bias,
                                          proj.out_scale))


@needs_kernel
@pytest.mark.parametrize("m, d, n, width, conv_bias, proj_bias, per_channel", [
    (2, 64, 18, 4, True, False, True),    # the tiny model's shape: two programs share x_proj's sums
    (16, 96, 40, 4, False, True, False),  # sixteen rows, three programs, a per-tensor weight scale
    (5, 40, 33, 3, True, True, True),     # channels and outputs off the tiles' edges, ragged rows
    (3, 32, 16, 2, False, False, True),   # one program: it arrives last at once
])
def test_one_launch_gives_the_conv_kernel_then_the_gemm(m, d, n, width, conv_bias, proj_bias, per_channel):
    _check_against_two_kernels(*_case(m, d, n, width, conv_bias, proj_bias, per_channel, seed=m + d + n))


@needs_kernel
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(2, 16), channels=st.sampled_from([32, 48, 64, 100]), n=st.integers(1, 70),
       width=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_any_batch_and_shape_gives_the_two_kernels_bits(m, channels, n, width, seed):
    _check_against_two_kernels(*_case(m, channels, n, width, True, seed % 2 == 0, seed % 3 != 0, seed))


@needs_kernel
def test_the_accumulator_is_clear_after_each_launch():
    """Each launch leaves the shared sums and counter at zero: a second launch on other inputs is
    still right, and so is a smaller one after a larger one."""
    for m, d, n, seed in ((16, 96, 40, 1), (16, 96, 40, 2), (2, 64, 18, 3)):
        _check_against_two_kernels(*_case(m, d, n, 4, True, True, True, seed))
    for acc, count in conv_x_proj._ACCUMULATORS.values():
        assert not acc.any() and not count.any()


@needs_kernel
@pytest.mark.parametrize("m, min_batch, takes", [(1, 2, False), (1, 1, True), (2, 2, True), (16, 2, True),
                                                  (17, 2, False)])
def test_in_proj_conv_x_proj_takes_the_kernel_from_min_to_max_batch_rows_when_on(m, min_batch, takes, monkeypatch):
    """The op's body: in_proj's GEMM, then the shared launch at MIN_BATCH..MAX_BATCH rows; below,
    at one row, the GEMV with its conv epilogue and x_proj's GEMV, above MAX_BATCH the three
    kernels; the same results either way."""
    monkeypatch.setattr(conv_x_proj, "MAX_BATCH", 16)
    monkeypatch.setattr(conv_x_proj, "MIN_BATCH", min_batch)
    gen = torch.Generator().manual_seed(m)
    d, n, k = 32, 18, 48
    x = torch.randint(-128, 128, (m, 1, k), dtype=torch.int8, generator=gen).to(DEVICE)
    w = torch.randint(-128, 128, (2 * d, k), dtype=torch.int8, generator=gen).to(DEVICE)
    in_proj = (x, torch.tensor(0.02, device=DEVICE), w, torch.full((2 * d,), 3e-4, device=DEVICE), None,
               torch.tensor(0.3, device=DEVICE))
    _, _, conv, proj = _case(m, d, n, 4, True, False, True, seed=m)
    state = conv.state.clone()
    xz_want, u_want = gemm.int8_gemm_conv_step(*in_proj, dataclasses.replace(conv, state=state))
    x_dbl_want = int8_gemm(u_want, conv.out_scale, proj.weight, proj.weight_scale, None, proj.out_scale)
    launches = []
    real = conv_x_proj.conv_step_x_proj
    monkeypatch.setattr(conv_x_proj, "conv_step_x_proj", lambda *a: launches.append(1) or real(*a))
    xz, u, x_dbl = in_proj_conv_x_proj(*in_proj, conv, proj)
    assert len(launches) == takes
    assert torch.equal(xz, xz_want) and torch.equal(conv.state, state)
    if EXACT or not takes:
        assert torch.equal(u, u_want) and torch.equal(x_dbl, x_dbl_want)
    else:  # CUDA: the conv kernel may contract an FMA that the shared launch does not
        assert (u.int() - u_want.int()).abs().max() <= 1
        assert torch.equal(x_dbl, int8_gemm(u, conv.out_scale, proj.weight, proj.weight_scale, None, proj.out_scale))
    monkeypatch.setattr(conv_x_proj, "MAX_BATCH", 0)
    assert not conv_x_proj.takes(x, conv, proj)


def test_plain_cpu_runs_the_references_and_bad_arguments_are_refused(monkeypatch):
    calls = reference_calls(monkeypatch, conv_x_proj, "conv_step_x_proj_reference")
    xz, x_scale, conv, proj = _case(3, 40, 20, 4, True, True, True, seed=7, device="cpu")
    state = conv.state.clone()
    u, out = conv_step_x_proj(xz[:, :40], x_scale, conv, proj)
    assert calls == [1]
    want_u = causal_conv1d_update_silu_int8(xz[:, :40], state, x_scale, conv.weight, conv.bias, conv.out_scale)
    assert torch.equal(u, want_u) and torch.equal(conv.state, state)
    assert torch.equal(out, int8_gemm(u, conv.out_scale, proj.weight, proj.weight_scale, proj.bias, proj.out_scale))
    before = conv.state.clone()
    with pytest.raises(ValueError, match="x_proj reads the conv's output at one per-tensor scale"):
        conv_step_x_proj(xz[:, :40], x_scale, dataclasses.replace(conv, out_scale=torch.full((40,), 0.05)), proj)
    with pytest.raises(ValueError, match="conv must be a ConvStep and proj a Projection"):
        conv_step_x_proj(xz[:, :40], x_scale, conv, "x_proj")
    with pytest.raises(ValueError):  # x_proj's K is not the conv's D
        conv_step_x_proj(xz[:, :40], x_scale, conv, dataclasses.replace(proj, weight=proj.weight[:, :30]))
    with pytest.raises(ValueError):  # a state of another batch
        conv_step_x_proj(xz[:2, :40], x_scale, conv, proj)
    assert torch.equal(conv.state, before)  # nothing written by a refused call


@needs_kernel
def test_more_outputs_than_a_program_holds_run_the_two_kernels(monkeypatch):
    monkeypatch.setattr(conv_x_proj, "MAX_N", 16)
    launches = []
    real = conv_x_proj._conv_step_x_proj_kernel
    monkeypatch.setattr(conv_x_proj, "_conv_step_x_proj_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or real[grid]})())
    _check_against_two_kernels(*_case(4, 64, 18, 4, True, True, True, seed=11))
    assert launches == []
    monkeypatch.setattr(conv_x_proj, "MAX_N", 256)  # the spy does see the launch it would make
    _check_against_two_kernels(*_case(4, 64, 18, 4, True, True, True, seed=11))
    assert len(launches) == 1
