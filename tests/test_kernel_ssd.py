"""The Mamba-2 scan kernel (kernels/ssd.py) against the PyTorch reference, under the Triton interpreter."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from quamba_fx.kernels import ssd
from quamba_fx.kernels.dispatch import INTERPRET
from quamba_fx.ssd_reference import ssd_scan_reference

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="the kernel runs on CUDA or under TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item() / max(1e-6, expected.abs().max().item())


@given(batch=st.integers(1, 2), length=st.integers(1, 80), heads=st.sampled_from([1, 2, 4]),
       head_dim=st.integers(1, 70), groups=st.sampled_from([1, 2]), state=st.integers(1, 40),
       dt_max=st.sampled_from([math.inf, 0.2]), with_state=st.booleans(), with_d=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=25)
def test_kernel_matches_the_reference(batch, length, heads, head_dim, groups, state, dt_max, with_state, with_d, seed):
    if heads % groups:
        groups = 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g)
    dt, A = torch.randn(batch, length, heads, generator=g), -torch.rand(heads, generator=g) * 4
    B, C = torch.randn(batch, length, groups, state, generator=g), torch.randn(batch, length, groups, state, generator=g)
    D = torch.randn(heads, generator=g) if with_d else None
    bias = torch.randn(heads, generator=g)
    start = torch.randn(batch, heads, head_dim, state, generator=g) if with_state else None
    args = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (x, dt, A, B, C, D, bias)]
    y, final = ssd.ssd_scan(*args, True, 0.0, dt_max, 16, initial_state=None if start is None else start.to(DEVICE),
                            return_final_state=True)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, D, bias, True, 0.0, dt_max, 16, initial_state=start)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and final.shape == final_ref.shape
    # fp32 sums in another order (chunks of the kernel's tile, not the reference's), over up to 80
    # steps and 40 states, some cancelling: a few 1e-6 of the magnitude observed.
    assert relative_error(y.cpu(), y_ref) < 5e-5
    assert relative_error(final.cpu(), final_ref) < 5e-5


def test_kernel_reads_strided_slices_of_in_proj_output_in_place():
    # x, B and C are views into the conv output [b, L, d_inner + 2 G N], dt a view into in_proj's.
    torch.manual_seed(0)
    xbc = torch.randn(2, 9, 32 + 2 * 8, device=DEVICE)
    zxbcdt = torch.randn(2, 9, 50, device=DEVICE)
    x, B, C = xbc[..., :32].unflatten(-1, (2, 16)), xbc[..., 32:40].unflatten(-1, (1, 8)), xbc[..., 40:].unflatten(-1, (1, 8))
    dt, A = zxbcdt[..., -2:], -torch.rand(2, device=DEVICE)
    y = ssd.ssd_scan(x, dt, A, B, C, None, None, True, 0.0, math.inf, 4)
    y_ref, _ = ssd_scan_reference(*(t.cpu() for t in (x, dt, A, B, C)), None, None, True, 0.0, math.inf, 4)
    assert relative_error(y.cpu(), y_ref) < 1e-5


def test_bad_shapes_are_refused_before_launching():
    from quamba_fx.errors import InputError

    x = torch.zeros(1, 4, 2, 3, device=DEVICE)
    with pytest.raises(InputError, match="dt must be"):
        ssd.ssd_scan(x, torch.zeros(1, 4, 3, device=DEVICE), -torch.ones(2, device=DEVICE),
                     torch.zeros(1, 4, 1, 5, device=DEVICE), torch.zeros(1, 4, 1, 5, device=DEVICE))
