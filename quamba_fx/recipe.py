"""Quantization recipes: which activations become int8, how their scales are calibrated.

A recipe is data: a tuple of `Tap`s (one per quantized activation of a block) plus whether out_proj's
input is Hadamard-rotated. Every tap's scale is an fp32 buffer on the module that owns the edge
(`backbone.layers.3.mixer.conv1d.output_scale`), so each block has its own independent scales and a
user can change one in place between forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx

from .catalog import RECIPE_NAMES
from .errors import InvalidArgumentError
from .graph_info import is_kind, op_name
from .quant.observers import AbsMaxObserver, Observer, PercentileObserver


@dataclass(frozen=True)
class Tap:
    """One activation a block quantizes.

    `module` is the owning module's path inside the block, `scale` the buffer name on it, and
    `at` where the activation is: `output` (of the module), `input` (of the module), or `activation`
    (the SiLU after the module, i.e. conv1d + SiLU).
    """

    module: str
    scale: str
    at: str


NORM_OUT = Tap("norm", "output_scale", "output")
IN_PROJ_OUT = Tap("mixer.in_proj", "output_scale", "output")
CONV_OUT = Tap("mixer.conv1d", "output_scale", "activation")
X_PROJ_OUT = Tap("mixer.x_proj", "output_scale", "output")
DT_PROJ_OUT = Tap("mixer.dt_proj", "output_scale", "output")
OUT_PROJ_IN = Tap("mixer.out_proj", "input_scale", "input")
# The W8A8 boundaries of the Quamba dataflow (see the shared dataflow note): everything between the
# RMSNorm and out_proj is int8 on the wire; the residual stream, embeddings and lm_head stay float.
W8A8_TAPS = (NORM_OUT, IN_PROJ_OUT, CONV_OUT, X_PROJ_OUT, DT_PROJ_OUT, OUT_PROJ_IN)


@dataclass(frozen=True)
class Recipe:
    """A named quantization recipe. `observers` maps a tap to its observer factory (default abs-max)."""

    name: str
    hadamard: bool
    observers: dict[Tap, Callable[[], Observer]] = field(default_factory=dict)
    taps: tuple[Tap, ...] = W8A8_TAPS
    percentile: float | None = None

    def observer(self, tap: Tap, name: str) -> Observer:
        factory = self.observers.get(tap)
        observer = factory() if factory is not None else AbsMaxObserver()
        observer.name = name
        return observer


def make_recipe(name: str, percentile: float = 99.999) -> Recipe:
    """`naive`: abs-max scales everywhere, no rotation. `quamba`: the conv1d+SiLU output (x_proj's
    input) takes a `percentile` scale, clipping its rare outliers, and out_proj's input is
    Hadamard-rotated; the rest is abs-max."""
    if name == "naive":
        return Recipe("naive", hadamard=False)
    if name == "quamba":
        return Recipe("quamba", hadamard=True, observers={CONV_OUT: lambda: PercentileObserver(percentile)},
                      percentile=percentile)
    raise InvalidArgumentError(f"unknown recipe {name!r}; choose 'naive' or 'quamba'")


def block_paths(gm: torch.fx.GraphModule) -> list[str]:
    """Module path of every block: `backbone.layers.0`, ..."""
    meta = gm.meta["quamba"]
    return [f"{meta['prefix']}layers.{b}" for b in range(meta["num_blocks"])]


def tap_node(gm: torch.fx.GraphModule, block_path: str, tap: Tap) -> torch.fx.Node:
    """The node whose value `tap` quantizes in the block at `block_path`."""
    target = f"{block_path}.{tap.module}"
    module_node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == target), None)
    if module_node is None:
        raise LookupError(f"no call of module {target} in the graph")
    if tap.at == "output":
        return module_node
    if tap.at == "input":
        return module_node.args[0]
    node = module_node
    while op_name(node) != "silu":
        followers = [u for u in node.users if is_kind(gm, u, "layout") or op_name(u) == "silu"]
        if len(followers) != 1:
            raise LookupError(f"no single SiLU after {target}")
        node = followers[0]
    return node
