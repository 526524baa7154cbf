"""Hadamard matrices, the fast transform and the out_proj weight fold."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quamba_fx.quant import fold_hadamard_into_linear_weight, hadamard_matrix, hadamard_transform, is_hadamard_size
from quamba_fx.quant.hadamard import _decompose, _paley_int, _paley_kind

SMALL_SIZES = [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 40, 44, 48, 56, 60, 76, 80, 96, 112, 128, 144, 160, 192, 256, 400]
MAMBA_SIZES = [1536, 2048, 2560, 3072, 4096, 5120]


@pytest.mark.parametrize("n", SMALL_SIZES)
def test_small_sizes_are_orthonormal_with_equal_magnitude_entries(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float32
    torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-5, rtol=0)
    expected = torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)
    assert torch.equal(h.abs(), expected.expand(n, n))


@pytest.mark.parametrize("n", MAMBA_SIZES)
def test_mamba_d_inner_sizes_are_orthonormal(n):
    h = hadamard_matrix(n)
    assert torch.equal(h.abs(), torch.tensor(1.0 / math.sqrt(n)).expand(n, n))
    # A full n^3 product is too slow for 5120 on 2 cores; a random set of rows checks every column.
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:48]
    torch.testing.assert_close(h[rows] @ h.T, torch.eye(n)[rows], atol=1e-5, rtol=0)


def test_mamba_sizes_use_small_dense_bases():
    # 12 and 20 keep the dense factor cheap: the rest is the O(n log n) butterfly.
    assert _decompose(1536) == ((12,), 7)
    assert _decompose(2560) == ((20,), 7)
    assert _decompose(3072) == ((12,), 8)
    assert _decompose(5120) == ((20,), 8)
    assert _decompose(2048) == ((), 11)


@pytest.mark.parametrize("order,kind", [(12, "I"), (20, "I"), (24, "I"), (28, "II"), (36, "II"), (44, "I"),
                                        (60, "I"), (76, "II"), (84, "I"), (108, "I"), (148, "II")])
def test_paley_integer_matrices_are_hadamard(order, kind):
    assert _paley_kind(order) == kind
    h = _paley_int(order).to(torch.int64)
    assert set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.int64))


def test_base_matrices_are_cached():
    assert _paley_int(12) is _paley_int(12)
    # The cached integer matrix must survive a caller scaling the float result in place.
    hadamard_matrix(12).mul_(3.0)
    assert set(_paley_int(12).unique().tolist()) == {-1, 1}


@pytest.mark.parametrize("n", [1, 2, 8, 12, 24, 28, 40, 48, 56, 80, 96, 112, 144, 160, 192, 256, 400, 1536, 2560])
def test_transform_equals_matmul(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    h = hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ h.T, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, inverse=True), x @ h, atol=1e-12, rtol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(hadamard_transform(x32), x32 @ h.float().T, atol=1e-5, rtol=1e-5)


def test_transform_along_other_dim_and_dtypes():
    x = torch.randn(2, 24, 7)
    h = hadamard_matrix(24)
    torch.testing.assert_close(hadamard_transform(x, dim=1), torch.einsum("bnl,mn->bml", x, h), atol=1e-5, rtol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        y = hadamard_transform(x.to(dtype), dim=-2)
        assert y.dtype == dtype and y.shape == x.shape
    assert hadamard_transform(x.double(), dim=1).dtype == torch.float64
    assert hadamard_transform(torch.empty(0, 3, 24)).shape == (0, 3, 24)


def test_transform_does_not_modify_its_input():
    x = torch.randn(4, 64)
    before = x.clone()
    hadamard_transform(x)
    hadamard_transform(x.float(), inverse=True)
    assert torch.equal(x, before)


def test_inverse_undoes_forward():
    x = torch.randn(6, 1536, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), inverse=True), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x, inverse=True)), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [24, 40, 56, 1536])
def test_fold_into_linear_keeps_output(n):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(32, n, generator=g) / math.sqrt(n)
    b = torch.randn(32, generator=g)
    y = torch.randn(2, 9, n, generator=g)
    y[..., 3] *= 50.0  # an outlier channel, the reason for rotating
    w_folded = fold_hadamard_into_linear_weight(w)
    assert w_folded.shape == w.shape and w_folded.dtype == w.dtype
    torch.testing.assert_close(F.linear(hadamard_transform(y), w_folded, b), F.linear(y, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w_folded, w @ hadamard_matrix(n).T, atol=1e-6, rtol=1e-5)


def test_fold_keeps_weight_dtype_and_rejects_non_matrices():
    assert fold_hadamard_into_linear_weight(torch.randn(8, 48, dtype=torch.float16)).dtype == torch.float16
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        fold_hadamard_into_linear_weight(torch.randn(48))


def test_rotation_spreads_an_outlier_channel():
    y = torch.zeros(1, 1536)
    y[0, 7] = 100.0
    # One channel of 100 becomes 1536 channels of 100/sqrt(1536) ~ 2.55: what makes int8 per-tensor fit.
    assert hadamard_transform(y).abs().max().item() == pytest.approx(100.0 / math.sqrt(1536), rel=1e-5)


@pytest.mark.parametrize("n,nearest", [(6, "4 and 8"), (7, "4 and 8"), (100, "96 and 104"), (3, "2 and 4"),
                                       (52, "48 and 56"), (1528, "1524 and 1532")])
def test_unsupported_sizes_name_the_nearest(n, nearest):
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError, match=f"n={n}.*Paley.*nearest supported sizes: {nearest}"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match=f"nearest supported sizes: {nearest}"):
        hadamard_transform(torch.randn(2, n))


@pytest.mark.parametrize("n", [0, -4, 2.0, True, "8"])
def test_invalid_sizes(n):
    with pytest.raises(ValueError):
        hadamard_matrix(n)


def test_transform_rejects_integer_and_scalar_tensors():
    with pytest.raises(TypeError, match="floating"):
        hadamard_transform(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one dimension"):
        hadamard_transform(torch.tensor(1.0))


def test_supported_size_predicate():
    for n in SMALL_SIZES + MAMBA_SIZES:
        assert is_hadamard_size(n)
    for n in (0, 3, 5, 6, 10, 18, 100, 8.0):
        assert not is_hadamard_size(n)


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([1, 2, 4, 12, 16, 20, 24, 28, 40, 48, 56, 80, 96, 112, 160, 192, 256]),
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    inverse=st.booleans(),
)
def test_transform_property(n, batch, seed, inverse):
    x = torch.randn(*batch, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h = hadamard_matrix(n, dtype=torch.float64)
    y = hadamard_transform(x, inverse=inverse)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x @ (h if inverse else h.T), atol=1e-12, rtol=1e-12)
    # Orthonormal: norms are preserved.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=1e-12)
