"""`quamba2-w4a8` and `quamba2-w4a16`: the 4-bit-weight recipes of Quamba2 (Chiang et al., 2025).

Both store every Linear of a block (in_proj, out_proj, and on Mamba-1 x_proj and dt_proj) as int4
codes, two a byte, with one fp16 scale per 128 input columns of a row, quantized with GPTQ on the
calibration data, and rotate out_proj's input with a Hadamard transform (which also spreads the
outlier columns of out_proj's weight, so fewer groups are set by one large value).

- `quamba2-w4a8`: the activations as the `quamba` recipe quantizes them (int8; the conv1d+SiLU
  output at its 99.999th percentile), for throughput at large batch, where the GEMMs are compute-bound.
- `quamba2-w4a16`: weight-only; activations stay in the float dtype, for single-user decoding,
  which only streams weights.

Quamba2's own activation techniques for Mamba-2 (x's channels sorted and clustered with a scale
per cluster, B and C with a scale per state group) need per-channel-group activation scales, which
the recipe specs (`per_tensor` only) and the int8 conv1d and scan kernels do not take yet: on
Mamba-2, `quamba2-w4a8` uses per-tensor scales.
"""

from __future__ import annotations

from .quamba import QUAMBA
from .registry import register_recipe
from .spec import Recipe, WeightSpec

GROUP_SIZE = 128
GPTQ_INT4 = WeightSpec(bits=4, group_size=GROUP_SIZE, method="gptq")

QUAMBA2_W4A8 = register_recipe(Recipe(name="quamba2-w4a8", hadamard=True, specs=QUAMBA.specs, weights=GPTQ_INT4))
QUAMBA2_W4A16 = register_recipe(Recipe(name="quamba2-w4a16", hadamard=True, specs=(), weights=GPTQ_INT4))
