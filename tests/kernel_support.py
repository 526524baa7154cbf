"""Where the kernel tests run: CPU under the Triton interpreter (bit-exact contracts), CUDA
(documented GPU tolerances), or nowhere (kernel tests skip; reference tests still run)."""

from __future__ import annotations

import pytest
import torch

from quamba_fx.kernels.dispatch import INTERPRET

if INTERPRET:
    DEVICE, EXACT = "cpu", True
elif torch.cuda.is_available():
    DEVICE, EXACT = "cuda", False
else:
    DEVICE, EXACT = None, False

needs_kernel = pytest.mark.skipif(
    DEVICE is None, reason="Triton kernel needs CUDA or TRITON_INTERPRET=1 (set before import)"
)
