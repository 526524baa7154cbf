"""`naive`: every tapped activation at its abs-max scale, no rotation. The baseline that shows what
the Quamba recipe's percentile clipping and Hadamard rotation buy.

`naive-w4a8` and `naive-w4a16`: the baselines of Quamba2's 4-bit recipes, with the same int4
weights in groups of 128 but rounded to nearest instead of GPTQ, and no rotation (`naive-w4a8`'s
activations as `naive`'s)."""

from __future__ import annotations

from .registry import register_recipe
from .spec import ABS_MAX_INT8, Recipe, WeightSpec
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

RTN_INT4 = WeightSpec(bits=4, group_size=128, method="rtn", embedding_and_head=True)
NAIVE_W4A8 = register_recipe(Recipe(name="naive-w4a8", hadamard=False, specs=NAIVE.specs, weights=RTN_INT4))
NAIVE_W4A16 = register_recipe(Recipe(name="naive-w4a16", hadamard=False, specs=(), weights=RTN_INT4))
