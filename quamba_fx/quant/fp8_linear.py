"""`Fp8Linear`: the FP8 (e4m3) W8A8 module that replaces an `nn.Linear` at the same module path."""

from __future__ import annotations

import torch

from .fp8 import FP8_DTYPE, quantize_weight_per_channel_fp8
from .linear import _PerChannelLinear


class Fp8Linear(_PerChannelLinear):
    """e4m3 weight `[N, K]` with per-output-channel fp32 scales, fp32 bias, e4m3 activations.

    `forward(x_q, x_scale, out_scale=None)`: `x_q` is e4m3 `[..., K]` quantized with the per-tensor
    `x_scale`; the result is int8 at `out_scale` when given (the int8 boundary after in_proj), else
    `out_dtype` (the float Linear's dtype). See `torch.ops.quamba.fp8_linear` for the numerics.
    The weight is quantized abs-max / 448 (`quantize_weight_per_channel_fp8`).
    """

    WEIGHT_DTYPE = FP8_DTYPE
    WEIGHT_KIND = "a float8_e4m3fn"
    LABEL = "float8_e4m3"
    quantize_weight = staticmethod(quantize_weight_per_channel_fp8)

    def forward(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = None if out_scale is not None else self.out_dtype
        return torch.ops.quamba.fp8_linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, out_scale, out_dtype)
