"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
kernel ahead of it on the stream is still running, and waits for it (`griddepcontrol.wait`) before
it reads anything that kernel wrote or writes anything it reads.

Why: a decode step is hundreds of kernels of a few microseconds each, and each one's launch and
first memory latency would otherwise sit in the gap after the previous one ended. A kernel here
waits at its top (`wait_for_previous`), so only its launch overlaps; the GEMV also loads its first
weight tile first (weights are never written by the kernels before it). Each kernel then lets the
next one launch at once: the next one's programs only take SM room the current one's programs have
left (every program of this kernel is already resident or done when the signal takes effect).

A kernel launched after a kernel without the wait (e.g. cuBLAS, or any PyTorch kernel) still starts
only when that one ends: the early start needs the kernel ahead to signal it.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dispatch import INTERPRET

__all__ = ["ENABLED", "launch_options", "use_pdl", "wait_for_previous"]

# QUAMBA_FX_PDL=0 turns it off (e.g. to measure what it gains).
ENABLED = os.environ.get("QUAMBA_FX_PDL", "1") != "0"
_DEVICES: Dict[torch.device, bool] = {}


def use_pdl(device: Any) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch: a CUDA device of
    compute capability 9.0 or later, not interpreted, and not turned off."""
    dev = torch.device(device)
    if INTERPRET or not ENABLED or dev.type != "cuda":
        return False
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    have = _DEVICES.get(dev)
    if have is None:
        have = _DEVICES[dev] = torch.cuda.get_device_capability(dev)[0] >= 9
    return have


def launch_options(device: Any) -> Dict[str, bool]:
    """Keyword arguments for a launch on `device` of a kernel with a `USE_PDL` constexpr: the
    constexpr, and Triton's `launch_pdl` launch attribute where it is on."""
    if use_pdl(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Wait until the kernel ahead has finished and its writes are visible, then let the next
    kernel launch. A no-op without USE_PDL (and the only form the interpreter sees)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
