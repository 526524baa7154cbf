"""`Fp8Linear`: the FP8 (e4m3) W8A8 module that replaces an `nn.Linear` at the same module path."""

from __future__ import annotations

import torch
from torch import nn

from .fp8 import FP8_DTYPE, quantize_weight_per_channel_fp8


class Fp8Linear(nn.Module):
    """e4m3 weight `[N, K]` with per-output-channel fp32 scales, fp32 bias, e4m3 activations.

    `forward(x_q, x_scale, out_scale=None)`: `x_q` is e4m3 `[..., K]` quantized with the per-tensor
    `x_scale`; the result is int8 at `out_scale` when given (the int8 boundary after in_proj), else
    `out_dtype` (the float Linear's dtype). See `torch.ops.quamba.fp8_linear` for the numerics.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"Fp8Linear needs a float8_e4m3fn [N, K] weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantize `linear`'s weight to e4m3 per output channel (abs-max / 448).

        Extra buffers a pass registered on the float module (activation scales) are carried over,
        so `get_attr` nodes pointing at them stay valid after the swap.
        """
        weight = linear.weight.detach()
        if weight.is_meta:  # rebuilding a graph skeleton before loading a checkpoint into it
            w_q = torch.empty(weight.shape, dtype=FP8_DTYPE, device="meta")
            w_scale = torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
        else:
            w_q, w_scale = quantize_weight_per_channel_fp8(weight)
        q = cls(w_q, w_scale, linear.bias, linear.weight.dtype)
        for name, buffer in linear.named_buffers(recurse=False):
            q.register_buffer(name, buffer)
        return q

    def forward(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = None if out_scale is not None else self.out_dtype
        return torch.ops.quamba.fp8_linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, out_scale, out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3 per-channel"

