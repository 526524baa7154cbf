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


def e4m3_ordinal(q: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as integers in value order (adjacent values differ by 1; +-0 are both 0)."""
    code = q.cpu().view(torch.uint8).int()
    magnitude = code & 0x7F
    return torch.where(code >= 0x80, -magnitude, magnitude)


def assert_fp8_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The e4m3 counterpart of the kernel tests' int8 check: at most one e4m3 value apart
    (compared as codes), on at most 0.1% of the elements (+1)."""
    assert got.dtype == want.dtype == torch.float8_e4m3fn
    assert got.shape == want.shape and got.is_contiguous()
    n_diff = int((got.cpu().view(torch.uint8) != want.cpu().view(torch.uint8)).sum())
    diff = (e4m3_ordinal(got) - e4m3_ordinal(want)).abs()
    msg = f"{n_diff} of {diff.numel()} e4m3 codes differ, max step {int(diff.max()) if diff.numel() else 0}"
    assert n_diff == 0 or int(diff.max()) <= 1, msg
    assert n_diff <= 1 + diff.numel() // 1000, msg
