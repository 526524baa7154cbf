"""Numeric building blocks of the Quamba W8A8 recipe.

* `hadamard`: orthonormal Hadamard matrices (Sylvester x Paley), a fast transform
  (`hadamard_transform(x) = x @ H.T`) and the fold of `H^T` into `out_proj`'s weight.
* `observers`: calibration statistics with bounded memory (`AbsMaxObserver`,
  `PercentileObserver`) and their int8 scales.
* `qops`: the `torch.ops.quamba.quantize` / `dequantize` / `int8_linear` custom ops (symmetric
  int8, zero point 0, range [-128, 127], round half to even, fp32 scale tensors) and weight
  quantization helpers. Importing this package registers the ops.
"""

from .hadamard import fold_hadamard_into_linear_weight, hadamard_matrix, hadamard_transform, is_hadamard_size
from .observers import AbsMaxObserver, Observer, PercentileObserver, observer_from_state_dict
from .qops import (
    MAX_INT8_LINEAR_K,
    MIN_SCALE,
    QMAX,
    QMIN,
    absmax_to_scale,
    dequantize,
    int8_linear,
    quantize,
    quantize_weight_per_channel,
    quantize_weight_per_tensor,
)

__all__ = [
    "MAX_INT8_LINEAR_K",
    "MIN_SCALE",
    "QMAX",
    "QMIN",
    "AbsMaxObserver",
    "Observer",
    "PercentileObserver",
    "absmax_to_scale",
    "dequantize",
    "fold_hadamard_into_linear_weight",
    "hadamard_matrix",
    "hadamard_transform",
    "int8_linear",
    "is_hadamard_size",
    "observer_from_state_dict",
    "quantize",
    "quantize_weight_per_channel",
    "quantize_weight_per_tensor",
]
