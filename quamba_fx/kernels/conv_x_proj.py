"""A Mamba-1 decode step's conv1d step and x_proj in one launch, for a few sequences (1-64).

At batch 16 a block's conv step (one small kernel, 2.4 us on an H100) and x_proj (a 192 x 5120
GEMM with K split over 24 programs, 3.8 us) are two of its eight launches; the step's time is
mostly their latency, not their bytes (x_proj's weight is 1 MB). Here one program takes
`BLOCK_C` channels of every sequence:

1. before waiting for in_proj (PDL), it loads x_proj's weight columns of those channels
   (`[N, BLOCK_C]`, weights are never written by a step's kernels);
2. it runs the conv step of its `[M, BLOCK_C]` tile (`conv1d.conv_update_step`, the conv kernel's
   arithmetic), stores u and rolls the conv state;
3. it multiplies its weight columns by its u columns (`[N, BLOCK_C] x [BLOCK_C, M]`, one int8 MMA:
   weights on the MMA's M side, as in gemm_skinny.py) and adds the int32 partial sums into a
   per-device accumulator with atomics, exact in any order;
4. the program that arrives last (an acq_rel counter, as split_k.py's) reads the sums, clears the
   accumulator and the counter for the next launch, and runs the GEMM epilogue
   (gemm_epilogue.store_tile: the same bits as `int8_gemm`).

So u, the state and x_proj's output are those of the conv kernel then `int8_gemm`, bit for bit
under the interpreter; on CUDA this kernel is compiled without fp fusion (the GEMM's contract),
so its conv step rounds `acc + w * x` twice, as the reference and the batch-1 GEMV's conv epilogue
do, where the conv kernel may contract it into an FMA (one code apart at most).

`in_proj_conv_x_proj` is the graph op's body: in_proj's GEMM, then this kernel at MIN_BATCH (2)
to MAX_BATCH rows (off by default until timed on a GPU, see MAX_BATCH); at one row the GEMV with
its conv epilogue and x_proj's GEMV, as before; above MAX_BATCH the GEMM, the conv kernel and
x_proj's GEMM.

The accumulator is shared per device and stream and is zero between launches (the last program
clears it), like split_k.py's counters; the same caveats about CUDA-graph captures apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import split_k
from .conv1d import _validate_update as _validate_conv_step
from .conv1d import (_conv_params, as_out_scale, causal_conv1d_update_silu_int8,
                     causal_conv1d_update_silu_int8_reference, conv_update_step)
from .dispatch import INTERPRET as _INTERPRET
from .dispatch import as_scalar, cdiv, graph_op, next_pow2
from .dispatch import use_triton as _use_triton
from .gemm import ConvStep, _f32_vector, _validate, int8_gemm, int8_gemm_conv_step, int8_gemm_reference
from .gemm_epilogue import OUT_INT8, store_tile
from .pdl import launch_options, wait_for_previous

__all__ = ["BLOCK_C", "MAX_BATCH", "MIN_BATCH", "Projection", "conv_step_x_proj", "conv_step_x_proj_reference",
           "in_proj_conv_x_proj", "takes"]

# Batches (rows) this kernel runs: from 2 (one row: the GEMV's conv epilogue) to MAX_BATCH; 0 turns
# it off. Off until a GPU has timed it against the two kernels (device_run.sh's `conv-x-proj` step:
# no device was lent in session 57, when it was written); it compiles for sm_90 under Triton 3.6
# and 3.8 (offline builds, no spills) and matches the two kernels under the interpreter. A
# setting, for benchmarks/decode_settings.py.
MAX_BATCH = 0
# The fewest rows it runs: at one row the in_proj GEMV runs the conv step in its epilogue and
# x_proj is a GEMV of its own, which this kernel could replace (the GEMV then without its conv
# epilogue: two launches either way). 2 keeps one row on the GEMVs; 1 is for the A/B
# (device_run.sh's `conv-x-proj` step). A setting, as MAX_BATCH.
MIN_BATCH = 2
# Channels a program on the GPU: 64 gives 2.8b's 5120 channels 80 programs, each one 12 KB of
# x_proj's weight and one 64-deep MMA step. A setting, as MAX_BATCH.
BLOCK_C = 64
# x_proj's outputs a program holds (dt_rank + 2 * d_state: 192 on 2.8b, 80 on 130m), padded to a
# power of two: the weight columns, the MMA tile and the accumulator's row.
MAX_N = 256
_MAX_ROWS = 64
# The epilogue's int8 mode, as a constexpr the kernel may read.
_OUT_INT8 = tl.constexpr(OUT_INT8)


@dataclass(frozen=True)
class Projection:
    """x_proj's int8 weight `[N, D]` (D: the conv's channels) with its GEMM epilogue: per-channel
    or per-tensor `weight_scale`, optional fp32 `bias [N]`, and the int8 output's `out_scale`
    (one value, or one an output channel)."""

    weight: Tensor
    weight_scale: Tensor
    bias: Optional[Tensor]
    out_scale: Tensor


@triton.jit
def _conv_step_x_proj_kernel(
    xz_ptr, state_ptr, x_scale_ptr, cw_ptr, cb_ptr, u_scale_ptr, u_ptr,
    w_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr, acc_ptr, count_ptr,
    M, D, N,
    stride_xm, stride_sb, stride_sd, stride_sk, stride_cwd, stride_cwk, stride_wn, stride_om,
    W: tl.constexpr, CONV_HAS_BIAS: tl.constexpr, FAST_MATH: tl.constexpr,
    W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_c = offs_c < D
    # This program's x_proj weight columns, fetched while in_proj still runs.
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_c[None, :],
                mask=(offs_n < N)[:, None] & mask_c[None, :], other=0)
    wait_for_previous(USE_PDL)  # in_proj's output, the conv state and the accumulator are written ahead

    rows = offs_m.to(tl.int64)[:, None]
    tile_mask = (offs_m < M)[:, None] & mask_c[None, :]
    channels = offs_c[None, :] + tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32)
    x_new = tl.load(xz_ptr + rows * stride_xm + offs_c[None, :], mask=tile_mask, other=0)
    # Rows past M and channels past D load zeros everywhere, so their u is 0 and adds nothing.
    u = conv_update_step(x_new, state_ptr + rows * stride_sb, x_scale_ptr, cw_ptr, cb_ptr, u_scale_ptr, channels,
                         tile_mask, stride_sd, stride_sk, stride_cwd, stride_cwk, W, CONV_HAS_BIAS, FAST_MATH)
    tl.store(u_ptr + rows * D + offs_c[None, :], u, mask=tile_mask)

    # out_dtype spelled out: Triton 3.6 defaults it to fp32 and rejects int32 otherwise.
    partial = tl.trans(tl.dot(w, tl.trans(u), out_dtype=tl.int32))  # [BLOCK_M, BLOCK_N]
    slot = offs_m[:, None] * BLOCK_N + offs_n[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.atomic_add(acc_ptr + slot, partial, mask=out_mask, sem="relaxed", scope="gpu")
    # Every thread's additions are made before the counter moves: the barrier orders them before
    # the release of the atomic below (split_k.arrive's reasoning).
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        total = tl.load(acc_ptr + slot, mask=out_mask, other=0, cache_modifier=".cg")
        tl.store(acc_ptr + slot, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32), mask=out_mask, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
        store_tile(total, offs_m, offs_n, offs_n % N, M, N, stride_om, u_scale_ptr, w_scale_ptr, bias_ptr,
                   out_scale_ptr, out_ptr, W_PER_CHANNEL, HAS_BIAS, _OUT_INT8, OUT_PER_CHANNEL)


# (device, stream) -> (int32 accumulator, int32 counter), zero between launches.
_ACCUMULATORS: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _accumulator(device: torch.device, values: int) -> Tuple[Tensor, Tensor]:
    """A zeroed accumulator of at least `values` int32 and its arrival counter for a launch on
    `device`'s current stream (`split_k.stream_buffers`: allocated outside CUDA-graph captures
    where it can be; inside a capture without one, the graph's own, zeroed by the graph)."""
    return split_k.stream_buffers(_ACCUMULATORS, device, (values, 1),
                                  lambda n: tuple(torch.zeros(size, dtype=torch.int32, device=device) for size in n))


def _warps(block_m: int) -> int:
    # Offline sm_90 builds (Triton 3.6, 2.8b's x_proj: 256 padded outputs, 64 channels): 139
    # registers a thread at 16 rows on 4 warps; 64 rows spill on 4 warps and take 246 on 8.
    return 4 if block_m <= 16 else 8


def _check(rows: Tensor, x_scale: Tensor, conv: ConvStep, proj: Projection) -> None:
    """Validate the conv step (as the conv kernel does) and x_proj (as `int8_gemm` does, on the
    conv's output)."""
    if not isinstance(conv, ConvStep) or not isinstance(proj, Projection):
        raise ValueError(f"conv must be a ConvStep and proj a Projection, got {type(conv).__name__} and "
                         f"{type(proj).__name__}")
    _validate_conv_step(rows, conv.state, x_scale, conv.weight, conv.bias, conv.out_scale)
    if conv.out_scale.numel() != 1:
        raise ValueError("x_proj reads the conv's output at one per-tensor scale, got one a channel")
    # the conv's output has the rows' dtype, shape and device: they stand in for it
    _validate(rows, conv.out_scale, proj.weight, proj.weight_scale, proj.bias, proj.out_scale, None)


def conv_step_x_proj_reference(rows: Tensor, x_scale: Tensor, conv: ConvStep,
                               proj: Projection) -> Tuple[Tensor, Tensor]:
    """The conv kernel's reference then `int8_gemm`'s: `(u, out)`, the state advanced in place."""
    u = causal_conv1d_update_silu_int8_reference(rows, conv.state, x_scale, conv.weight, conv.bias, conv.out_scale)
    return u, int8_gemm_reference(u, conv.out_scale, proj.weight, proj.weight_scale, proj.bias, proj.out_scale)


