"""Capture a `transformers` Mamba model as one torch.fx graph.

We do not trace Hugging Face's `forward`: it branches on caches, kernel availability and training mode,
and changes between 5.x releases. Instead `_MambaRoot.forward` restates the Mamba-1 inference dataflow
over the model's own submodules, so every Linear/Conv1d/Embedding/RMSNorm stays a `call_module` node
under its Hugging Face path (`backbone.layers.0.mixer.conv1d`), the scan is one
`torch.ops.quamba.selective_scan` node, and the test suite pins the result to HF's eager logits.

Every node gets `node.meta["quamba"] = {"role", "block", "module"}` from the `_stage` context that was
open when the tracer created it, and `node.meta["tensor_meta"]` from shape propagation.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from transformers import MambaForCausalLM, MambaModel

from . import ops  # noqa: F401  (registers torch.ops.quamba.*)
from .checkpoint_format import save_pretrained
from .errors import InputError, MetaDeviceError, UnsupportedModelError
from .graph_info import META_KEY  # noqa: F401  (re-exported: passes and tests read it from here)
from .models import load_model
from .text import attach_tokenizer

# Roles of nodes, in dataflow order. Glue nodes (transpose, split, casts) take the role of the stage
# they serve, so a dump or a pass can select a whole stage by role.
ROLES = (
    "input", "embedding", "norm", "residual", "in_proj", "conv1d", "x_proj", "dt_proj", "scan",
    "out_proj", "norm_f", "lm_head", "output",
)

_current_stage: dict = {"role": "input", "block": None, "module": ""}


@contextlib.contextmanager
def _stage(role: str, block: int | None = None, module: str = "") -> Iterator[None]:
    """Label every node traced inside the block with a role, block index and module path."""
    global _current_stage
    saved = _current_stage
    _current_stage = {"role": role, "block": block, "module": module}
    try:
        yield
    finally:
        _current_stage = saved


def check_input_ids(input_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """Validate what a captured graph is called with; a node of its own at the top of every graph."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be int64 or int32 token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)}): batch and seq_len must be >= 1")
    if embedding_weight.is_meta and not input_ids.is_meta:
        raise MetaDeviceError(
            "this graph was captured from a model on the meta device: it has shapes but no weights. "
            "Load real weights (a checkpoint or a built-in model on cpu/cuda) and capture again to run it."
        )
    # The range check reads the data; on CUDA that would sync every call, and the embedding's own
    # device assert catches it there, so only CPU pays for the friendlier message.
    if input_ids.device.type != "cpu":
        return input_ids
    # Traced by dynamo, or by AOT/make_fx (fake or functional tensor subclasses): compilers drop
    # Python checks, so the check becomes an op of the graph they build.
    if torch.compiler.is_compiling() or type(input_ids) is not torch.Tensor:
        return torch.ops.quamba.token_ids_in_range(input_ids, embedding_weight.shape[0])
    ops.check_token_range(input_ids, embedding_weight.shape[0])
    return input_ids


class MambaGraphModule(torch.fx.GraphModule):
    """The GraphModule `capture` returns: a plain `torch.fx.GraphModule` plus `save_pretrained`."""

    def save_pretrained(self, path, overwrite: bool = True, *, tokenizer=None) -> None:
        """Write this graph's weights and scales (safetensors), its recipe (JSON) and its tokenizer
        (`tokenizer`, else the one it carries), atomically.

        `quamba_fx.from_pretrained(path)` rebuilds the same graph; see `quamba_fx.save_pretrained`
        for what `path` may already hold and what `overwrite` allows.
        """
        save_pretrained(self, path, overwrite=overwrite, tokenizer=tokenizer)


