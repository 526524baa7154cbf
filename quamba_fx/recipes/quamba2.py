"""The recipes of Quamba2 (Chiang et al., 2025): `quamba2-w8a8`, `quamba2-w4a8`, `quamba2-w4a16`.

The 4-bit ones store every Linear of a block (in_proj, out_proj, and on Mamba-1 x_proj and
dt_proj) as int4 codes, two a byte, with one fp16 scale per 128 input columns of a row, quantized
with GPTQ on the calibration data, and rotate out_proj's input with a Hadamard transform (which
also spreads the outlier columns of out_proj's weight, so fewer groups are set by one large value).

- `quamba2-w4a8`: the activations as the `quamba` recipe quantizes them (int8; the conv1d+SiLU
  output at its 99.999th percentile, on Mamba-2 per channel: below), for throughput at large
  batch, where the GEMMs are compute-bound.
- `quamba2-w4a16`: weight-only; activations stay in the float dtype, for single-user decoding,
  which only streams weights.
- `quamba2-w8a8`: `quamba`'s 8-bit weights and activations (its W8A8 head too) with Quamba2's
  Mamba-2 scales (below).

Mamba-2's conv1d output (x, B and C, read by the scan alone) gets Quamba2's finer scales in the
W8A8 and W4A8 recipes (`channel_specs`): x one a channel, B and C one per state group, each the
abs-max of its channels. Quamba2 sorts x's channels and clusters them into 16 groups, with the
weights rearranged offline so that a group's channels are adjacent: its CUDA kernels hold 16 scales
in registers. Our kernels read a scale per channel at no cost in the products (x's channel is a
free index of every sum in the scan), which is the finer form of the same thing and needs no
rearrangement; measured on mamba2-bytes-wt2 (docs/benchmarks.md, session 38), one scale a channel
lowers the W8A8 KL to fp32 from 0.00078 (one scale for x, B and C) to 0.00053 (bits per byte
unchanged within noise), and a per-channel percentile does no better than the abs-max. On
Mamba-1 the conv1d output feeds x_proj's GEMM, which needs one scale: there these recipes keep
`quamba`'s 99.999th-percentile scale.
"""

from __future__ import annotations

from .quamba import QUAMBA
from .registry import register_recipe
from .spec import CHANNEL_ABS_MAX_INT8, Recipe, WeightSpec
from .taps import CONV_OUT

GROUP_SIZE = 128
GPTQ_INT4 = WeightSpec(bits=4, group_size=GROUP_SIZE, method="gptq", embedding_and_head=True)
# Where an architecture takes them (Mamba-2), a scale per channel of the conv1d output.
CHANNEL_SCALES = ((CONV_OUT, CHANNEL_ABS_MAX_INT8),)

QUAMBA2_W4A8 = register_recipe(Recipe(name="quamba2-w4a8", hadamard=True, specs=QUAMBA.specs, weights=GPTQ_INT4,
                                      channel_specs=CHANNEL_SCALES))
QUAMBA2_W4A16 = register_recipe(Recipe(name="quamba2-w4a16", hadamard=True, specs=(), weights=GPTQ_INT4))
QUAMBA2_W8A8 = register_recipe(Recipe(name="quamba2-w8a8", hadamard=True, specs=QUAMBA.specs,
                                      channel_specs=CHANNEL_SCALES, head=QUAMBA.head))
