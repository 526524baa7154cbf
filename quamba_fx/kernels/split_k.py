"""Split-K for the GEMM and GEMV kernels: several programs share one output tile, each summing a
range of K, and the last to finish adds the partial tiles up and runs the epilogue, all in one launch.

How a tile is finished: every split writes its partial tile (int32 for the int8 kernels, fp32 for
the W4A16 GEMV: a view of the same scratch) to a scratch buffer and adds 1 to the tile's arrival
counter (an atomic); the split that sees SPLIT_K - 1 there sums all the partials in split order
(exact in int32; a fixed order in fp32), stores the output, and sets the counter back to 0.
Counters are therefore zero between launches, and the scratch needs no clearing.

The scratch is shared per device and stream (launches on one stream run one after another); it is
allocated outside CUDA-graph captures where it can be, because memory allocated inside a capture
is the graph's and is only initialised when the graph replays. A capture uses the device's scratch
from an earlier eager call (every model runs eagerly before it is captured: the autotuners time
their candidates then); only without one does it allocate its own, zeroed inside the graph.
Captured graphs thus share scratch with eager calls on the stream that made it: do not replay a
graph while split-K GEMMs run on that device from another stream.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["arrive", "load_k_step", "load_step", "total", "scratch", "scratch_need", "split_counts"]


@triton.jit
def load_step(ptrs, offs_k, K, kt, EVEN_K: tl.constexpr):
    """Step `kt` of a split's K loop for one operand: the tile at `ptrs` (`[rows, BLOCK_K]`, its
    K offsets `offs_k` the split's), zero past K, which also covers whole steps of the last split
    that lie beyond it. EVEN_K: every split's steps are whole tiles inside K, so nothing is masked."""
    if EVEN_K:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_k[None, :] < K - kt * offs_k.shape[0], other=0)


@triton.jit
def load_k_step(x_ptrs, w_ptrs, offs_k, K, kt, EVEN_K: tl.constexpr):
    """`load_step` of the activation and the weight tile."""
    return load_step(x_ptrs, offs_k, K, kt, EVEN_K), load_step(w_ptrs, offs_k, K, kt, EVEN_K)


@triton.jit
def arrive(acc, partial_ptr, count_ptr, tile, pid_k, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """Store this split's partial `acc [BLOCK_M, BLOCK_N]` of output tile `tile`; True for the
    split that arrives last (it must then call `total`)."""
    slot = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tile_partials = partial_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
    # .cg: through L2, where the other programs read it; never a stale L1 line.
    tl.store(tile_partials + pid_k * (BLOCK_M * BLOCK_N) + slot, acc, cache_modifier=".cg")
    # Every thread's partial is written before the counter moves: the barrier orders them before
    # the release of the atomic below.
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return arrived == SPLIT_K - 1


@triton.jit
def total(partial_ptr, count_ptr, tile, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The sum of tile `tile`'s partials (called by the last split only), in the scratch's dtype and
    in split order (so also deterministic for floats); resets its counter."""
    slot = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tile_partials = partial_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=partial_ptr.dtype.element_ty)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(tile_partials + s * (BLOCK_M * BLOCK_N) + slot, cache_modifier=".cg")
    tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
    return acc


# Never more splits than this: each adds a partial tile's traffic and a share of the final sum.
MAX_SPLIT_K = 32


def split_counts(tiles: int, k_tiles: int, programs: int) -> List[int]:
    """The SPLIT_K candidates of a tiling with `tiles` output tiles and `k_tiles` K steps: 1, 2, 4,
    ... until the programs (tiles x splits) reach `programs`, or K has too few steps to share."""
    counts = [1]
    while tiles * counts[-1] < programs and counts[-1] * 2 <= k_tiles and counts[-1] < MAX_SPLIT_K:
        counts.append(counts[-1] * 2)
    return counts


def scratch_need(m: int, n: int, metas: Iterable[dict]) -> Tuple[int, int]:
    """(32-bit partial values, counters) the largest split config among `metas` needs for an
    `m x n` output: configs with SPLIT_K = 1 need none; a config without BLOCK_M has one row."""
    partials = counters = 0
    for meta in metas:
        if meta["SPLIT_K"] > 1:
            block_m = meta.get("BLOCK_M", 1)
            tiles = -(-m // block_m) * -(-n // meta["BLOCK_N"])
            partials = max(partials, tiles * meta["SPLIT_K"] * block_m * meta["BLOCK_N"])
            counters = max(counters, tiles)
    return partials, counters


# (device, stream) -> (int32 partials, int32 counters), grown on demand.
_SCRATCH: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _fits(have: Tuple[Tensor, Tensor], partials: int, counters: int) -> bool:
    return have[0].numel() >= partials and have[1].numel() >= counters


def scratch(device: torch.device, partials: int, counters: int) -> Tuple[Tensor, Tensor]:
    """Scratch of at least the given sizes for a launch on `device`'s current stream (see the
    module docstring for streams and CUDA-graph captures)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        for (dev, _), have in _SCRATCH.items():
            if dev == device and _fits(have, partials, counters):
                return have
        # Allocated in the graph's pool and zeroed by the graph itself: this graph's alone.
        return (torch.empty(partials, dtype=torch.int32, device=device),
                torch.zeros(counters, dtype=torch.int32, device=device))
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    have = _SCRATCH.get(key)
    if have is not None and _fits(have, partials, counters):
        return have
    if have is not None:
        partials, counters = max(partials, have[0].numel()), max(counters, have[1].numel())
    grown = (torch.empty(partials, dtype=torch.int32, device=device),
             torch.zeros(counters, dtype=torch.int32, device=device))
    _SCRATCH[key] = grown
    return grown
