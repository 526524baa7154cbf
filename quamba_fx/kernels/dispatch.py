"""Where a kernel call runs: the Triton kernel on CUDA, or on CPU under the Triton interpreter.

`INTERPRET` is read once at import, like `triton.jit` does at decoration time: it decides whether
the kernels are interpreted, so a later change of the variable would not affect them anyway. Every
kernel module asks `use_triton` and otherwise runs its PyTorch reference.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on `t` runs the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")
