"""The int8 embedding gather (`quamba::int8_embedding_gather`, kernels/gather_int8.py) against its
reference (`quant.qops.int8_embedding`): the same bits, NaN rows for ids outside the table, and
the reference's checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import gather_int8
from quamba_fx.quant.qops import int8_embedding, quantize_weight_per_channel

from .kernel_support import DEVICE, needs_kernel


def table(vocab: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))
    return quantize_weight_per_channel(weight)


def test_the_reference_is_code_times_row_scale_rounded_once():
    codes, scale = table(5, 3, 0)
    ids = torch.tensor([[4, 0], [2, 2]])
    want = (codes[ids].to(torch.float32) * scale[ids][..., None]).to(torch.float16)
    assert torch.equal(int8_embedding(ids, codes, scale, torch.float16), want)
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 5\), got \[-1, 4\]"):
        int8_embedding(torch.tensor([4, -1]), codes, scale, torch.float16)
    with pytest.raises(ValueError, match=r"the scales must be fp32 \[5\] \(one a row\)"):
        int8_embedding(ids, codes, scale[:4], torch.float16)
    with pytest.raises(ValueError, match="the table must be int8"):
        int8_embedding(ids, codes.float(), scale, torch.float16)
    with pytest.raises(ValueError, match="ids must be int64 or int32"):
        int8_embedding(ids.float(), codes, scale, torch.float16)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(1, 40), dim=st.integers(1, 300), shape=st.sampled_from([(1,), (1, 1), (3, 5), (2, 1, 4)]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       index_dtype=st.sampled_from([torch.int64, torch.int32]), seed=st.integers(0, 999))
def test_the_gather_gives_the_reference_rows_bit_for_bit(vocab, dim, shape, dtype, index_dtype, seed):
    # dims that are not a multiple of the kernel's column block, and more ids than its row block.
    codes, scale = table(vocab, dim, seed)
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed), dtype=index_dtype)
    got = gather_int8.int8_embedding_gather(ids.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE), dtype)
    assert got.shape == (*shape, dim) and got.dtype == dtype
    assert torch.equal(got.cpu(), int8_embedding(ids, codes, scale, dtype))


@needs_kernel
def test_an_id_outside_the_table_is_a_nan_row_in_the_kernel():
    codes, scale = table(10, 300, 1)
    ids = torch.tensor([[3, 10, -1, 9]])
    got = gather_int8.int8_embedding_gather(ids.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE), torch.float16).cpu()
    assert got[0, 1].isnan().all() and got[0, 2].isnan().all()
    assert torch.equal(got[0, [0, 3]], int8_embedding(ids[:, [0, 3]], codes, scale, torch.float16)[0])
    empty = gather_int8.int8_embedding_gather(ids[:, :0].to(DEVICE), codes.to(DEVICE), scale.to(DEVICE),
                                              torch.float16)
    assert empty.shape == (1, 0, 300)
