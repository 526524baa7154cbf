"""`naive`: every tapped activation at its abs-max scale, no rotation. The baseline that shows what
the Quamba recipe's percentile clipping and Hadamard rotation buy."""

from __future__ import annotations

from .registry import register_recipe
from .spec import ABS_MAX_INT8, Recipe
from .taps import CONV_OUT, DT_PROJ_OUT, IN_PROJ_OUT, NORM_OUT, OUT_PROJ_IN, X_PROJ_OUT

NAIVE = register_recipe(Recipe(
    name="naive",
    hadamard=False,
    specs={
        NORM_OUT: ABS_MAX_INT8,
        IN_PROJ_OUT: ABS_MAX_INT8,
        CONV_OUT: ABS_MAX_INT8,
        X_PROJ_OUT: ABS_MAX_INT8,
        DT_PROJ_OUT: ABS_MAX_INT8,
        OUT_PROJ_IN: ABS_MAX_INT8,
    },
))
