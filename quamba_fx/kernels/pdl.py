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
only when that one ends: the early start needs the kernel ahead to signal it. The prefill's own
kernels (the conv, the three kernels of the chunked scan, the TMA GEMM) can launch this way too
(`prefill_launch_options`), but do not by default (`PREFILL`): on an H100 the mamba-2.8b W8A8
prefill at 8 x 2048 took 201.0-202.3 ms with them launched so (three processes) against 181.6 ms
with no PDL at all (session 44); session 41, before they had it, measured 184.75 ms.

The decode GEMMs also use that early start to stream the start of their weight into L2
(`prefetch_to_l2`): the kernels between two GEMMs of a step (norm, scan, Hadamard) are
latency-bound and leave memory idle, so a GEMM whose programs are resident while one of them runs
has its first rows on their way before the wait. Only the first `L2_WINDOW_BYTES`: asking for the
whole weight made batch-1 decode 5% slower on an H200 (not profiled further; a guess is that the
GEMV's own loads then wait behind requests for rows it needs last). A separate kernel that streamed
a whole projection into L2 while the small kernels ran made decode 11% slower.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dispatch import INTERPRET, fp_fusion, sm_count

__all__ = ["ENABLED", "L2_PREFETCH", "L2_WINDOW_BYTES", "PREFILL", "launch_options", "prefetch_chunk",
           "prefetch_options", "prefetch_to_l2", "prefill_launch_options", "use_pdl", "wait_for_previous"]

# QUAMBA_FX_PDL=0 turns it off (e.g. to measure what it gains).
ENABLED = os.environ.get("QUAMBA_FX_PDL", "1") != "0"
# QUAMBA_FX_PREFILL_PDL=1 turns it on for the prefill's own kernels (off: 10% slower at 8 x 2048).
PREFILL = os.environ.get("QUAMBA_FX_PREFILL_PDL", "0") != "0"
# QUAMBA_FX_L2_PREFETCH=0 turns the weight prefetch off (it needs PDL to start early at all).
L2_PREFETCH = os.environ.get("QUAMBA_FX_L2_PREFETCH", "1") != "0"
# Bytes of a weight's start that are prefetched: about what memory delivers while one of the
# latency-bound kernels runs (1-3 us). Measured on an H200 (docs/benchmarks.md, session 29): the
# whole weight, or each program its own slice, slowed the batch-1 GEMV by 5-6%, 16 MiB by 3%;
# 4 MiB sped decode up by 3% at batch 1, 16 and 64, 8 MiB by a little less.
L2_WINDOW_BYTES = 4 << 20
# Most bytes one bulk prefetch asks for. The PTX manual states no bound on its size; pieces keep each
# request modest in case the hardware has one. (A 4 MiB window over 132 programs is one piece each.)
_PIECE = tl.constexpr(65536)
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


def launch_options(device: Any, fuse_fp: bool = True, pdl: bool = True) -> Dict[str, bool]:
    """Keyword arguments for a launch on `device` of a kernel with a `USE_PDL` constexpr: the
    constexpr, Triton's `launch_pdl` launch attribute where it is on (`pdl` and `use_pdl`), and
    `enable_fp_fusion` (`dispatch.fp_fusion(fuse_fp)`)."""
    if pdl and use_pdl(device):
        return {"USE_PDL": True, "launch_pdl": True, **fp_fusion(fuse_fp)}
    return {"USE_PDL": False, **fp_fusion(fuse_fp)}


def prefill_launch_options(device: Any, fuse_fp: bool = True) -> Dict[str, bool]:
    """`launch_options` for the prefill's own kernels: PDL only where `PREFILL` asks for it."""
    return launch_options(device, fuse_fp, pdl=PREFILL)


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Wait until the kernel ahead has finished and its writes are visible, then let the next
    kernel launch. A no-op without USE_PDL (and the only form the interpreter sees)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


def prefetch_options(w: torch.Tensor, programs: int) -> Dict[str, Any]:
    """Keyword arguments for a launch of `programs` programs of a kernel that takes
    `prefetch_to_l2`'s arguments (`PF_BYTES`, `PF_PROGRAMS`, constexpr `PREFETCH`): the first
    `L2_WINDOW_BYTES` of the weight `w` are asked for in L2 by the launch's first programs, at most
    one an SM (only those are resident while the kernel ahead runs), one chunk each, when `w` is
    one contiguous, 16-byte aligned block on a device with PDL (the bulk prefetch is sm_90's) and
    the prefetch is on; otherwise nothing."""
    nbytes = min(w.numel() * w.element_size(), L2_WINDOW_BYTES) // 16 * 16
    if not (L2_PREFETCH and nbytes and programs > 0 and w.is_contiguous() and w.data_ptr() % 16 == 0
            and use_pdl(w.device)):
        return {"PF_BYTES": 0, "PF_PROGRAMS": 1, "PREFETCH": False}
    return {"PF_BYTES": nbytes, "PF_PROGRAMS": min(programs, sm_count(w.device)), "PREFETCH": True}


@triton.jit
def prefetch_chunk(pid, PF_BYTES, PF_PROGRAMS):
    """Byte range `[start, end)` of program `pid`'s chunk: PF_PROGRAMS chunks of whole 16-byte units
    cover `[0, PF_BYTES)` (a multiple of 16) in order; trailing programs may get empty ones."""
    total = PF_BYTES.to(tl.int64)
    chunk = (tl.cdiv(total, PF_PROGRAMS) + 15) // 16 * 16
    start = tl.minimum(pid.to(tl.int64) * chunk, total)
    return start, tl.minimum(start + chunk, total)


@triton.jit
def prefetch_to_l2(ptr, PF_BYTES, PF_PROGRAMS, PREFETCH: tl.constexpr):
    """Program `p < PF_PROGRAMS` asks L2 for chunk `p` of the `PF_BYTES` bytes at `ptr` (split into
    PF_PROGRAMS 16-byte aligned chunks), with sm_90's bulk prefetch issued by its first thread; the
    loads that follow find the lines there or on their way. A hint: nothing waits for it, nothing
    is written. Call it before `wait_for_previous`, on memory the kernels ahead do not write."""
    if PREFETCH:
        pid = tl.program_id(0)
        if pid < PF_PROGRAMS:
            start, end = prefetch_chunk(pid, PF_BYTES, PF_PROGRAMS)
            base = ptr.to(tl.pointer_type(tl.int8), bitcast=True)
            for offset in range(start, end, _PIECE):
                size = tl.minimum(end - offset, _PIECE).to(tl.int32)
                address = (base + offset).to(tl.int64, bitcast=True)
                _bulk_prefetch(address, size)


@triton.jit
def _bulk_prefetch(address, size):
    tl.inline_asm_elementwise(
        "{ .reg .pred first; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 first, t, 0; "
        "@first cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [address, size], dtype=tl.int32, is_pure=False, pack=1)
