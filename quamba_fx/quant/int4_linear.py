"""`W4A16Linear` and `W4A8Linear`: Quamba2's 4-bit-weight modules that replace an `nn.Linear` at
the same module path, and `W4Embedding`, which replaces the token embedding (the packing and the
ops are in `quant/int4.py`)."""

from __future__ import annotations

import torch
from torch import nn

from .gptq import gptq_int4
from .int4 import group_count, packed_columns, quantize_weight_int4, w4_embedding  # noqa: F401  (registers the op)


def _check_packed(owner: nn.Module, weight: torch.Tensor, weight_scale: torch.Tensor, k: int, group_size: int) -> int:
    """The rows of a packed 4-bit matrix of `k` columns (uint8 `[rows, ceil(k/2)]`) with its group
    scales (`[rows, groups]`); a ValueError naming `owner`'s class for any other shape."""
    rows = weight.shape[0]
    if weight.dtype != torch.uint8 or tuple(weight.shape) != (rows, packed_columns(k)):
        raise ValueError(f"{type(owner).__name__} needs a packed uint8 [N, {packed_columns(k)}] weight for "
                         f"K={k}, got {weight.dtype} {tuple(weight.shape)}")
    if tuple(weight_scale.shape) != (rows, group_count(k, group_size)):
        raise ValueError(f"{type(owner).__name__}: weight_scale must be [N, groups] = "
                         f"[{rows}, {group_count(k, group_size)}], got {tuple(weight_scale.shape)}")
    return rows


class _Int4Linear(nn.Module):
    """A packed 4-bit weight (`weight`, uint8 `[N, ceil(K/2)]`), its fp16 group scales
    (`weight_scale`, `[N, ceil(K/group_size)]`) and an fp32 bias; subclasses say what the input is."""

    LABEL: str

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, group_size: int, out_dtype: torch.dtype):
        super().__init__()
        n = _check_packed(self, weight, weight_scale, in_features, group_size)
        self.in_features, self.out_features = in_features, n
        self.group_size = group_size
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.to(torch.float16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, hessian: torch.Tensor | None = None) -> "_Int4Linear":
        """Quantize `linear`'s weight to grouped int4: with GPTQ when its input `hessian` is given,
        else round-to-nearest. Buffers a pass registered on the float module (activation scales)
        are carried over, so `get_attr` nodes pointing at them stay valid after the swap."""
        weight = linear.weight.detach()
        n, k = weight.shape
        if weight.is_meta:  # rebuilding a graph skeleton before loading a checkpoint into it
            packed = torch.empty(n, packed_columns(k), dtype=torch.uint8, device="meta")
            scale = torch.empty(n, group_count(k, group_size), dtype=torch.float16, device="meta")
        elif hessian is not None:
            packed, scale = gptq_int4(weight, hessian, group_size)
        else:
            packed, scale = quantize_weight_int4(weight, group_size)
        q = cls(packed, scale, linear.bias, k, group_size, linear.weight.dtype)
        for name, buffer in linear.named_buffers(recurse=False):
            q.register_buffer(name, buffer)
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.LABEL}, int4 weights in groups of {self.group_size}")


class W4A16Linear(_Int4Linear):
    """Weight-only 4-bit Linear: `forward(x)` takes and returns floats (`quamba.w4a16_linear`)."""

    LABEL = "W4A16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quamba.w4a16_linear(x, self.weight, self.weight_scale, self.group_size, self.bias)


class W4A8Linear(_Int4Linear):
    """4-bit weights, int8 activations: `forward(x_q, x_scale, out_scale=None)` as `QuantizedLinear`'s
    (int8 out at `out_scale`, else the float Linear's dtype); see `quamba.w4a8_linear`."""

    LABEL = "W4A8"

    def forward(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = None if out_scale is not None else self.out_dtype
        return torch.ops.quamba.w4a8_linear(x_q, x_scale, self.weight, self.weight_scale, self.group_size,
                                            self.bias, out_scale, out_dtype)


class W4Embedding(nn.Module):
    """A token embedding stored as a 4-bit table: `weight` (uint8 `[V, ceil(D/2)]`) and
    `weight_scale` (fp16 `[V, groups]`) in `W4A16Linear`'s layout, so a head tied to the embedding
    shares both tensors with it. `forward(ids)` gives `[*ids.shape, D]` in `out_dtype`
    (`quamba.w4_embedding`)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, embedding_dim: int, group_size: int,
                 out_dtype: torch.dtype):
        super().__init__()
        self.num_embeddings = _check_packed(self, weight, weight_scale, embedding_dim, group_size)
        self.embedding_dim = embedding_dim
        self.group_size = group_size
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, group_size: int) -> "W4Embedding":
        """Round `embedding`'s table to nearest, `group_size` columns a scale."""
        table = embedding.weight.detach()
        v, d = table.shape
        if table.is_meta:  # rebuilding a graph skeleton before loading a checkpoint into it
            packed = torch.empty(v, packed_columns(d), dtype=torch.uint8, device="meta")
            scale = torch.empty(v, group_count(d, group_size), dtype=torch.float16, device="meta")
        else:
            packed, scale = quantize_weight_int4(table, group_size)
        return cls(packed, scale, d, group_size, table.dtype)

    @classmethod
    def sharing(cls, head: _Int4Linear) -> "W4Embedding":
        """The embedding of a head tied to it: the same packed tensor and scales, not copies."""
        return cls(head.weight, head.weight_scale, head.in_features, head.group_size, head.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quamba.w4_embedding(ids, self.weight, self.weight_scale, self.group_size, self.embedding_dim,
                                             self.out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int4 table in groups of {self.group_size}")
