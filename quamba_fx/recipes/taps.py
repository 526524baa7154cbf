"""The activations of a Mamba-1 block that the W8A8 recipes quantize (see docs/quantization.md).

Every tap's scale is an fp32 buffer on the module that owns the edge
(`backbone.layers.3.mixer.conv1d.output_scale`), so each block has its own independent scales and
a user can change one in place between forwards.
"""

from __future__ import annotations

from .spec import Tap

__all__ = ["CONV_OUT", "DT_PROJ_OUT", "IN_PROJ_OUT", "NORM_OUT", "OUT_PROJ_IN", "W8A8_TAPS", "X_PROJ_OUT"]

NORM_OUT = Tap("norm", "output_scale", "output")
IN_PROJ_OUT = Tap("mixer.in_proj", "output_scale", "output")
CONV_OUT = Tap("mixer.conv1d", "output_scale", "activation")
X_PROJ_OUT = Tap("mixer.x_proj", "output_scale", "output")
DT_PROJ_OUT = Tap("mixer.dt_proj", "output_scale", "output")
OUT_PROJ_IN = Tap("mixer.out_proj", "input_scale", "input")
# The W8A8 boundaries of the Quamba dataflow (see the shared dataflow note): everything between the
# RMSNorm and out_proj is int8 on the wire; the residual stream, embeddings and lm_head stay float.
W8A8_TAPS = (NORM_OUT, IN_PROJ_OUT, CONV_OUT, X_PROJ_OUT, DT_PROJ_OUT, OUT_PROJ_IN)
