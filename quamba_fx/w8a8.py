"""`quantize`: the whole W8A8 flow as two pipelines around a calibration run."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.fx
from torch import nn

from .calibrate import Calibration, calibrate
from .capture import annotate_shapes, capture
from .errors import NonFiniteError
from .passes.hadamard import RotateOutProjInput
from .passes.quantize import InsertQuantDequant, LowerLinears, SinkDequantize
from .pipeline import Pipeline
from .recipe import block_paths
from .recipes import Recipe, as_recipe
from .tensor_checks import name_list, non_finite_tensors


def float_passes(recipe: Recipe) -> list:
    """Passes that change the float graph without changing its result (run before calibration)."""
    return [RotateOutProjInput()] if recipe.hadamard else []


def quantization_passes(scales: dict[str, float], recipe: Recipe) -> list:
    """Passes that turn the calibrated float graph into the W8A8 reference graph."""
    dtypes = {tap.key: spec.dtype for tap, spec in recipe.specs}
    return [InsertQuantDequant(scales, recipe.taps, dtypes), SinkDequantize(), LowerLinears()]


def quantize(
    model: nn.Module | torch.fx.GraphModule | str,
    calibration_data: Iterable[torch.Tensor] | None = None,
    recipe: str | Recipe = "quamba",
    calibration: Calibration | None = None,
    progress: bool = True,
    dump_dir: str | None = None,
) -> torch.fx.GraphModule:
    """Quantize a Mamba model to W8A8 and return the runnable reference graph.

    `model` is anything `capture` accepts, or a captured GraphModule (copied: the float graph and
    model are never modified). Statistics come from `calibration` if given, else from running
    `calibration_data` (an iterable of `input_ids [B, L]` batches, or one `[B, L]` tensor taken as a
    single batch). The result runs on CPU with the reference int8 ops; each block's scales are
    buffers on its modules, e.g.
    `qm.get_submodule("backbone.layers.0.mixer.conv1d").output_scale`. Raises `NonFiniteError` when
    a weight holds NaN or infinity (even one calibration never reads, like an unused embedding row).
    `recipe` is a registered recipe's name (`naive`, `quamba`) or any `quamba_fx.recipes.Recipe`;
    the graph keeps it (`meta["quamba"]["recipe_spec"]`), so `save_pretrained` can store it whole.
    A `calibration` recorded for another recipe (name or observers) raises `CalibrationError`.
    """
    recipe = as_recipe(recipe)
    # Always a deep copy: a fresh capture shares its modules with the user's model, and the passes
    # register scale buffers on them and swap Linears out.
    gm = copy.deepcopy(model if isinstance(model, torch.fx.GraphModule) else capture(model))
    bad = non_finite_tensors([*gm.named_parameters(), *gm.named_buffers()])
    if bad:
        raise NonFiniteError(
            f"the model holds NaN or infinite values in {name_list(bad)}: every output would be NaN; "
            "fix or reload its weights before quantizing"
        )
    gm = Pipeline(float_passes(recipe), dump_dir=dump_dir and f"{dump_dir}/float")(gm)
    if calibration is None:
        if calibration_data is None:
            raise ValueError("quantize needs calibration_data (batches of token ids) or a saved calibration")
        calibration = calibrate(gm, calibration_data, recipe, progress=progress)
    else:
        calibration.check_matches(recipe, block_paths(gm))
    gm = Pipeline(quantization_passes(calibration.scales(recipe), recipe), dump_dir=dump_dir and f"{dump_dir}/quantize")(gm)
    gm.meta["quamba"]["recipe"] = recipe.name
    gm.meta["quamba"]["recipe_spec"] = recipe
    annotate_shapes(gm, tuple(gm.meta["quamba"].get("example_shape", (1, 8))))
    return gm
