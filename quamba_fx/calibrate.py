"""Calibration: run sample text through the float graph and record per-block activation statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx
from tqdm.auto import tqdm

from .arch import arch_of
from .errors import InputError, QuambaError
from .graph_info import describe
from .quant.gptq import HessianObserver
from .quant.observers import Observer, make_observer, observer_class, observer_from_state_dict
from .quant.qops import QMAX
from .recipe import (HEAD_INPUT_SCALE, block_paths, head_input_node, head_path, head_scale_key, head_scale_path,
                     recipe_for_graph, tap_node)
from .recipes import Recipe

CALIBRATION_FORMAT = 1


class CalibrationError(QuambaError, ValueError):
    """Calibration data or activations are unusable (NaN/Inf, no batches)."""


class Calibration:
    """Observers keyed by the scale buffer they set (`backbone.layers.0.mixer.conv1d.output_scale`),
    and for a GPTQ recipe the input Hessian of each 4-bit Linear, keyed by its module path
    (`backbone.layers.0.mixer.in_proj`). `save` keeps the observers only: Hessians are K x K
    matrices a layer, recomputed from the calibration data when needed."""

    def __init__(self, recipe: str, observers: dict[str, Observer], batches: int = 0,
                 hessians: dict[str, torch.Tensor] | None = None):
        self.recipe = recipe
        self.observers = observers
        self.batches = batches
        self.hessians = hessians or {}

    def check_matches(self, recipe: Recipe, blocks: list[str], head: str | None = None) -> None:
        """Raise `CalibrationError` unless this calibration was recorded for `recipe`: the same name,
        and for every tap of every block in `blocks` (and the input of the head at `head`, where the
        recipe quantizes it) an observer of the class and arguments its spec names (a graph records
        its recipe, so scales from other observers would be misdescribed), and a GPTQ Hessian for
        every Linear it quantizes so (the head among them)."""
        if self.recipe != recipe.name:
            raise CalibrationError(f"the calibration was recorded for recipe {self.recipe!r}, not {recipe.name!r}")
        expected = [(f"{block}.{tap.key}", spec) for block in blocks for tap, spec in recipe.specs]
        if recipe.head is not None and head is not None:
            expected.append((head_scale_path(head), recipe.head))
        for key, spec in expected:
            observer = self.observers.get(key)
            if observer is None:
                raise CalibrationError(f"the calibration has no observer for {key}, which recipe {recipe.name!r} "
                                       "quantizes; calibrate again with this recipe")
            if type(observer) is not observer_class(spec.observer) or observer.arguments() != spec.observer_kwargs:
                raise CalibrationError(
                    f"the calibration's observer for {key} is {observer.label()}, but recipe {recipe.name!r} asks for "
                    f"{spec.observer} with {spec.observer_kwargs}; calibrate again with this recipe"
                )
        missing = [path for path in gptq_linears(recipe, blocks, head) if path not in self.hessians]
        if missing:
            raise CalibrationError(
                f"recipe {recipe.name!r} quantizes weights with GPTQ, which needs the input statistics of "
                f"{missing[0]}{f' and {len(missing) - 1} more Linears' if len(missing) > 1 else ''}; a saved "
                "calibration does not keep them: pass calibration_data instead"
            )

    def scales(self, recipe: Recipe | None = None) -> dict[str, float | list[float]]:
        """The scale of every tap: observed statistic / the tap's `qmax` in `recipe` (127 for
        int8, 448 for float8_e4m3); without a recipe, / 127 for every tap. A per-channel tap's is
        a list, one scale a channel."""
        specs = [(tap.key, spec) for tap, spec in recipe.specs] if recipe is not None else []
        if recipe is not None and recipe.head is not None:
            specs.append((HEAD_INPUT_SCALE, recipe.head))

        def qmax(key: str) -> int:
            return next((spec.qmax for suffix, spec in specs if key.endswith(f".{suffix}")), QMAX)

        return {key: obs.scale(qmax(key)) for key, obs in self.observers.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT, "recipe": self.recipe, "batches": self.batches,
            "observers": {key: obs.state_dict() for key, obs in self.observers.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        if data.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"calibration format {data.get('format')!r} is not supported (expected {CALIBRATION_FORMAT})")
        observers = {key: observer_from_state_dict(state) for key, state in data["observers"].items()}
        return cls(data["recipe"], observers, data.get("batches", 0))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_dict(json.loads(Path(path).read_text()))


def gptq_linears(recipe: Recipe, blocks: list[str], head: str | None = None) -> list[str]:
    """Module paths of the Linears whose weights `recipe` quantizes with GPTQ: in blocks `blocks`,
    and the head at `head` (None: the graph has none) where the recipe quantizes it too."""
    if recipe.weights.method != "gptq":
        return []
    with_head = head is not None and recipe.weights.embedding_and_head
    return recipe.weights.int4_linears(blocks) + ([head] if with_head else [])


class _Recorder(torch.fx.Interpreter):
    """Runs the graph node by node and feeds the tapped values to their observers."""

    def __init__(self, gm: torch.fx.GraphModule, taps: dict[torch.fx.Node, list[tuple[str, Any]]]):
        super().__init__(gm)
        # Our errors name the node and block themselves; torch.fx's "While executing ..." trailer
        # would turn them into many lines of graph internals.
        self.extra_traceback = False
        self.taps = taps
        self.batch_index = 0

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        for key, observer in self.taps.get(node, ()):
            try:
                observer.observe(value)
            except ValueError as exc:
                raise CalibrationError(
                    f"calibration batch {self.batch_index}: the activation of {describe(node)} ({key}) "
                    f"is not finite: {exc}"
                ) from exc
        return value


def calibrate(
    gm: torch.fx.GraphModule,
    batches: Iterable[torch.Tensor],
    recipe: str | Recipe = "quamba",
    progress: bool = True,
) -> Calibration:
    """Record the statistics `recipe` needs, one independent set per block: an observer for each
    tapped activation (and the head's input, where the recipe quantizes it) and, for a GPTQ recipe,
    the input Hessian of each 4-bit Linear.

    `gm` is a float graph from `capture` (after the recipe's float passes, e.g. the Hadamard
    rotation, so statistics are those of the tensors that will really be quantized); `recipe` is a
    registered recipe's name or a `quamba_fx.recipes.Recipe`. `batches`
    is an iterable of `input_ids [B, L]` tensors, or one `[B, L]` tensor, taken as a single batch
    (split it, e.g. `ids.split(8)`, to bound memory). Raises `CalibrationError` naming the batch for
    a batch that is not integer token ids of rank 2 within the vocabulary, naming the node and block
    when an activation holds NaN or Inf, and when there are no batches.
    """
    if isinstance(batches, torch.Tensor):
        if batches.dim() != 2:
            raise CalibrationError(
                f"calibration data is one tensor of shape {tuple(batches.shape)}; expected input_ids "
                "[batch, seq_len], or an iterable of such batches"
            )
        batches = [batches]
    recipe = recipe_for_graph(gm, recipe)
    taps: dict[torch.fx.Node, list[tuple[str, Any]]] = {}
    observers: dict[str, Observer] = {}
    hessians: dict[str, HessianObserver] = {}
    arch = arch_of(gm)
    for path in block_paths(gm):
        for tap in recipe.taps:
            key = f"{path}.{tap.module}.{tap.scale}"
            observers[key] = recipe.observer(tap, key)
            if recipe.spec(tap).granularity == "per_channel":  # with_channel_scales put it where the arch takes it
                axis, _, groups = arch.channel_layout(gm, path, tap)
                observers[key].set_layout(axis, groups)
            taps.setdefault(tap_node(gm, path, tap), []).append((key, observers[key]))
    head_key = head_scale_key(gm, recipe)
    if head_key is not None:
        observers[head_key] = make_observer(recipe.head.observer, recipe.head.observer_kwargs, label=head_key)
        taps.setdefault(head_input_node(gm), []).append((head_key, observers[head_key]))
    for target in gptq_linears(recipe, block_paths(gm), head_path(gm)):
        linear = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == target), None)
        if linear is None:
            raise CalibrationError(f"recipe {recipe.name!r} quantizes {target} with GPTQ, but the graph never calls it")
        hessians[target] = HessianObserver(target)
        taps.setdefault(linear.args[0], []).append((target, hessians[target]))
    recorder = _Recorder(gm, taps)
    count = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc=f"calibrating ({recipe.name})", unit="batch", disable=not progress):
            recorder.batch_index = count
            if not isinstance(batch, torch.Tensor):
                raise CalibrationError(f"calibration batch {count} is a {type(batch).__name__}, not a tensor of token ids")
            try:
                recorder.run(batch)
            except InputError as exc:
                raise CalibrationError(f"calibration batch {count} (shape {tuple(batch.shape)}): {exc}") from exc
            count += 1
    if count == 0:
        raise CalibrationError("calibration got no batches: pass at least one [batch, seq_len] tensor of token ids")
    return Calibration(recipe.name, observers, count, {key: h.hessian for key, h in hessians.items()})
