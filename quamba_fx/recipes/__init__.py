"""Quantization recipes: frozen, serializable configs, one file per recipe, registered by name.

A `Recipe` is data (`spec.py`): whether out_proj's input is Hadamard-rotated, and for each tapped
activation (`taps.py`) a `QuantSpec` (dtype, code range, scale granularity, observer by name and
its arguments). `Recipe.to_dict()` / `Recipe.from_dict()` round-trip exactly through JSON, which
is how checkpoints store them. The built-in recipes are imported here explicitly, so they are
registered whatever is imported first; `register_recipe` adds a user's own.
"""

from __future__ import annotations

from . import naive, quamba  # isort: skip  (registration order is the --recipe order: naive, quamba, fp8, ...)
from . import fp8  # isort: skip
from . import quamba2  # isort: skip
from .registry import as_recipe, make_recipe, recipe_names, register_recipe
from .spec import ACTIVATION_DTYPES, GRANULARITIES, TAP_SITES, QuantSpec, Recipe, Tap, WeightSpec
from .taps import CONV_OUT, DT_PROJ_OUT, IN_PROJ_OUT, NORM_OUT, OUT_PROJ_IN, W8A8_TAPS, X_PROJ_OUT

FP8 = fp8.FP8
NAIVE = naive.NAIVE
QUAMBA = quamba.QUAMBA
QUAMBA2_W4A8 = quamba2.QUAMBA2_W4A8
QUAMBA2_W4A16 = quamba2.QUAMBA2_W4A16
QUAMBA2_W8A8 = quamba2.QUAMBA2_W8A8

__all__ = [
    "ACTIVATION_DTYPES", "CONV_OUT", "DT_PROJ_OUT", "FP8", "GRANULARITIES", "IN_PROJ_OUT", "NAIVE", "NORM_OUT",
    "OUT_PROJ_IN", "QUAMBA", "QUAMBA2_W4A16", "QUAMBA2_W4A8", "QUAMBA2_W8A8", "TAP_SITES", "W8A8_TAPS", "X_PROJ_OUT",
    "QuantSpec", "Recipe", "Tap", "WeightSpec", "as_recipe", "make_recipe", "recipe_names", "register_recipe",
]
