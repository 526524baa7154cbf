"""`quamba`: the W8A8 recipe of Quamba (Chiang et al., 2024).

The conv1d+SiLU output (x_proj's input, which feeds the scan's B, C and dt) has rare large
outliers: an abs-max scale would spend most of the int8 range on them, so it takes the
99.999th-percentile of |x| instead and clips them. out_proj's input is Hadamard-rotated, which
spreads its outliers over all channels; every other activation takes its abs-max.

The LM head is W8A8 too, as in Quamba's code: its input (the final norm's output) at its abs-max,
its weight per output channel. It is the largest single weight a decode step reads (50280 x 2560 on
mamba-2.8b); on the trained byte models it and the tied embedding's int8 table (passes/quantize.py)
move bits per byte within noise and the KL to fp32 by 2-15% (docs/benchmarks.md, session 55).
"""

from __future__ import annotations

from .registry import register_recipe
from .spec import ABS_MAX_INT8, QuantSpec, Recipe
from .taps import CONV_OUT, DT_PROJ_OUT, IN_PROJ_OUT, NORM_OUT, OUT_PROJ_IN, X_PROJ_OUT

PERCENTILE_INT8 = QuantSpec(dtype="int8", qmin=-128, qmax=127, granularity="per_tensor", observer="percentile",
                            observer_args={"percentile": 99.999, "bins": 4096})

QUAMBA = register_recipe(Recipe(
    name="quamba",
    hadamard=True,
    specs={
        NORM_OUT: ABS_MAX_INT8,
        IN_PROJ_OUT: ABS_MAX_INT8,
        CONV_OUT: PERCENTILE_INT8,
        X_PROJ_OUT: ABS_MAX_INT8,
        DT_PROJ_OUT: ABS_MAX_INT8,
        OUT_PROJ_IN: ABS_MAX_INT8,
    },
    head=ABS_MAX_INT8,
))
