"""The W8A8 flows: quantize -> fuse -> lower, the one place that says which passes run in what order.

Passes (`quamba_fx.passes`) each do one rewrite and know nothing of each other; the flows here put
them into `Pipeline`s (which check the topology after every pass), always on a copy of the input:

- `quantize`: the float passes, a calibration run, the quantization passes (the reference W8A8 graph);
- `fuse`: each block's int8 conv1d + SiLU as one kernel call;
- `lower`: fuse if not yet fused, then every reference op to its Triton kernel op;
- `quantized_structure`: the passes of `quantize` (and `fuse`) with placeholder scales, which is how
  `from_pretrained` rebuilds a checkpoint's graph before loading its tensors.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.fx
from torch import nn

from .calibrate import Calibration, calibrate
from .capture import annotate_shapes, capture
from .errors import InvalidArgumentError, NonFiniteError
from .graph_meta import find_graph_meta, graph_meta
from .passes.conv_fusion import FuseConv1dSiLU
from .passes.hadamard import RotateOutProjInput
from .passes.kernel_lowering import LowerToKernels
from .passes.quantize import InsertQuantDequant, LowerLinears, SinkDequantize
from .pipeline import Pipeline
from .recipe import block_paths, head_path, head_scale_key, recipe_for_graph
from .recipes import Recipe
from .tensor_checks import name_list, non_finite_tensors


def float_passes(recipe: Recipe) -> list:
    """Passes that change the float graph without changing its result (run before calibration)."""
    return [RotateOutProjInput()] if recipe.hadamard else []


def quantization_passes(scales: dict[str, float | list[float]], recipe: Recipe,
                        hessians: dict[str, torch.Tensor] | None = None, progress: bool = False) -> list:
    """Passes that turn the calibrated float graph into the quantized reference graph (`hessians`:
    the GPTQ input statistics of a 4-bit GPTQ recipe's Linears, by module path; `progress`: a bar
    over them)."""
    dtypes = {tap.key: spec.dtype for tap, spec in recipe.specs}
    per_channel = {tap.key for tap, spec in recipe.specs if spec.granularity == "per_channel"}
    return [InsertQuantDequant(scales, recipe.taps, dtypes, per_channel, head=recipe.head is not None),
            SinkDequantize(), LowerLinears(recipe.weights, hessians, progress)]


def fusion_passes() -> list:
    """Passes that turn the W8A8 reference graph into its fused form (conv1d + SiLU as one kernel)."""
    return [FuseConv1dSiLU()]


def lowering_passes(dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> list:
    """Passes that turn a quantized graph, fused or not, into one that runs on the Triton kernels."""
    return [*fusion_passes(), LowerToKernels(dtype, state_dtype)]


def _example_shape(gm: torch.fx.GraphModule) -> tuple[int, ...]:
    shape = graph_meta(gm).example_shape
    return tuple(shape if shape is not None else (1, 8))


def quantize(
    model: nn.Module | torch.fx.GraphModule | str,
    calibration_data: Iterable[torch.Tensor] | None = None,
    recipe: str | Recipe = "quamba",
    calibration: Calibration | None = None,
    progress: bool = True,
    dump_dir: str | None = None,
) -> torch.fx.GraphModule:
    """Quantize a Mamba model (W8A8, or with 4-bit weights: W4A8, W4A16) and return the runnable
    reference graph.

    `model` is anything `capture` accepts, or a captured GraphModule (copied: the float graph and
    model are never modified). Statistics come from `calibration` if given, else from running
    `calibration_data` (an iterable of `input_ids [B, L]` batches, or one `[B, L]` tensor taken as a
    single batch). The result runs on CPU with the reference int8 ops; each block's scales are
    buffers on its modules, e.g.
    `qm.get_submodule("backbone.layers.0.mixer.conv1d").output_scale`. Raises `NonFiniteError` when
    a weight holds NaN or infinity (even one calibration never reads, like an unused embedding row).
    `recipe` is a registered recipe's name (`naive`, `quamba`, `fp8`, `quamba2-w4a8`, ...; see
    `quamba_fx.recipes.recipe_names()`) or any `quamba_fx.recipes.Recipe`; a weight-only
    round-to-nearest recipe needs no calibration data;
    the graph keeps it (`graph_meta(gm).recipe_spec`), so `save_pretrained` can store it whole, as it
    applies to the model's architecture (`recipe.recipe_for_graph`: on Mamba-2, without the x_proj
    and dt_proj taps).
    A `calibration` recorded for another recipe (name or observers) raises `CalibrationError`.
    """
    # Always a deep copy: a fresh capture shares its modules with the user's model, and the passes
    # register scale buffers on them and swap Linears out.
    gm = copy.deepcopy(model if isinstance(model, torch.fx.GraphModule) else capture(model))
    recipe = recipe_for_graph(gm, recipe)
    bad = non_finite_tensors([*gm.named_parameters(), *gm.named_buffers()])
    if bad:
        raise NonFiniteError(
            f"the model holds NaN or infinite values in {name_list(bad)}: every output would be NaN; "
            "fix or reload its weights before quantizing"
        )
    gm = Pipeline(float_passes(recipe), dump_dir=dump_dir and f"{dump_dir}/float")(gm)
    if calibration is None:
        if calibration_data is not None:
            calibration = calibrate(gm, calibration_data, recipe, progress=progress)
        elif not recipe.specs and recipe.weights.method == "rtn":
            calibration = Calibration(recipe.name, {})  # round-to-nearest weights only: nothing to observe
        else:
            raise ValueError("quantize needs calibration_data (batches of token ids) or a saved calibration")
    calibration.check_matches(recipe, block_paths(gm), head_path(gm))
    passes = quantization_passes(calibration.scales(recipe), recipe, calibration.hessians, progress)
    gm = Pipeline(passes, dump_dir=dump_dir and f"{dump_dir}/quantize")(gm)
    meta = graph_meta(gm)
    meta.recipe, meta.recipe_spec = recipe.name, recipe
    annotate_shapes(gm, _example_shape(gm))
    return gm


def fuse(quantized: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a quantized graph with each block's conv1d + SiLU as one fused int8 kernel call."""
    gm = Pipeline(fusion_passes())(copy.deepcopy(quantized))
    graph_meta(gm).fused = True
    annotate_shapes(gm, _example_shape(gm))
    return gm


