"""The names this module held before the conv1d + SiLU fusion pass moved to `passes.conv_fusion` and
its flow (`fuse`) to `quamba_fx.flows`: kept so that existing imports keep working.

New code imports the pass from `quamba_fx.passes.conv_fusion` and the flow from `quamba_fx.flows`
(or `quamba_fx.fuse`). This module sits above both; nothing in the package imports it.
"""

from ..flows import fuse
from .conv_fusion import FUSED_CONV, FuseConv1dSiLU, fuse_conv1d_silu

__all__ = ["FUSED_CONV", "FuseConv1dSiLU", "fuse", "fuse_conv1d_silu"]
