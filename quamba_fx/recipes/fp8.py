"""`fp8`: W8A8 with float8 e4m3 (Hopper's native fp8) for the two large GEMMs, in_proj and out_proj.

Weights are e4m3 per output channel (abs-max / 448, `quant/fp8.py`); the inputs of in_proj (the
RMSNorm output) and out_proj (Hadamard-rotated, as in `quamba`) are e4m3 per tensor, with static
scales calibrated like the int8 recipe's (abs-max / 448). e4m3 keeps 3 mantissa bits at every
magnitude, so a per-tensor scale set by a rare outlier costs the small values little precision.

The conv1d and the scan keep the `quamba` recipe's int8 boundaries: in_proj's output (conv1d's
input and the gate z), the conv1d+SiLU output (99.999th percentile), x_proj's and dt_proj's outputs
stay int8. x_proj and dt_proj read those int8 scan inputs, so they stay int8 Linears; together
they are under 5% of a block's GEMM work on 2.8b shapes (5120x192 and 160x5120 against 2560x10240
and 5120x2560).
"""

from __future__ import annotations

from .quamba import PERCENTILE_INT8
from .registry import register_recipe
from .spec import ABS_MAX_INT8, QuantSpec, Recipe
from .taps import CONV_OUT, DT_PROJ_OUT, IN_PROJ_OUT, NORM_OUT, OUT_PROJ_IN, X_PROJ_OUT

ABS_MAX_FP8 = QuantSpec(dtype="float8_e4m3", qmin=-448, qmax=448, granularity="per_tensor", observer="abs_max")

FP8 = register_recipe(Recipe(
    name="fp8",
    hadamard=True,
    specs={
        NORM_OUT: ABS_MAX_FP8,
        IN_PROJ_OUT: ABS_MAX_INT8,
        CONV_OUT: PERCENTILE_INT8,
        X_PROJ_OUT: ABS_MAX_INT8,
        DT_PROJ_OUT: ABS_MAX_INT8,
        OUT_PROJ_IN: ABS_MAX_FP8,
    },
))