class _MambaTracer(torch.fx.Tracer):
    """Keeps Linear/Conv1d/Embedding/RMSNorm as modules and stamps each node with the current stage."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(check_input_ids,))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)) or type(m).__name__.endswith("RMSNorm")

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        stage = dict(_current_stage)
        if kind == "call_module":
            stage["module"] = target
        node.meta[META_KEY] = stage
        return node


class _MambaRoot(nn.Module):
    """The model's submodules under their Hugging Face paths, with a traceable Mamba-1 forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.has_head = isinstance(model, MambaForCausalLM)
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
        layers = self.backbone.layers if self.has_head else self.layers
        self.act_dtypes = [layer.norm.weight.dtype for layer in layers]
        self.head_dtype = self.lm_head.weight.dtype if self.has_head else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone if self.has_head else self
        p = self.prefix
        with _stage("input"):
            input_ids = check_input_ids(input_ids, backbone.embeddings.weight)
            seq_len = input_ids.size(1)
        with _stage("embedding", module=f"{p}embeddings"):
            hidden = backbone.embeddings(input_ids)
        for i, layer in enumerate(backbone.layers):
            hidden = self._block(layer, hidden, seq_len, i, f"{p}layers.{i}")
        with _stage("norm_f", module=f"{p}norm_f"):
            hidden = backbone.norm_f(hidden)
        if not self.has_head:
            return hidden
        with _stage("lm_head", module="lm_head"):
            return self.lm_head(hidden.to(self.head_dtype)).float()

    def _block(self, layer: nn.Module, hidden, seq_len, i: int, path: str):
        mixer, m = layer.mixer, f"{path}.mixer"
        act_dtype = self.act_dtypes[i]
        with _stage("norm", i, f"{path}.norm"):
            normed = layer.norm(hidden.to(act_dtype))
        with _stage("in_proj", i, f"{m}.in_proj"):
            xz = mixer.in_proj(normed).transpose(1, 2)
            halves = xz.chunk(2, dim=1)
            x, z = halves[0], halves[1]
        with _stage("conv1d", i, f"{m}.conv1d"):
            x = mixer.conv1d(x)[:, :, :seq_len]
            x = F.silu(x)
        with _stage("x_proj", i, f"{m}.x_proj"):
            x_dbl = mixer.x_proj(x.transpose(1, 2))
            rank, n = mixer.time_step_rank, mixer.ssm_state_size
            parts = torch.split(x_dbl, [rank, n, n], dim=-1)
            dt, B, C = parts[0], parts[1], parts[2]
        with _stage("dt_proj", i, f"{m}.dt_proj"):
            # The bias is applied here rather than inside the scan: softplus(W dt + b) either way.
            dt = mixer.dt_proj(dt).transpose(1, 2)
        with _stage("scan", i, m):
            A = -torch.exp(mixer.A_log.float())
            y = torch.ops.quamba.selective_scan(
                x, dt, A, B.transpose(1, 2), C.transpose(1, 2), mixer.D.float(), z, None, True
            )
        with _stage("out_proj", i, f"{m}.out_proj"):
            out = mixer.out_proj(y.transpose(1, 2).to(act_dtype))
        with _stage("residual", i, path):
            residual = hidden.to(torch.float32) if layer.residual_in_fp32 else hidden
            return residual + out


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, (MambaForCausalLM, MambaModel)):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        detail = f" (config.model_type={kind!r})" if kind else ""
        raise UnsupportedModelError(
            f"capture supports transformers MambaForCausalLM and MambaModel; got {type(model).__name__}{detail}"
        )
    act = model.config.hidden_act
    if act != "silu":
        raise UnsupportedModelError(f"Mamba blocks with hidden_act={act!r} are not supported (only 'silu')")


ARCHITECTURE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "state_size", "num_hidden_layers",
    "expand", "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias", "residual_in_fp32",
    "layer_norm_epsilon", "tie_word_embeddings", "hidden_act",
)


def architecture(config) -> dict:
    """The config fields that define the computation (the rest of a HF config is bookkeeping)."""
    return {key: getattr(config, key) for key in ARCHITECTURE_KEYS if hasattr(config, key)}


def capture(
    model: nn.Module | str,
    example_shape: tuple[int, int] = (1, 8),
    propagate_shapes: bool = True,
) -> torch.fx.GraphModule:
    """Capture a Mamba model as one `torch.fx.GraphModule` mapping `input_ids [B, L]` to logits.

    `model` is a `MambaForCausalLM` (output: fp32 logits `[B, L, vocab]`), a `MambaModel` (output: the
    last hidden state) or anything `quamba_fx.load_model` accepts (a built-in name or a checkpoint dir;
    a directory's tokenizer is kept in `gm.meta["quamba"]["tokenizer"]`, see `quamba_fx.text`).
    Models on the meta device are captured too; their graphs can be inspected and dumped, and raise
    `MetaDeviceError` when run. Shapes recorded in `node.meta["tensor_meta"]` are those of an
    `example_shape` input, computed with fake tensors (no arithmetic is done).
    """
    source = model if isinstance(model, str) else None
    if source is not None:
        model = load_model(source)
    _check_supported(model)
    started = time.perf_counter()
    root = _MambaRoot(model)
    graph = _MambaTracer().trace(root)
    gm = MambaGraphModule(root, graph, class_name="MambaGraphModule")
    config = model.config
    gm.meta[META_KEY] = {
        "source": type(model).__name__,
        "num_blocks": config.num_hidden_layers,
        "config": architecture(config),
        "prefix": root.prefix,
        "on_meta_device": model.get_input_embeddings().weight.is_meta,
        "hf_config": config.to_dict(),
        "dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
    }
    if source is not None:
        attach_tokenizer(gm, source)  # a model directory's tokenizer travels with its graph
    if propagate_shapes:
        annotate_shapes(gm, example_shape)
    gm.meta[META_KEY]["capture_seconds"] = time.perf_counter() - started
    return gm


def annotate_shapes(gm: torch.fx.GraphModule, example_shape: tuple[int, int] = (1, 8)) -> None:
    """Record shape/dtype of every node for an `example_shape` input, using fake tensors only.

    The example input is itself fake, so no memory is allocated whatever the shape.
    """
    weight = next(iter(gm.parameters()))
    device = "meta" if weight.is_meta else weight.device
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        example = torch.zeros(example_shape, dtype=torch.long, device=device)
    ShapeProp(gm, fake_mode=fake_mode).propagate(example)
    gm.meta[META_KEY]["example_shape"] = list(example_shape)
