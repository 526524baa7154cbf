"""Checks on a model's tensors that several stages share (quantize, save, load)."""

from __future__ import annotations

from typing import Iterable

import torch


def non_finite_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, in the order given."""
    return [
        name for name, tensor in named_tensors
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(_checkable(tensor)).all())
    ]


def _checkable(tensor: torch.Tensor) -> torch.Tensor:
    # torch implements isfinite for no float8 dtype; an fp8 -> fp32 conversion is exact and keeps NaN.
    return tensor.float() if tensor.element_size() == 1 else tensor


def name_list(names: list[str], limit: int = 6) -> str:
    """`a, b, c and 4 more`: a list of names short enough for a one-line error."""
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown
