"""Mamba-2's scan (SSD) as one Triton kernel: chunks of `BLOCK_Q` steps, the state in registers.

Semantics are those of `quamba_fx.ssd_reference.ssd_scan_reference` (the `quamba::ssd_scan` op):
per head h, `S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T` and `y_t = S_t C_t + D_h x_t`, with
`dt = clamp(softplus(dt + dt_bias), dt_min, dt_max)`, in fp32.

One program owns one (batch, head, block of head_dim channels) and walks the sequence chunk by chunk,
carrying the `[BLOCK_P, N]` state in registers. Inside a chunk it computes, with `cum` the running sum
of `dt A` from the chunk's start:

    y      = exp(cum) * (C S^T)                                  the state entering the chunk
           + ((C B^T) * exp(cum_l - cum_s) [s <= l]) (dt x)      the chunk's own steps
    S_next = exp(cum_last) S + (dt x * exp(cum_last - cum))^T B

three small matrix products per chunk (`tl.dot`), instead of a step-by-step loop. Steps past L are
loaded as dt = 0: they neither decay nor add. The chunk length is the kernel's tile, not the model's
`chunk_size` (which only orders the reference's fp32 additions); every product runs in IEEE fp32
(`input_precision="ieee"`), so results match the reference to fp32 rounding, not bit for bit.

Not used by the graphs yet: on an H200 it took 16.7 ms for a 1 x 2048 mamba2-2.7b scan against
mamba_ssm's 0.106 ms (`benchmarks/ssd.py`; docs/benchmarks.md, session 25). One program walks all
of a head's chunks in turn (80 programs at batch 1), and IEEE fp32 dots run on CUDA cores. A fast
version computes the chunks' states in parallel and carries them in a second pass, with
fp16/bf16 tensor-core dots (fp32 accumulation), as mamba_ssm does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ssd_reference import check_ssd_inputs, ssd_scan_reference
from .dispatch import next_pow2
from .dispatch import use_triton as _use_triton

__all__ = ["ssd_scan"]

@triton.jit
def _ssd_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr, state_in_ptr, state_out_ptr,
    L, H, P, N, heads_per_group, dt_min, dt_max,
    stride_xb, stride_xl, stride_xh,
    stride_dtb, stride_dtl,
    stride_bb, stride_bl, stride_bg,
    stride_cb, stride_cl, stride_cg,
    stride_yb, stride_yl, stride_yh,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP_MAX: tl.constexpr,
    HAS_STATE_IN: tl.constexpr, HAS_STATE_OUT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    g = h // heads_per_group
    rp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    rq = tl.arange(0, BLOCK_Q)
    p_ok = rp < P
    n_ok = rn < N
    a_h = tl.load(A_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32) if HAS_DT_BIAS else 0.0
    d_h = tl.load(D_ptr + h).to(tl.float32) if HAS_D else 0.0
    state_offsets = ((b * H + h) * P + rp[:, None]) * N + rn[None, :]
    state_mask = p_ok[:, None] & n_ok[None, :]
    if HAS_STATE_IN:
        state = tl.load(state_in_ptr + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    causal = rq[:, None] >= rq[None, :]

    x_base = x_ptr + b * stride_xb + h * stride_xh
    dt_base = dt_ptr + b * stride_dtb + h
    b_base = B_ptr + b * stride_bb + g * stride_bg
    c_base = C_ptr + b * stride_cb + g * stride_cg
    y_base = y_ptr + b * stride_yb + h * stride_yh
    for start in range(0, L, BLOCK_Q):
        t = start + rq
        t_ok = t < L
        dt = tl.load(dt_base + t * stride_dtl, mask=t_ok, other=0.0).to(tl.float32) + dt_bias
        if SOFTPLUS:
            # torch's softplus: linear above 20. log(1 + e^x) is not log1p: below about -17 it gives
            # 0 where the reference gives e^x < 4e-8, a step that then adds almost nothing anyway.
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
        dt = tl.maximum(dt, dt_min)
        if CLAMP_MAX:
            dt = tl.minimum(dt, dt_max)
        dt = tl.where(t_ok, dt, 0.0)
        cum = tl.cumsum(dt * a_h, axis=0)  # [Q]
        # The chunk's total decay is cum's last entry, picked out exactly (a sum of it and zeros):
        # a tl.sum of the terms would add them in another order, and the last step's
        # exp(last - cum) would no longer be exactly 1.
        last = tl.sum(tl.where(rq == BLOCK_Q - 1, cum, 0.0), axis=0)
        x = tl.load(x_base + t[:, None] * stride_xl + rp[None, :], mask=t_ok[:, None] & p_ok[None, :],
                    other=0.0).to(tl.float32)
        bq = tl.load(b_base + t[:, None] * stride_bl + rn[None, :], mask=t_ok[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
        cq = tl.load(c_base + t[:, None] * stride_cl + rn[None, :], mask=t_ok[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
        inputs = x * dt[:, None]  # [Q, P]: dt_s x_s, what step s adds before decaying
        # The state entering the chunk, decayed to each step and read through C.
        y = tl.dot(cq, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
        # The chunk's own steps: exp(cum_l - cum_s) for s <= l (the difference is <= 0 there).
        gap = tl.where(causal, cum[:, None] - cum[None, :], 0.0)
        scores = tl.where(causal, tl.dot(cq, tl.trans(bq), input_precision="ieee") * tl.exp(gap), 0.0)
        y += tl.dot(scores, inputs, input_precision="ieee")
        if HAS_D:
            y += x * d_h
        tl.store(y_base + t[:, None] * stride_yl + rp[None, :], y, mask=t_ok[:, None] & p_ok[None, :])
        to_end = tl.exp(last - cum)  # [Q]
        state = state * tl.exp(last) + tl.dot(tl.trans(inputs * to_end[:, None]), bq, input_precision="ieee")
    if HAS_STATE_OUT:
        tl.store(state_out_ptr + state_offsets, state, mask=state_mask)


def _tiles(head_dim: int, state: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_P, BLOCK_N): the whole state in one tile (N <= 256 in every published
    Mamba-2), head_dim in blocks of at most 64, chunks shorter as the state grows, to keep the
    `[Q, N]` B and C tiles and the `[P, N]` state in registers. tl.dot needs every dim >= 16."""
    block_n = max(16, next_pow2(state))
    block_p = max(16, min(64, next_pow2(head_dim)))
    block_q = 64 if block_n <= 64 else 32
    return block_q, block_p, block_n


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
             dt_bias: Optional[Tensor] = None, dt_softplus: bool = True, dt_min: float = 0.0,
             dt_max: float = math.inf, chunk_size: int = 256, initial_state: Optional[Tensor] = None,
             return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2's scan on the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), else the reference.

    Arguments and layouts as `quamba_fx.ssd_reference.ssd_scan_reference` (which also validates them;
    `chunk_size` only matters there). Returns y fp32 `[batch, L, heads, head_dim]`, and with
    `return_final_state` also the fp32 state `[batch, heads, head_dim, state]`.
    """
    if not _use_triton(x) or x.numel() == 0:
        y, final = ssd_scan_reference(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size,
                                      initial_state=initial_state)
        return (y, final) if return_final_state else y
    check_ssd_inputs(x, dt, A, B, C, D, dt_bias, chunk_size)
    batch, length, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    # Unit stride along the last dim (the kernel's vector loads); slices of in_proj's output keep it.
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    dt = dt if dt.stride(-1) == 1 else dt.contiguous()
    y = torch.empty((batch, length, heads, head_dim), dtype=torch.float32, device=x.device)
    final = (torch.empty((batch, heads, head_dim, state), dtype=torch.float32, device=x.device)
             if return_final_state else None)
    start = None if initial_state is None else initial_state.float().contiguous()
    block_q, block_p, block_n = _tiles(head_dim, state)
    grid = (batch * heads, triton.cdiv(head_dim, block_p))
    _ssd_scan_kernel[grid](
        x, dt, A.float().contiguous(), B, C, D.float().contiguous() if D is not None else x,
        dt_bias.float().contiguous() if dt_bias is not None else x, y,
        start if start is not None else y, final if final is not None else y,
        length, heads, head_dim, state, heads // groups, float(dt_min), 0.0 if math.isinf(dt_max) else float(dt_max),
        x.stride(0), x.stride(1), x.stride(2),
        dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        CLAMP_MAX=not math.isinf(dt_max), HAS_STATE_IN=start is not None, HAS_STATE_OUT=final is not None,
        BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return (y, final) if return_final_state else y
