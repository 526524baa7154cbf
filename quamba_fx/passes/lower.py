"""The names this module held before the lowering pass moved to `passes.kernel_lowering` and its flow
(`lower`) to `quamba_fx.flows`: kept so that existing imports keep working.

New code imports the pass from `quamba_fx.passes.kernel_lowering` and the flow from `quamba_fx.flows`
(or `quamba_fx.lower`). This module sits above both; nothing in the package imports it.
"""

from ..flows import lower
from .kernel_lowering import (
    ADD_RMSNORM,
    CONV_CACHED,
    FUSED_CONV,
    HADAMARD,
    HADAMARD_QUANTIZE,
    KERNELS,
    SCAN,
    SCAN_INT8,
    SCAN_INT8_CACHED,
    W8A8_LINEAR,
    LowerToKernels,
    cached_graph,
    fold_parameter_expressions,
)

__all__ = [
    "ADD_RMSNORM", "CONV_CACHED", "FUSED_CONV", "HADAMARD", "HADAMARD_QUANTIZE", "KERNELS", "SCAN", "SCAN_INT8",
    "SCAN_INT8_CACHED", "W8A8_LINEAR", "LowerToKernels", "cached_graph", "fold_parameter_expressions", "lower",
]
