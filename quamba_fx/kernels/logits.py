"""The language-model head with fp32 logits written by its GEMM.

Hugging Face's Mamba heads compute `lm_head(h).float()`. In a 16-bit lowering that is a GEMM
writing `[tokens, vocab]` in fp16 and a second kernel reading them back to write fp32: at 8 x 2048
tokens of a 50k vocabulary, 1.6 GB written, read again and 3.3 GB written, 2.4-2.5 ms of a
160-180 ms prefill on an H100 (docs/benchmarks.md, session 41). cuBLAS accumulates in fp32
anyway and can write fp32 itself (`torch.mm(..., out_dtype=torch.float32)`, CUDA only), which
also spares the logits their fp16 rounding. Elsewhere the op is the reference,
`F.linear(x, weight).float()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import graph_op

__all__ = ["logits_linear", "logits_linear_reference"]

# `aten::mm.dtype` (16-bit operands, fp32 result) has a CUDA kernel only.
_MM_TO_FP32 = hasattr(torch.ops.aten.mm, "dtype")
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def logits_linear_reference(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight).float()`: what the captured head computes."""
    return F.linear(x, weight).float()


@graph_op("quamba::logits_linear")
def logits_linear(x: Tensor, weight: Tensor) -> Tensor:
    """`x [..., K] @ weight[V, K]^T` as fp32 `[..., V]`: on CUDA with 16-bit `x` and `weight` of
    one dtype, one cuBLAS GEMM with an fp32 result (sums not rounded to 16 bits); otherwise
    `logits_linear_reference`."""
    if _MM_TO_FP32 and x.is_cuda and x.dtype in _SIXTEEN_BIT and weight.dtype == x.dtype and x.numel():
        out = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
        return out.view(*x.shape[:-1], weight.shape[0])
    return logits_linear_reference(x, weight)


@logits_linear.register_fake
def _logits_linear_fake(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)
