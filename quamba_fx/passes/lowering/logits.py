"""Lowering rules of the head (kernels/logits.py): `float(lm_head(x))` becomes one GEMM writing fp32,
a 16-bit head through cuBLAS, an int8 one (`Recipe.head`) through our int8 GEMM.

It matches the head only once its weight is 16-bit, so `LowerToKernels` runs it after casting the
float leftovers (embedding, lm_head) to the lowering's dtype; an fp32 lowering keeps the Linear.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ...kernels import logits as logits_kernel  # noqa: F401  (registers torch.ops.quamba.logits_linear)
from ..rewrite import Rule
from .gemm import W8A8_LINEAR
from .match import annotate, get_attr, is_fp32_cast

LOGITS_LINEAR = torch.ops.quamba.logits_linear.default

KERNELS = {LOGITS_LINEAR: "cublas:mm_fp32_out"}


def fuse_fp32_logits(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """`float(linear(x))`, the Linear bias-free with a 16-bit weight and the cast its only reader,
    -> `logits_linear(x, weight)`. The Linear stays a submodule (`get_output_embeddings`)."""
    if not is_fp32_cast(node) or node.kwargs:
        return False
    head = node.args[0]
    if not (isinstance(head, torch.fx.Node) and head.op == "call_module" and len(head.users) == 1
            and len(head.args) == 1 and not head.kwargs):
        return False
    module = gm.get_submodule(head.target)
    if type(module) is not nn.Linear or module.bias is not None or module.weight.dtype not in (torch.float16,
                                                                                               torch.bfloat16):
        return False
    graph = gm.graph
    with graph.inserting_before(node):
        weight = get_attr(graph, f"{head.target}.weight", head)
        new = graph.call_function(LOGITS_LINEAR, (head.args[0], weight))
    node.replace_all_uses_with(annotate(new, head))
    graph.erase_node(node)
    graph.erase_node(head)
    return True


def int8_head_writes_fp32(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """`float(w8a8_linear(..., out_dtype=16-bit))`, the cast its only reader (a W8A8 head, as
    `Recipe.head` makes it) -> the same GEMM writing fp32: its epilogue scales fp32 sums anyway, and
    the fp16 logits would be written, read back and written again, as the float head's were."""
    if not is_fp32_cast(node) or node.kwargs:
        return False
    gemm = node.args[0]
    if not (isinstance(gemm, torch.fx.Node) and gemm.target is W8A8_LINEAR and len(gemm.users) == 1
            and len(gemm.args) == 7 and gemm.args[5] is None and gemm.args[6] in (torch.float16, torch.bfloat16)):
        return False
    gemm.args = (*gemm.args[:6], torch.float32)
    node.replace_all_uses_with(gemm)
    gm.graph.erase_node(node)
    return True


# Run after the float leftovers are cast (see the module docstring) and the GEMMs are lowered.
HEAD_RULES: list[Rule] = [fuse_fp32_logits, int8_head_writes_fp32]
