"""Mamba-2's gated RMSNorm kernel (kernels/gated_norm.py) against Hugging Face's module and its own
reference, under the Triton interpreter, and its lowering rule."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from transformers.models.mamba2 import modeling_mamba2

from quamba_fx.errors import InputError
from quamba_fx.kernels import gated_norm
from quamba_fx.kernels.dispatch import INTERPRET

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="the kernel runs on CUDA or under TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def hf_norm(width: int, groups: int, seed: int) -> torch.nn.Module:
    """The installed transformers' gated norm: per group (Mamba2RMSNormGated) in newer releases,
    the whole row (MambaRMSNormGated, 5.0) before; `groups` is then left to the kernel's test."""
    if hasattr(modeling_mamba2, "Mamba2RMSNormGated"):
        norm = modeling_mamba2.Mamba2RMSNormGated(width, group_size=width // groups, eps=1e-5)
    else:
        norm = modeling_mamba2.MambaRMSNormGated(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)))
    return norm


@given(rows=st.integers(1, 6), group=st.integers(1, 150), groups=st.sampled_from([1, 2, 4]), int8_gate=st.booleans(),
       two_pass=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_kernel_equals_hf_gated_norm_on_the_dequantized_gate(rows, group, groups, int8_gate, two_pass, seed):
    width = group * groups
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, width, generator=g) * 3
    if int8_gate:
        z, scale = torch.randint(-128, 128, (rows, width), generator=g, dtype=torch.int8), torch.tensor(0.05)
        gate = z.float() * scale
    else:
        z, scale = torch.randn(rows, width, generator=g) * 2, None
        gate = z
    norm = hf_norm(width, groups, seed)
    group_size = getattr(norm, "group_size", None)
    with torch.no_grad():
        expected = norm(y, gate)
    with pytest.MonkeyPatch.context() as patch:
        if two_pass:
            patch.setattr(gated_norm, "_MAX_BLOCK", 32)  # groups longer than 32 take the two-pass loop
        out = gated_norm.gated_rmsnorm(y.to(DEVICE), z.to(DEVICE), None if scale is None else scale.to(DEVICE),
                                       norm.weight.detach().to(DEVICE), 1e-5, group_size=group_size)
    assert out.dtype == torch.float32 and out.shape == y.shape
    # A few ulps of the common rsqrt factor (sums in another order), relative to each element.
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_16_bit_outputs_are_the_fp32_result_rounded(out_dtype):
    g = torch.Generator().manual_seed(1)
    y, z = torch.randn(3, 2, 96, generator=g), torch.randint(-128, 128, (3, 2, 96), generator=g, dtype=torch.int8)
    weight, scale = torch.randn(96, generator=g), torch.tensor(0.02)
    full = gated_norm.gated_rmsnorm_reference(y, z, scale, weight, 1e-5)
    out = gated_norm.gated_rmsnorm(y.to(DEVICE), z.to(DEVICE), scale.to(DEVICE), weight.to(DEVICE), 1e-5, out_dtype)
    assert out.dtype == out_dtype
    # One step of the output dtype at most (a few-ulp fp32 difference can move the rounding).
    step = 2 ** -10 if out_dtype == torch.float16 else 2 ** -7
    torch.testing.assert_close(out.cpu().float(), full, rtol=step, atol=1e-3)


def test_groups_normalise_apart():
    # Two groups, one scaled by 100: per group each comes out at unit RMS; as one row they would not.
    y = torch.cat([torch.ones(1, 8), 100 * torch.ones(1, 8)], dim=-1).to(DEVICE)
    z = torch.full((1, 16), 20.0, device=DEVICE)  # silu(20) = 20 to fp32 precision
    out = gated_norm.gated_rmsnorm(y, z, None, torch.ones(16, device=DEVICE), 0.0, group_size=8).cpu()
    torch.testing.assert_close(out, torch.ones(1, 16), rtol=1e-5, atol=0)


def test_a_gate_sliced_out_of_in_projs_output_is_read_in_place():
    g = torch.Generator().manual_seed(2)
    projected = torch.randint(-128, 128, (2, 5, 40 + 64), generator=g, dtype=torch.int8).to(DEVICE)
    z = projected[..., :40]  # the gate: a strided view, rows 104 elements apart
    y, weight, scale = torch.randn(2, 5, 40, generator=g), torch.randn(40, generator=g), torch.tensor(0.1)
    out = gated_norm.gated_rmsnorm(y.to(DEVICE), z, scale.to(DEVICE), weight.to(DEVICE), 1e-6)
    expected = gated_norm.gated_rmsnorm_reference(y, z.cpu(), scale, weight, 1e-6)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(z=torch.zeros(2, 7)), "one shape"),
    (dict(z_scale=None), "needs its scale"),
    (dict(z_scale=torch.ones(2)), "per tensor"),
    (dict(weight=torch.ones(7)), "weight must be"),
    (dict(out_dtype=torch.int8), "out_dtype"),
    (dict(group_size=3), "does not divide"),
])
def test_inconsistent_arguments_are_refused_by_name(change, message):
    args = dict(y=torch.zeros(2, 8), z=torch.zeros(2, 8, dtype=torch.int8), z_scale=torch.tensor(1.0),
                weight=torch.ones(8), eps=1e-5, out_dtype=torch.float32)
    with pytest.raises(InputError, match=message):
        gated_norm.gated_rmsnorm(**{**args, **change})


def test_the_op_has_a_fake_that_matches():
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, 3, 16, generator=g).to(DEVICE), torch.randint(-128, 128, (2, 3, 16), generator=g,
            dtype=torch.int8).to(DEVICE), torch.tensor(0.1).to(DEVICE), torch.randn(16, generator=g).to(DEVICE),
            1e-5, torch.float16, 8)
    torch.library.opcheck(torch.ops.quamba.gated_rmsnorm.default, args)
