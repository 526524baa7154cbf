"""What the traceable roots of Mamba-1 and Mamba-2 share: the model's submodules under their Hugging
Face paths, and the forward around the blocks (embeddings -> blocks -> norm_f -> lm_head).

We do not trace Hugging Face's `forward`: it branches on caches, kernel availability and training
mode, and changes between 5.x releases. A root restates the inference dataflow over the model's own
submodules, so every Linear/Conv1d/Embedding/RMSNorm stays a module call under its Hugging Face
path; each architecture's subclass writes its block (`_block`), where the scan is one custom op.
"""

from __future__ import annotations

import torch
from torch import nn

from .tracing import check_input_ids, stage

__all__ = ["BackboneRoot"]


class BackboneRoot(nn.Module):
    """A causal LM (`head_class`: backbone under `backbone.`, plus `lm_head`) or its bare backbone,
    traced block by block; subclasses implement `_block(layer, hidden, seq_len, i, path)`."""

    def __init__(self, model: nn.Module, head_class: type):
        super().__init__()
        self.has_head = isinstance(model, head_class)
        if self.has_head:
            self.backbone = model.backbone
            self.lm_head = model.lm_head
            self.prefix = "backbone."
        else:
            self.embeddings, self.layers, self.norm_f = model.embeddings, model.layers, model.norm_f
            self.prefix = ""
        self.config = model.config
        # Plain Python values, read before tracing: the tracer would turn `weight.dtype` into nodes.
        # Capture after choosing the model's dtype.
        self.act_dtypes = [layer.norm.weight.dtype for layer in self.block_modules()]
        self.head_dtype = self.lm_head.weight.dtype if self.has_head else None

    def block_modules(self) -> nn.ModuleList:
        """The model's blocks, in order."""
        return self.backbone.layers if self.has_head else self.layers

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone if self.has_head else self
        p = self.prefix
        with stage("input"):
            input_ids = check_input_ids(input_ids, backbone.embeddings.weight)
            seq_len = input_ids.size(1)
        with stage("embedding", module=f"{p}embeddings"):
            hidden = backbone.embeddings(input_ids)
        for i, layer in enumerate(backbone.layers):
            hidden = self._block(layer, hidden, seq_len, i, f"{p}layers.{i}")
        with stage("norm_f", module=f"{p}norm_f"):
            hidden = backbone.norm_f(hidden)
        if not self.has_head:
            return hidden
        with stage("lm_head", module="lm_head"):
            return self.lm_head(hidden.to(self.head_dtype)).float()

    def _block(self, layer: nn.Module, hidden, seq_len, i: int, path: str):
        raise NotImplementedError(f"{type(self).__name__} must define _block")

    @staticmethod
    def _residual(layer: nn.Module, hidden, out, i: int, path: str):
        """The block's residual add (in fp32 when the block says `residual_in_fp32`)."""
        with stage("residual", i, path):
            residual = hidden.to(torch.float32) if layer.residual_in_fp32 else hidden
            return residual + out
