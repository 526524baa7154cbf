"""Capture a `transformers` model as one torch.fx graph, as its architecture spec says.

We do not trace Hugging Face's `forward`: it branches on caches, kernel availability and training mode,
and changes between 5.x releases. Instead the architecture spec (`quamba_fx.arch`: Mamba-1, Mamba-2)
gives a root module whose forward restates the inference dataflow over the model's own submodules,
so every Linear/Conv1d/Embedding/RMSNorm stays a `call_module` node under its Hugging Face path
(`backbone.layers.0.mixer.conv1d`), the scan is one `torch.ops.quamba.selective_scan` (Mamba-2:
`ssd_scan`) node, and the test suite pins the result to HF's eager logits.

Every node gets `node.meta["quamba"] = {"role", "block", "module"}` from the `arch.tracing.stage`
context that was open when the tracer created it, and `node.meta["tensor_meta"]` from shape propagation.
"""

from __future__ import annotations

import time

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from . import ops  # noqa: F401  (registers torch.ops.quamba.*)
from .arch import DEFAULT_ARCH, ArchSpec, arch_for_model, arch_for_model_type, arch_named, arch_names
from .arch.tracing import check_input_ids, current_stage  # check_input_ids: re-exported, its old home
from .checkpoint_format import save_pretrained
from .errors import UnsupportedModelError
from .graph_info import META_KEY  # noqa: F401  (re-exported: passes and tests read it from here)
from .graph_meta import GraphMeta, graph_meta, set_graph_meta
from .models import load_model
from .text import attach_tokenizer

# Roles of nodes, in dataflow order, of the default architecture (each spec lists its own).
ROLES = arch_named(DEFAULT_ARCH).roles


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
    """Keeps Linear/Conv1d/Embedding/RMSNorm (and Mamba-2's gated RMSNorm) as modules and stamps each
    node with the current stage."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(check_input_ids,))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)) or type(m).__name__.endswith(("RMSNorm", "RMSNormGated"))

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        stage = current_stage()
        if kind == "call_module":
            stage["module"] = target
        node.meta[META_KEY] = stage
        return node


def _check_supported(model: nn.Module) -> ArchSpec:
    """The spec that captures `model`; `UnsupportedModelError` naming what is accepted otherwise."""
    arch = arch_for_model(model)
    if arch is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        detail = f" (config.model_type={kind!r})" if kind else ""
        accepted = [name for spec in map(arch_named, arch_names()) for name in spec.class_names]
        raise UnsupportedModelError(
            f"capture supports transformers {' and '.join(accepted)}; got {type(model).__name__}{detail}"
        )
    act = model.config.hidden_act
    if act not in arch.activations:
        only = ", ".join(repr(a) for a in arch.activations)
        raise UnsupportedModelError(f"{arch.display_name} blocks with hidden_act={act!r} are not supported (only {only})")
    return arch


# The config fields of the default architecture that define the computation (each spec lists its own).
ARCHITECTURE_KEYS = arch_named(DEFAULT_ARCH).config_keys


def architecture(config) -> dict:
    """The config fields that define the computation (the rest of a HF config is bookkeeping)."""
    arch = arch_for_model_type(getattr(config, "model_type", None)) or arch_named(DEFAULT_ARCH)
    return arch.architecture(config)


def capture(
    model: nn.Module | str,
    example_shape: tuple[int, int] = (1, 8),
    propagate_shapes: bool = True,
) -> torch.fx.GraphModule:
    """Capture a model of a registered architecture (`quamba_fx.arch`) as one `torch.fx.GraphModule`
    mapping `input_ids [B, L]` to logits.

    `model` is a `MambaForCausalLM` (output: fp32 logits `[B, L, vocab]`), a `MambaModel` (output: the
    last hidden state) or anything `quamba_fx.load_model` accepts (a built-in name or a checkpoint dir;
    a directory's tokenizer is kept in `graph_meta(gm).tokenizer`, see `quamba_fx.text`).
    Models on the meta device are captured too; their graphs can be inspected and dumped, and raise
    `MetaDeviceError` when run. Shapes recorded in `node.meta["tensor_meta"]` are those of an
    `example_shape` input, computed with fake tensors (no arithmetic is done).
    """
    source = model if isinstance(model, str) else None
    if source is not None:
        model = load_model(source)
    arch = _check_supported(model)
    started = time.perf_counter()
    root = arch.capture_root(model)
    graph = _MambaTracer().trace(root)
    gm = MambaGraphModule(root, graph, class_name="MambaGraphModule")
    config = model.config
    meta = set_graph_meta(gm, GraphMeta(
        source=type(model).__name__,
        num_blocks=config.num_hidden_layers,
        config=arch.architecture(config),
        prefix=root.prefix,
        on_meta_device=model.get_input_embeddings().weight.is_meta,
        hf_config=config.to_dict(),
        dtype=str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
    ))
    if source is not None:
        attach_tokenizer(gm, source)  # a model directory's tokenizer travels with its graph
    if propagate_shapes:
        annotate_shapes(gm, example_shape)
    meta.capture_seconds = time.perf_counter() - started
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
    graph_meta(gm).example_shape = list(example_shape)
