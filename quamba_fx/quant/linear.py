"""`QuantizedLinear`: the W8A8 module that replaces an `nn.Linear` at the same module path; and
`Int8Embedding`, the token embedding that shares a tied W8A8 head's int8 table."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .qops import quantize_weight_per_channel


class _PerChannelLinear(nn.Module):
    """What every quantized Linear shares: a `[N, K]` weight of `WEIGHT_DTYPE` with per-output-channel
    fp32 scales, an fp32 bias, and a forward that calls its reference op. Subclasses name the
    dtype, the weight quantizer and the op."""

    WEIGHT_DTYPE: torch.dtype
    WEIGHT_KIND: str  # for messages, e.g. "an int8"
    LABEL: str  # for extra_repr
    # weight [N, K] -> (quantized weight, fp32 scale [N])
    quantize_weight: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype):
        super().__init__()
        if weight.dtype != self.WEIGHT_DTYPE or weight.dim() != 2:
            raise ValueError(f"{type(self).__name__} needs {self.WEIGHT_KIND} [N, K] weight, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "_PerChannelLinear":
        """Quantize `linear`'s weight per output channel (abs-max, symmetric).

        Extra buffers a pass registered on the float module (activation scales) are carried over,
        so `get_attr` nodes pointing at them stay valid after the swap.
        """
        weight = linear.weight.detach()
        if weight.is_meta:  # rebuilding a graph skeleton before loading a checkpoint into it
            w_q = torch.empty(weight.shape, dtype=cls.WEIGHT_DTYPE, device="meta")
            w_scale = torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
        else:
            w_q, w_scale = cls.quantize_weight(weight)
        q = cls(w_q, w_scale, linear.bias, linear.weight.dtype)
        for name, buffer in linear.named_buffers(recurse=False):
            q.register_buffer(name, buffer)
        return q

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.LABEL} per-channel"


class QuantizedLinear(_PerChannelLinear):
    """int8 weight `[N, K]` with per-output-channel fp32 scales, fp32 bias, int8 activations.

    `forward(x_q, x_scale, out_scale=None)`: `x_q` is int8 `[..., K]` quantized with the per-tensor
    `x_scale`; the result is int8 at `out_scale` when given, else `out_dtype` (the float Linear's
    dtype). Activation scales are graph inputs, not attributes, because they belong to the edge: the
    producer's scale is shared by every consumer of the same int8 tensor.
    """

    WEIGHT_DTYPE = torch.int8
    WEIGHT_KIND = "an int8"
    LABEL = "int8"
    quantize_weight = staticmethod(quantize_weight_per_channel)

    def forward(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = None if out_scale is not None else self.out_dtype
        return torch.ops.quamba.int8_linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, out_scale, out_dtype)


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 codes with one fp32 scale a row: `weight` `[V, D]` and
    `weight_scale` `[V]`, a `QuantizedLinear`'s layout, so a head tied to the embedding shares both
    tensors with it (`sharing`). `forward(ids)` gives `[*ids.shape, D]` in `out_dtype`
    (`quamba.int8_embedding`)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or tuple(weight_scale.shape) != (weight.shape[0],):
            raise ValueError(f"Int8Embedding needs an int8 [V, D] table and [V] scales, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(weight_scale.shape)}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def sharing(cls, head: QuantizedLinear) -> "Int8Embedding":
        """The embedding of a head tied to it: the head's int8 weight and row scales, not copies."""
        return cls(head.weight, head.weight_scale, head.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quamba.int8_embedding(ids, self.weight, self.weight_scale, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 table, one scale a row"