def conv_step_x_proj(rows: Tensor, x_scale: Tensor, conv: ConvStep, proj: Projection) -> Tuple[Tensor, Tensor]:
    """One decode conv step of `rows` (int8 `[M, D]`: in_proj's x half at scale `x_scale`) and
    x_proj on its output, in one launch: `(u [M, D], out [M, N])`, both int8, `conv.state`
    advanced in place. `conv.start` is ignored (pass the rows themselves).

    Equals `causal_conv1d_update_silu_int8` then `int8_gemm(u, conv.out_scale, proj.weight, ...)`
    (bit for bit under TRITON_INTERPRET=1; see the module docstring for CUDA), which is what runs
    on more than 64 rows or more than MAX_N outputs. CPU tensors without the interpreter run the
    references; ValueError on bad arguments, before anything is written.
    """
    _check(rows, x_scale, conv, proj)
    m, d = rows.shape
    n = proj.weight.shape[0]
    if not _use_triton(rows) or m * d * n == 0:
        return conv_step_x_proj_reference(rows, x_scale, conv, proj)
    if m > _MAX_ROWS or n > MAX_N:
        u = causal_conv1d_update_silu_int8(rows, conv.state, x_scale, conv.weight, conv.bias, conv.out_scale)
        return u, int8_gemm(u, conv.out_scale, proj.weight, proj.weight_scale, proj.bias, proj.out_scale)
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    weight = proj.weight if proj.weight.stride(1) == 1 else proj.weight.contiguous()
    u = torch.empty(m, d, dtype=torch.int8, device=rows.device)
    out = torch.empty(m, n, dtype=torch.int8, device=rows.device)
    block_m, block_n = max(16, next_pow2(m)), max(16, next_pow2(n))
    block_c = 32 if _INTERPRET else BLOCK_C
    acc, count = _accumulator(rows.device, block_m * block_n)
    w_scale, out_scale = _f32_vector(proj.weight_scale), _f32_vector(proj.out_scale)
    bias = _f32_vector(proj.bias) if proj.bias is not None else w_scale
    state = conv.state
    _conv_step_x_proj_kernel[(cdiv(d, block_c),)](
        rows, state, as_scalar(x_scale), conv.weight, conv.bias if conv.bias is not None else conv.weight,
        as_scalar(conv.out_scale), u, weight, w_scale, bias, out_scale, out, acc, count,
        m, d, n,
        rows.stride(0), *state.stride(), *conv.weight.stride(), weight.stride(0), out.stride(0),
        W=conv.weight.shape[1], CONV_HAS_BIAS=conv.bias is not None, FAST_MATH=not _INTERPRET,
        W_PER_CHANNEL=w_scale.numel() > 1, HAS_BIAS=proj.bias is not None, OUT_PER_CHANNEL=out_scale.numel() > 1,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_N=block_n,
        num_warps=1 if _INTERPRET else _warps(block_m), **launch_options(rows.device, fuse_fp=False),
    )
    return u, out


