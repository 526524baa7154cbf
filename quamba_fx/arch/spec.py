"""The data an architecture spec is: what a block is made of and what the core passes may rely on.

`ArchSpec` holds facts, not code paths: the Hugging Face classes and `config.model_type` it
accepts, where its blocks sit (`backbone.layers.3`), the module path of each role inside a block
(`conv1d` -> `mixer.conv1d`), the roles the topology check connects, the activations a W8A8 recipe
may tap (`Tap`), and where the decode cache's shapes come from. Capture, verification, the recipe
taps and the runtime cache read these instead of naming one architecture's modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RecipeError

__all__ = ["ArchSpec", "TAP_SITES", "Tap", "Topology"]

# Where on a module a tap takes its activation: its output, its input, or the SiLU after it.
TAP_SITES = ("output", "input", "activation")

_MODULE_PATH = re.compile(r"\w+(\.\w+)*", re.ASCII)
_BUFFER_NAME = re.compile(r"[A-Za-z_]\w*", re.ASCII)


def _expect(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        text = repr(value)
        raise RecipeError(where, f"must be {expected}, got {text if len(text) <= 60 else text[:57] + '...'}")


@dataclass(frozen=True)
class Tap:
    """One activation a block quantizes, and the scale buffer that holds its scale.

    `module` is the owning module's path inside the block (`mixer.conv1d`), `scale` the buffer's
    name on it, and `at` where the activation is: `output` (of the module), `input` (of the
    module), or `activation` (the SiLU after the module, i.e. conv1d + SiLU).
    """

    module: str
    scale: str
    at: str

    def __post_init__(self) -> None:
        _expect(isinstance(self.module, str) and bool(_MODULE_PATH.fullmatch(self.module)), "module",
                "a module path inside a block, like 'mixer.conv1d'", self.module)
        _expect(isinstance(self.scale, str) and bool(_BUFFER_NAME.fullmatch(self.scale)), "scale",
                "a buffer name, like 'output_scale'", self.scale)
        _expect(self.at in TAP_SITES, "at", f"one of {', '.join(TAP_SITES)}", self.at)

    @property
    def key(self) -> str:
        """`module.scale`: the buffer's path inside a block, unique within a recipe."""
        return f"{self.module}.{self.scale}"


@dataclass(frozen=True)
class Topology:
    """The block invariant the topology check enforces, by role: each block has exactly one
    `conv` node, fed by its own block's `producer` Linear and reaching its own block's `consumer`
    Linear (and the scan); `rules` names the checks that apply, in the order they run
    (`passes.verify.TopologyChecker` has one method per name)."""

    conv: str
    producer: str
    consumer: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """An architecture quamba-fx can capture, check, quantize and run.

    `title` names the family in messages (`Mamba-1`), `display_name` its blocks (`Mamba`).
    `classes` are the accepted model classes, `head_class` the one of them with a language-model
    head (its backbone is under `head_prefix`); `model_type` and `config_class` are the HF config's. A block's path
    is `{prefix}{blocks}.{i}`; `modules` maps each role to its module path inside a block ('' is
    the block itself); `roles` lists every node role in dataflow order. `activations` are the
    `config.hidden_act` values the captured forward implements; `config_keys` the config fields
    that define the computation, of which a checkpoint's config must hold `positive_ints` as
    integers >= 1, `positive_numbers` as numbers > 0 and `booleans` (where present) as booleans. `taps` are the activations a W8A8 recipe quantizes, in order;
    `rotated` is the role of the Linear whose input a Hadamard recipe rotates (its outliers are the
    ones a per-tensor scale cannot fit). `scan_op` names the `torch.ops.quamba` scan op capture
    emits; its kernel and cached forms start with that name (`selective_scan_int8_cached`), which
    is how a graph without metadata (Dynamo's) is told apart.
    `cache_shapes(gm, block_path, batch_size)` gives the `(conv_state, ssm_state)` shapes of a
    block's decode cache. `weight_shapes(config, prefix)` lists the tensors (name -> shape) a model of HF config
    `config` holds, for checkpoint validation. `capture_root(model)` is the module `quamba_fx.capture` traces: the model's submodules under
    their Hugging Face paths with a traceable forward that opens `arch.tracing.stage` for each
    role, and a `prefix` attribute (the blocks' parent path, e.g. `backbone.`).
    `channel_taps` are the tap keys (`mixer.conv1d.output_scale`) whose consumers take a scale per
    channel (a recipe's `channel_specs` apply there); `channel_layout(gm, block_path, tap)` gives
    such a tap's channel axis, its number of channels and the `(start, stop, size)` runs of
    channels that must share a scale, `size` at a time (`quant.observers.ChannelAbsMaxObserver`).
    """

    name: str
    title: str
    display_name: str
    model_type: str
    config_class: type
    classes: tuple[type, ...]
    head_class: type
    head_prefix: str
    blocks: str
    roles: tuple[str, ...]
    modules: tuple[tuple[str, str], ...]
    activations: tuple[str, ...]
    config_keys: tuple[str, ...]
    positive_ints: tuple[str, ...]
    positive_numbers: tuple[str, ...]
    booleans: tuple[str, ...]
    topology: Topology
    taps: tuple[Tap, ...]
    rotated: str
    scan_op: str
    cache_shapes: Callable[[Any, str, int], tuple[tuple[int, ...], tuple[int, ...]]]
    weight_shapes: Callable[[Any, str], dict[str, list[int]]]
    capture_root: Callable[[Any], Any]
    channel_taps: tuple[str, ...] = ()
    channel_layout: Callable[[Any, str, Tap], tuple[int, int, tuple[tuple[int, int, int], ...]]] | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The accepted classes' names, as `GraphMeta.source` and checkpoints record them."""
        return tuple(cls.__name__ for cls in self.classes)

    def class_named(self, name: str) -> type:
        """The accepted class called `name`; the head class for any other name (HF configs that
        list no `architectures` are causal LMs)."""
        return next((cls for cls in self.classes if cls.__name__ == name), self.head_class)

    def accepts(self, model: Any) -> bool:
        """Whether `model` is an instance of one of the accepted classes."""
        return isinstance(model, self.classes)

    def prefix(self, source: str) -> str:
        """The path of the blocks' parent for a model of class name `source`."""
        return self.head_prefix if source == self.head_class.__name__ else ""

    def block_index(self, prefix: str, name: str) -> int | None:
        """The index of the block a tensor or module path `name` lies in (3 for
        `backbone.layers.3.norm.weight` with prefix `backbone.`), or None."""
        head = f"{prefix}{self.blocks}."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isascii() and index.isdigit() else None

    def block_path(self, prefix: str, index: int) -> str:
        """The module path of block `index` (`backbone.layers.3` for prefix `backbone.`)."""
        return f"{prefix}{self.blocks}.{index}"

    def module(self, role: str) -> str:
        """The module path of `role` inside a block (`mixer.conv1d` for `conv1d`)."""
        for name, path in self.modules:
            if name == role:
                return path
        raise KeyError(f"architecture {self.name!r} has no module for role {role!r}")

    def module_path(self, block_path: str, role: str) -> str:
        """The full module path of `role` in the block at `block_path`."""
        inner = self.module(role)
        return f"{block_path}.{inner}" if inner else block_path

    def architecture(self, config: Any) -> dict:
        """The config fields that define the computation (the rest of a HF config is bookkeeping)."""
        return {key: getattr(config, key) for key in self.config_keys if hasattr(config, key)}
