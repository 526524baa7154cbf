"""The graph-level facts of a captured, quantized or lowered GraphModule, as one typed object.

`capture` attaches a `GraphMeta` to `gm.meta["quamba"]`; the flows (`quantize`, `fuse`, `lower`),
checkpoint loading and `cached_graph` update it, and everything else reads it through
`graph_meta` (the graph must have one) or `find_graph_meta` (None when it has none). It lives in
`gm.meta` because that is what torch.fx carries along: `copy.deepcopy` of a GraphModule deep-copies
`gm.meta`, a shallow copy shares it. Node-level annotations (`node.meta["quamba"]`: role, block,
module, kernel) are a different thing and stay plain dicts (`quamba_fx.graph_info`).

This module imports nothing of the package, so any module may use it: that is why the tokenizer
and the recipe are typed `Any` here (`quamba_fx.text` and `quamba_fx.recipes` sit above it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from .errors import QuambaError

# The `gm.meta` key; the same string as the node annotations' key, in a different dict.
GRAPH_META_KEY = "quamba"


class MissingGraphMetaError(QuambaError, LookupError):
    """A GraphModule that needs quamba-fx's graph metadata has none (it was not made by `capture`)."""


@dataclass
class GraphMeta:
    """What quamba-fx knows of a whole graph. Every field has a default, because graphs made
    elsewhere (the torch.compile backend's Dynamo graphs) only know some of it."""

    # Class name of the captured model (`MambaForCausalLM`, `MambaModel`), or "dynamo".
    source: str | None = None
    # Number of Mamba blocks; None for a Dynamo graph holding a slice of the model.
    num_blocks: int | None = None
    # The config fields that define the computation (`ArchSpec.architecture`).
    config: dict[str, Any] = field(default_factory=dict)
    # Module path prefix of the backbone (`backbone.`).
    prefix: str | None = None
    # True when captured from a model on the meta device: shapes only, no weights.
    on_meta_device: bool = False
    # The whole Hugging Face config, `config.to_dict()`; None for graphs not made by `capture`.
    hf_config: dict[str, Any] | None = None
    # Dtype of the captured weights, without the `torch.` prefix (`float32`).
    dtype: str | None = None
    # The model directory's tokenizer (a `quamba_fx.text.TextCodec`), when it had one.
    tokenizer: Any = None
    # Wall-clock seconds `capture` took.
    capture_seconds: float | None = None
    # The `[B, L]` input shape the nodes' `tensor_meta` were computed for.
    example_shape: list[int] | None = None
    # Name of the quantization recipe; None for a float graph.
    recipe: str | None = None
    # The whole `quamba_fx.recipes.Recipe`, so `save_pretrained` can store it.
    recipe_spec: Any = None
    # True once each block's conv1d + SiLU is one fused kernel call.
    fused: bool = False
    # Activation dtype of a graph lowered to the Triton kernels (`float16`); None if not lowered.
    lowered: str | None = None
    # Dtype the decode cache keeps the scan state in (`LowerToKernels`); None: float32 (older lowerings).
    state_dtype: str | None = None
    # "prefill" or "decode" for `cached_graph`'s graphs; None otherwise.
    cached: str | None = None
    # Registered architecture name, when recorded; otherwise `arch_of` reads `config["model_type"]`.
    arch: str | None = None

    def replace(self, **changes: Any) -> GraphMeta:
        """A shallow copy with `changes` applied (the configs, tokenizer and recipe are shared)."""
        return dataclasses.replace(self, **changes)


def find_graph_meta(gm: torch.fx.GraphModule) -> GraphMeta | None:
    """`gm`'s metadata, or None when it has none; a value of another type under the key raises
    `TypeError` (a leftover of the dict this object replaced)."""
    meta = getattr(gm, "meta", {}).get(GRAPH_META_KEY)
    if meta is not None and not isinstance(meta, GraphMeta):
        raise TypeError(f"{type(gm).__name__}.meta[{GRAPH_META_KEY!r}] holds a {type(meta).__name__}, "
                        f"not a GraphMeta: write it with quamba_fx.graph_meta.set_graph_meta")
    return meta


def graph_meta(gm: torch.fx.GraphModule) -> GraphMeta:
    """`gm`'s metadata; raises `MissingGraphMetaError` naming the graph when it has none."""
    meta = find_graph_meta(gm)
    if meta is None:
        raise MissingGraphMetaError(
            f"this graph ({type(gm).__name__}) has no quamba-fx graph metadata (gm.meta[{GRAPH_META_KEY!r}]): "
            "make it with quamba_fx.capture, quantize or from_pretrained"
        )
    return meta


def set_graph_meta(gm: torch.fx.GraphModule, meta: GraphMeta) -> GraphMeta:
    """Attach `meta` to `gm` (replacing any it had) and return it."""
    if not isinstance(meta, GraphMeta):
        raise TypeError(f"set_graph_meta needs a GraphMeta, got {type(meta).__name__}")
    gm.meta[GRAPH_META_KEY] = meta
    return meta