def takes(x_q: Tensor, conv: ConvStep, proj: Projection) -> bool:
    """Whether `in_proj_conv_x_proj` runs this kernel: MIN_BATCH..MAX_BATCH rows on a device the
    kernels run on, the conv's columns from in_proj's first (Mamba-1's x half), one conv output
    scale (x_proj's input scale), and an x_proj of at most MAX_N outputs."""
    m = x_q.numel() // x_q.shape[-1] if x_q.dim() and x_q.shape[-1] else 0
    return (max(MIN_BATCH, 1) <= m <= min(MAX_BATCH, _MAX_ROWS) and _use_triton(x_q) and conv.start == 0
            and isinstance(conv.out_scale, Tensor) and conv.out_scale.numel() == 1
            and isinstance(proj.weight, Tensor) and proj.weight.dim() == 2 and proj.weight.shape[0] <= MAX_N)


def in_proj_conv_x_proj(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                        out_scale: Tensor, conv: ConvStep, proj: Projection) -> Tuple[Tensor, Tensor, Tensor]:
    """A Mamba-1 decode step's in_proj, conv step and x_proj: `(xz, u, x_dbl)` with `xz, u =
    int8_gemm_conv_step(x_q, .., conv)` and `x_dbl = int8_gemm(u, conv.out_scale, proj...)`, int8
    rows (`xz [..., 2D]`, `u [M, D]`, `x_dbl [M, N]`); `conv.state` advanced in place. The conv
    step and x_proj share a launch where `takes` says so, else run as before."""
    if not takes(x_q, conv, proj):
        xz, u = int8_gemm_conv_step(x_q, x_scale, w_q, w_scale, bias, out_scale, conv)
        return xz, u, int8_gemm(u, conv.out_scale, proj.weight, proj.weight_scale, proj.bias, proj.out_scale)
    xz = int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_scale)
    d = conv.state.shape[1]
    u, x_dbl = conv_step_x_proj(xz.reshape(-1, xz.shape[-1])[:, :d], _f32_vector(out_scale), conv, proj)
    return xz, u, x_dbl


# ---------------------------------------------------------------------------------------------
# Graph op (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


@graph_op("quamba::in_proj_conv_x_proj", mutates_args=("conv_state",))
def in_proj_conv_x_proj_op(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                           out_scale: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], conv_out_scale: Tensor,
                           conv_state: Tensor, x_proj_weight: Tensor, x_proj_weight_scale: Tensor,
                           x_proj_bias: Optional[Tensor], x_proj_out_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`in_proj_conv_update(x_q, .., conv_state)` (results `xz`, `u [B, D, 1]` laid out `[B, 1, D]`)
    and `w8a8_linear(u.transpose(1, 2), conv_out_scale, x_proj_weight, x_proj_weight_scale,
    x_proj_bias, x_proj_out_scale)` (`x_dbl [B, 1, N]` int8): a Mamba-1 decode step's in_proj,
    conv step and x_proj, the last two in one launch at MIN_BATCH..MAX_BATCH sequences
    (`in_proj_conv_x_proj`)."""
    w, b = _conv_params(conv_weight, conv_bias)
    xz, u, x_dbl = in_proj_conv_x_proj(
        x_q, x_scale, w_q, w_scale, bias, out_scale, ConvStep(conv_state, w, b, as_out_scale(conv_out_scale)),
        Projection(x_proj_weight, x_proj_weight_scale, x_proj_bias, x_proj_out_scale))
    return xz, u[:, None, :].transpose(1, 2), x_dbl.reshape(*x_q.shape[:-1], -1)


@in_proj_conv_x_proj_op.register_fake
def _in_proj_conv_x_proj_fake(x_q, x_scale, w_q, w_scale, bias, out_scale, conv_weight, conv_bias, conv_out_scale,
                              conv_state, x_proj_weight, x_proj_weight_scale, x_proj_bias, x_proj_out_scale):
    xz = torch.ops.quamba.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_scale, None)
    batch, channels = conv_state.shape[:2]
    u = x_q.new_empty((batch, 1, channels))
    x_dbl = torch.ops.quamba.int8_linear(u, conv_out_scale, x_proj_weight, x_proj_weight_scale, x_proj_bias,
                                         x_proj_out_scale, None)
    return xz, u.transpose(1, 2), x_dbl
