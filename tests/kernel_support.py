"""Where the kernel tests run: CPU under the Triton interpreter (bit-exact contracts), CUDA
(documented GPU tolerances), or nowhere (kernel tests skip; reference tests still run)."""

from __future__ import annotations

import pytest
import torch

from quamba_fx.kernels import dispatch
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


def reference_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list:
    """Run as a CPU without the interpreter would (`dispatch.INTERPRET` off) and record the calls
    of `module.name`, a kernel's PyTorch reference: the returned list gains one entry a call."""
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    calls: list = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls
