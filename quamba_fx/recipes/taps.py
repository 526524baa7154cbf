"""The activations of a Mamba-1 block that the W8A8 recipes quantize (see docs/quantization.md).

They are facts of the architecture and live in its spec (`quamba_fx.arch.mamba1`); the names stay
importable here. Every tap's scale is an fp32 buffer on the module that owns the edge
(`backbone.layers.3.mixer.conv1d.output_scale`), so each block has its own independent scales and
a user can change one in place between forwards.
"""

from __future__ import annotations

from ..arch.mamba1 import CONV_OUT, DT_PROJ_OUT, IN_PROJ_OUT, NORM_OUT, OUT_PROJ_IN, W8A8_TAPS, X_PROJ_OUT

__all__ = ["CONV_OUT", "DT_PROJ_OUT", "IN_PROJ_OUT", "NORM_OUT", "OUT_PROJ_IN", "W8A8_TAPS", "X_PROJ_OUT"]
