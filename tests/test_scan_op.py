"""The opaque selective-scan op: registered correctly, and its loop matches a closed form."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from quamba_fx.ops import selective_scan_reference


def scan_inputs(batch, d_inner, d_state, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d_inner, length, generator=g)
    delta = torch.randn(batch, d_inner, length, generator=g) * 0.5
    A = -torch.rand(d_inner, d_state, generator=g) * 4 - 0.1
    B = torch.randn(batch, d_state, length, generator=g)
    C = torch.randn(batch, d_state, length, generator=g)
    D = torch.randn(d_inner, generator=g)
    z = torch.randn(batch, d_inner, length, generator=g)
    bias = torch.randn(d_inner, generator=g) * 0.1
    return u, delta, A, B, C, D, z, bias


def closed_form(u, delta, A, B, C, D, z, bias):
    """h_t = sum_{s<=t} exp(A * sum_{s<r<=t} dt_r) dt_s B_s u_s, evaluated directly in float64."""
    u, delta, A, B, C, D, z, bias = (t.double() for t in (u, delta, A, B, C, D, z, bias))
    dt = F.softplus(delta + bias[None, :, None])
    cum = torch.cumsum(dt, dim=-1)  # [b, d, L]
    decay = torch.exp(A[None, :, :, None, None] * (cum[:, :, None, :, None] - cum[:, :, None, None, :]))
    L = u.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    decay = decay * causal  # [b, d, n, t, s]
    contrib = decay * (dt * u)[:, :, None, None, :] * B[:, None, :, None, :]
    h = contrib.sum(-1)  # [b, d, n, t]
    y = torch.einsum("bdnt,bnt->bdt", h, C) + u * D[None, :, None]
    return (y * F.silu(z)).float()


@given(batch=st.integers(1, 2), d_inner=st.integers(1, 12), d_state=st.integers(1, 8), length=st.integers(1, 20))
@settings(max_examples=25)
def test_op_equals_closed_form(batch, d_inner, d_state, length):
    u, delta, A, B, C, D, z, bias = scan_inputs(batch, d_inner, d_state, length)
    y = torch.ops.quamba.selective_scan(u, delta, A, B, C, D, z, bias, True)
    torch.testing.assert_close(y, closed_form(u, delta, A, B, C, D, z, bias), rtol=1e-4, atol=1e-4)


def test_initial_state_chains_two_halves():
    u, delta, A, B, C, D, z, bias = scan_inputs(2, 6, 4, 16, seed=1)
    whole, state = selective_scan_reference(u, delta, A, B, C, D, z, bias)
    first, mid = selective_scan_reference(u[..., :7], delta[..., :7], A, B[..., :7], C[..., :7], D, z[..., :7], bias)
    second, end = selective_scan_reference(
        u[..., 7:], delta[..., 7:], A, B[..., 7:], C[..., 7:], D, z[..., 7:], bias, initial_state=mid
    )
    torch.testing.assert_close(torch.cat([first, second], -1), whole)
    torch.testing.assert_close(end, state)


def test_optional_arguments_and_dtype():
    u, delta, A, B, C, *_ = scan_inputs(1, 4, 2, 5)
    plain = torch.ops.quamba.selective_scan(u, delta, A, B, C, None, None, None, False)
    assert plain.shape == u.shape
    half = torch.ops.quamba.selective_scan(u.bfloat16(), delta, A, B, C, None, None, None, False)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), plain, rtol=2e-2, atol=2e-2)


def test_opcheck_validates_registration_and_fake():
    args = scan_inputs(2, 5, 3, 6)
    u, delta, A, B, C, D, z, bias = args
    torch.library.opcheck(torch.ops.quamba.selective_scan.default, (u, delta, A, B, C, D, z, bias, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.quamba.selective_scan.default, (u, delta, A, B, C, None, None, None, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_outputs_are_contiguous_as_the_fakes_promise():
    # Inductor trusts a fake kernel's strides and asserts them at run time.
    from torch._subclasses.fake_tensor import FakeTensorMode

    u, delta, A, B, C, D, z, bias = scan_inputs(2, 6, 3, 5)
    z = z.transpose(1, 2).contiguous().transpose(1, 2)  # a strided gate, as the in_proj chunk gives
    real = torch.ops.quamba.selective_scan(u, delta, A, B, C, D, z, bias, True)
    with FakeTensorMode() as mode:
        fake = torch.ops.quamba.selective_scan(*(mode.from_tensor(t) for t in (u, delta, A, B, C, D, z, bias)), True)
    assert real.stride() == fake.stride() == u.new_empty(u.shape).stride()
    x = torch.randn(3, 8, 12).transpose(1, 2)
    assert torch.ops.quamba.hadamard(x).is_contiguous()
    q = torch.ops.quamba.quantize(x, torch.tensor(0.1))
    assert q.is_contiguous() and torch.ops.quamba.dequantize(q.transpose(1, 2), torch.tensor(0.1)).is_contiguous()