def lower(quantized: torch.fx.GraphModule, dtype: torch.dtype = torch.float16,
          state_dtype: torch.dtype | None = None) -> torch.fx.GraphModule:
    """A copy of a W8A8 graph (from `quantize` or `from_pretrained`) that runs on the Triton kernels.

    The conv1d is fused first when it is not already. Move the result to the GPU with `.cuda()`
    (on CPU it runs the kernels' references, or the kernels themselves under TRITON_INTERPRET=1).
    `dtype` is the activations' dtype between kernels; `state_dtype` (float16, bfloat16 or float32)
    the dtype `Generator`'s decode cache keeps each block's scan state in, by default float16 for
    the float16 lowering (as mamba_ssm) and float32 otherwise. The scan computes in fp32 either way.
    """
    meta = find_graph_meta(quantized)
    if meta is None or not meta.recipe:
        raise InvalidArgumentError("lower needs a quantized graph (quamba_fx.quantize or from_pretrained of a W8A8 checkpoint)")
    gm = Pipeline(lowering_passes(dtype, state_dtype))(copy.deepcopy(quantized))
    meta = graph_meta(gm)
    meta.fused, meta.lowered = True, str(dtype).replace("torch.", "")
    annotate_shapes(gm, _example_shape(quantized))
    return gm


def quantized_structure(gm: torch.fx.GraphModule, recipe: Recipe, fused: bool) -> torch.fx.GraphModule:
    """`gm` (a float capture, typically on the meta device) rewritten as `quantize` (and `fuse`)
    would, with every scale 1.0: the structure a checkpoint's tensors are loaded into. Modifies `gm`."""
    recipe = recipe_for_graph(gm, recipe)
    keys = [f"{p}.{tap.module}.{tap.scale}" for p in block_paths(gm) for tap in recipe.taps]
    keys += [key] if (key := head_scale_key(gm, recipe)) is not None else []
    passes = float_passes(recipe) + quantization_passes(dict.fromkeys(keys, 1.0), recipe)
    if fused:
        passes += fusion_passes()
    gm = Pipeline(passes)(gm)
    meta = graph_meta(gm)
    meta.recipe, meta.recipe_spec, meta.fused = recipe.name, recipe, fused
    return gm
