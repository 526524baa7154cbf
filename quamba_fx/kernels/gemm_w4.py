"""GEMMs with 4-bit weights (Quamba2's W4A16 and W4A8): the packed codes are unpacked and
multiplied in registers, one K block of one scale group at a time.

A weight byte holds the codes of columns 2i (low nibble) and 2i+1 (high nibble). The codes are exact in fp16,
bf16 and int8, so each dot is an exact-input product: W4A16 dots the float activations with the
codes (fp32 accumulation), W4A8 the int8 activations (exact int32), and the block's sum is then
scaled by the group's scale for each column, in fp32. A K block never straddles two groups
(`BLOCK_K` divides the group size), so there is one scale a column per block. The codes are put
back in column order in registers (`tl.join` of the nibbles), so the activations load as
contiguous rows and each block is one dot of K = BLOCK_K. A single W4A16 row
(a batch-1 decode step) runs the GEMV of gemv_w4.py instead, on the CUDA cores, and W4A16
problems of `DEQUANT_MIN_ROWS` rows or more (a prefill) run cuBLAS on the weight dequantized by
dequant_w4.py.

Numerics, against `quant/int4.py`'s references: W4A8's per-block sums are exact, as the
reference's per-group sums, and only the fp32 sum over groups is in another order; W4A16's dots
round like any fp16 GEMM with fp32 accumulation. The tests bound both.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..quant.int4 import _check_w4, w4a8_linear, w4a16_linear
from ..quant.qops import _check_int8, _linear_out_dtype
from . import dequant_w4, gemm_w4_skinny, gemv_w4
from .conv1d_float import MAX_UPDATE_WIDTH, conv1d_silu_update
from .dispatch import INTERPRET, cdiv, fp_fusion, graph_op, use_triton
from .gemm import fused_gemv_ran
from .gemm_epilogue import store_w4_tile
from .int4_codes import column_codes

__all__ = ["Config", "W4A8_SKINNY_MAX_M", "default_config", "supported", "w4a16_gemm", "w4a16_gemm_conv_step",
           "w4a8_gemm"]

# Rows from which a W4A16 problem dequantizes its weight and runs cuBLAS (dequant_w4.py): a
# prefill's GEMM is bound by multiply-adds, where cuBLAS is 10x our mixed-input kernel.
DEQUANT_MIN_ROWS = 256

# Rows up to which W4A8 runs gemm_w4_skinny.py's kernel (the weight on the MMA's M side) rather
# than this module's, where the group size suits it: mamba-2.8b W4A8 decode 3373 -> 6174 tokens/s
# at batch 16, 10983 -> 14323 at batch 64 (session 37, docs/benchmarks.md). A setting, so that
# benchmarks/decode_settings.py can time a model with either kernel.
W4A8_SKINNY_MAX_M = 64

# A K block is one or more whole dots of 16 pairs of columns (tl.dot needs K >= 16 per operand).
_MIN_BLOCK_K = 32


def supported(group_size: int) -> bool:
    """Whether the kernel takes weights in groups of `group_size` (a multiple of 32 columns; the
    reference runs the others)."""
    return group_size % _MIN_BLOCK_K == 0


@triton.jit
def _w4_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, x_scale_ptr, out_scale_ptr, out_ptr, M, N, K,
                    stride_xm, stride_wn, stride_sn, stride_om,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, A8: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    REQUANT: tl.constexpr, PTX: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    half = tl.arange(0, BLOCK_K // 2)
    # Rows and columns past M and N wrap onto valid ones (never stored): the loads need no row
    # masks, and with EVEN_K none at all, so they stay wide vector loads.
    rows = offs_m % M
    cols_n = offs_n % N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + cols_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = k0 // 2 + half
        cols = k0 + offs_k
        if EVEN_K:
            packed = tl.load(w_rows + byte[None, :])
            x = tl.load(x_rows + cols[None, :])
        else:
            packed = tl.load(w_rows + byte[None, :], mask=(2 * byte < K)[None, :], other=0)
            x = tl.load(x_rows + cols[None, :], mask=(cols < K)[None, :], other=0)
        codes = column_codes(packed, PTX)  # [BN, BK] int8, back in column order
        if A8:
            part = tl.dot(x, tl.trans(codes)).to(tl.float32)
        elif IEEE:
            part = tl.dot(x, tl.trans(codes.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(codes.to(x.dtype)))
        scale = tl.load(s_ptr + cols_n * stride_sn + k0 // GROUP).to(tl.float32)
        acc += part * scale[None, :]
    store_w4_tile(acc, offs_m, offs_n, cols_n, M, N, stride_om, x_scale_ptr, bias_ptr, out_scale_ptr, out_ptr, A8,
                  HAS_BIAS, REQUANT)


# A launch config: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
Config = tuple[int, int, int, int, int]
# Column tiles a decode-batch problem should have (0.6 of the H200's 132 SMs: see default_config).
_DECODE_TILES = 80


def default_config(m: int, n: int, group_size: int) -> Config:
    """The config by rule. Up to 16 rows: one 16-row tile. 17 to 64 rows (decode batches): one
    64-row tile, a whole group of 128 columns a block, 4 warps, and the widest column tile that
    still makes `_DECODE_TILES` programs (in session 26's sweep on the H200 this was the fastest
    config on each mamba-2.8b projection at 64 rows: 128 columns for in_proj, 64 for dt_proj, 32
    for out_proj, 16 for x_proj). Above, larger tiles."""
    block_k = 128 if group_size % 128 == 0 else 64 if group_size % 64 == 0 else 32
    if m <= 16:
        return 16, 64, block_k, 4, 3
    if m <= 64:
        block_n = next((bn for bn in (128, 64, 32) if cdiv(n, bn) >= _DECODE_TILES), 16)
        return 64, block_n, block_k, 4, 3
    return 64, 128, min(block_k, 64), 8, 3


def _launch(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor],
            x_scale: Optional[Tensor], out_scale: Optional[Tensor], out: Tensor, config: Optional[Config]) -> Tensor:
    k = x.shape[-1]
    n = w_packed.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out2 = out.view(m, n)
    block_m, block_n, block_k, warps, stages = config or default_config(m, n, group_size)
    if group_size % block_k:
        raise ValueError(f"gemm_w4: BLOCK_K={block_k} must divide the group size {group_size}")
    w, scales = w_packed.contiguous(), w_scale.contiguous()
    dummy = scales  # a pointer for the absent operands; never read (constexpr flags)
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    _w4_gemm_kernel[grid](
        x2, w, scales, bias if bias is not None else dummy,
        x_scale if x_scale is not None else dummy, out_scale if out_scale is not None else dummy, out2,
        m, n, k, x2.stride(0), w.stride(0), scales.stride(0), out2.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        A8=x_scale is not None,
        IEEE=x.dtype == torch.float32, HAS_BIAS=bias is not None, REQUANT=out_scale is not None, PTX=not INTERPRET,
        num_warps=warps, num_stages=stages, **fp_fusion(),
    )
    return out


def w4a16_gemm(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor] = None,
               act_dtype: Optional[torch.dtype] = None, config: Optional[Config] = None,
               gemv: Optional[gemv_w4.Config] = None) -> Tensor:
    """`quamba.w4a16_linear` on the Triton kernels where they run (`dispatch.use_triton`) and the
    group size suits them (`supported`), else the reference: a one-row problem on the GEMV where it
    takes it (`gemv_w4.supported`), problems of `DEQUANT_MIN_ROWS` rows or more on cuBLAS (PyTorch's
    GEMM on a CPU) after dequantizing the weight (`dequant_w4`), the rest on the tensor-core kernel.

    `act_dtype` is the precision the activations are multiplied in (the recipe's "A16"): an fp32
    `x` is rounded to it first (None: x's own dtype). The result has x's dtype either way.
    `config` forces the tensor-core kernel with that config, `gemv` the GEMV with that one
    (benchmarks/gemm_w4.py sweeps both)."""
    n, _ = _check_w4("w4a16_gemm", x, w_packed, w_scale, group_size, bias)
    return _w4a16_gemm("w4a16_gemm", n, x, w_packed, w_scale, group_size, bias, act_dtype, config, gemv, None)[0]


def _w4a16_gemm(name: str, n: int, x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int,
                bias: Optional[Tensor], act_dtype: Optional[torch.dtype], config: Optional[Config],
                gemv: Optional[gemv_w4.Config], conv: Optional[gemv_w4.ConvStep]) -> tuple[Tensor, bool]:
    """w4a16_gemm's body on checked weights (`n` rows): `(out, whether the GEMV's epilogue ran
    `conv`)`; the caller runs the conv step where it did not (`w4a16_gemm_conv_step`)."""
    if act_dtype is not None and act_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: act_dtype must be float16, bfloat16 or float32, got {act_dtype}")
    rounds = act_dtype is not None and act_dtype != x.dtype and x.dtype == torch.float32
    if not (use_triton(x) and supported(group_size)) or x.numel() == 0:
        x_in = x.to(act_dtype).to(x.dtype) if rounds else x
        return w4a16_linear(x_in, w_packed, w_scale, group_size, bias), False
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    x_in = x.to(act_dtype) if rounds else x
    gemv_takes = gemv_w4.supported(x_in, w_packed, group_size)
    if gemv is not None and not gemv_takes:
        raise ValueError(f"{name}: the GEMV takes one fp16 row (or an fp32 row with act_dtype float16), K a "
                         f"multiple of 8 and groups of 32k columns; got x {x.dtype} {tuple(x.shape)}, act_dtype "
                         f"{act_dtype} and groups of {group_size}")
    if gemv is not None or (config is None and gemv_takes):
        if conv is not None and fused_gemv_ran(
                "w4_gemv_conv", (n, x_in.shape[-1], group_size, bias is not None, x.device), "a conv epilogue",
                lambda: gemv_w4.launch(x_in, w_packed, w_scale, group_size, bias32, out, gemv, conv)):
            return out, True
        return gemv_w4.launch(x_in, w_packed, w_scale, group_size, bias32, out, gemv), False
    if config is None and x.numel() >= DEQUANT_MIN_ROWS * x.shape[-1]:
        w = dequant_w4.dequantize(w_packed, w_scale, group_size, x.shape[-1], x_in.dtype)
        y = torch.nn.functional.linear(x_in, w)
        return (y.float() + bias32 if bias32 is not None else y).to(x.dtype), False
    return _launch(x_in, w_packed, w_scale, group_size, bias32, None, None, out, config), False


def w4a16_gemm_conv_step(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor],
                         act_dtype: Optional[torch.dtype], conv_weight: Tensor, conv_bias: Optional[Tensor],
                         conv_state: Tensor, gemv: Optional[gemv_w4.Config] = None,
                         conv_start: int = 0) -> tuple[Tensor, Tensor]:
    """A decode step's in_proj and conv1d on float activations: `xz = w4a16_gemm(x, ..)` (x
    `[B, 1, K]`) and the conv step of its `D = conv_state.shape[1]` columns from `conv_start`
    (Mamba-1's x half: 0; Mamba-2's xBC: after z) (`conv1d_float.conv1d_silu_update`:
    `conv_weight [D, 1, W]`, `conv_state [B, D, W-1]` advanced in place); returns `(xz, u)`, u
    `[B, D, 1]` in xz's dtype.

    One row that the GEMV takes (batch-1 decode on the GPU) is one launch: the epilogue of each
    row tile runs its channels' conv step (`conv1d_float.conv_silu_step`, the conv kernel's own
    arithmetic on the output as stored, so the same bits). Other problems run the GEMM, then the
    conv kernel. `gemv` overrides the GEMV's config, as in `w4a16_gemm`."""
    n, _ = _check_w4("w4a16_gemm_conv_step", x, w_packed, w_scale, group_size, bias)
    if (x.dim() != 3 or x.shape[1] != 1 or conv_state.dim() != 3 or conv_state.shape[0] != x.shape[0]
            or conv_state.shape[1] < 1 or not 0 <= conv_start <= n - conv_state.shape[1] or conv_weight.dim() != 3
            or conv_weight.shape[:2] != (conv_state.shape[1], 1) or conv_weight.shape[2] != conv_state.shape[2] + 1):
        raise ValueError(f"w4a16_gemm_conv_step: x must be one step [B, 1, K] and conv_state [B, D, W-1] with "
                         f"conv_start + D <= {n}, conv_weight [D, 1, W]; got x {tuple(x.shape)}, conv_state "
                         f"{tuple(conv_state.shape)}, conv_start {conv_start}, conv_weight {tuple(conv_weight.shape)}")
    channels, width = conv_state.shape[1], conv_weight.shape[2]
    step = None
    if x.shape[0] == 1 and 2 <= width <= MAX_UPDATE_WIDTH:  # for the GEMV's epilogue, if the GEMV runs it
        step = gemv_w4.ConvStep(conv_state, conv_weight.reshape(channels, width),
                                None if conv_bias is None else conv_bias.contiguous(),
                                torch.empty((1, channels), dtype=x.dtype, device=x.device), conv_start)
    xz, fused = _w4a16_gemm("w4a16_gemm_conv_step", n, x, w_packed, w_scale, group_size, bias, act_dtype, None, gemv,
                            step)
    u = step.u if fused else conv1d_silu_update(xz[:, 0, conv_start:conv_start + channels], conv_weight, conv_bias,
                                                conv_state)
    return xz, u[..., None]


def w4a8_gemm(x_q: Tensor, x_scale: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int,
              bias: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
              out_dtype: Optional[torch.dtype] = None, config: Optional[Config] = None,
              skinny: Optional[gemm_w4_skinny.Config] = None) -> Tensor:
    """`quamba.w4a8_linear` on the Triton kernels where they run and the group size suits them, else
    the reference. Per-tensor activation and output scales only, as the recipes make them.

    Up to `W4A8_SKINNY_MAX_M` rows (decode batches) run gemm_w4_skinny.py's kernel where the group
    size suits it, more rows this module's. `config` forces this module's kernel with that config,
    `skinny` the other kernel with that one (benchmarks/gemm_w4.py sweeps both)."""
    _check_int8(x_q, "w4a8_gemm: x_q")
    n, _ = _check_w4("w4a8_gemm", x_q, w_packed, w_scale, group_size, bias)
    per_tensor = x_scale.numel() == 1 and (out_scale is None or out_scale.numel() == 1)
    if not (use_triton(x_q) and supported(group_size) and per_tensor) or x_q.numel() == 0:
        return w4a8_linear(x_q, x_scale, w_packed, w_scale, group_size, bias, out_scale, out_dtype)
    out = torch.empty((*x_q.shape[:-1], n), dtype=_linear_out_dtype(out_scale, out_dtype), device=x_q.device)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    scale32 = lambda s: None if s is None else s.to(torch.float32).reshape(1).contiguous()  # noqa: E731
    rows = x_q.numel() // x_q.shape[-1]
    if skinny is not None and rows > gemm_w4_skinny.MAX_M:
        raise ValueError(f"w4a8_gemm: the skinny kernel takes at most {gemm_w4_skinny.MAX_M} rows, got {rows}")
    if skinny is not None and not gemm_w4_skinny.supported(group_size):
        raise ValueError(f"w4a8_gemm: the skinny kernel takes groups of 64k columns, got {group_size}")
    if skinny is not None or (config is None and rows <= W4A8_SKINNY_MAX_M and gemm_w4_skinny.supported(group_size)):
        gemm_w4_skinny.launch(x_q.reshape(rows, -1).contiguous(), w_packed.contiguous(), w_scale.contiguous(),
                              group_size, bias32, scale32(x_scale), scale32(out_scale), out.view(rows, n), skinny)
        return out
    return _launch(x_q, w_packed, w_scale, group_size, bias32, scale32(x_scale), scale32(out_scale), out, config)


# ---------------------------------------------------------------------------------------------
# Graph ops (torch.ops.quamba.*, see dispatch.graph_op)
# ---------------------------------------------------------------------------------------------


@graph_op("quamba::w4a16_gemm")
def w4a16_gemm_op(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor] = None,
                  act_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The W4A16 GEMM kernels; numerics of `torch.ops.quamba.w4a16_linear` of x rounded to
    `act_dtype`, up to accumulation order (and fp16 partial sums on the GEMV: gemv_w4.py)."""
    return w4a16_gemm(x, w_packed, w_scale, group_size, bias, act_dtype)


@w4a16_gemm_op.register_fake
def _w4a16_gemm_fake(x, w_packed, w_scale, group_size, bias=None, act_dtype=None):
    return torch.ops.quamba.w4a16_linear(x, w_packed, w_scale, group_size, bias)


@graph_op("quamba::w4a16_in_proj_conv_update", mutates_args=("conv_state",))
def w4a16_in_proj_conv_update_op(x: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor],
                                 act_dtype: Optional[torch.dtype], conv_weight: Tensor, conv_bias: Optional[Tensor],
                                 conv_state: Tensor, conv_start: int = 0) -> tuple[Tensor, Tensor]:
    """A decode step's W4A16 in_proj and conv1d: `xz = w4a16_gemm(x, .., act_dtype)` and
    `conv1d_silu_cached(xz.transpose(1, 2)[:, conv_start:conv_start + D], conv_weight, conv_bias,
    conv_state, decode=True)`, D = conv_state.shape[1]; returns `(xz, u)`. At batch 1 on the GPU
    one GEMV launch computes both (`w4a16_gemm_conv_step`)."""
    return w4a16_gemm_conv_step(x, w_packed, w_scale, group_size, bias, act_dtype, conv_weight, conv_bias,
                                conv_state, conv_start=conv_start)


@w4a16_in_proj_conv_update_op.register_fake
def _w4a16_in_proj_conv_update_fake(x, w_packed, w_scale, group_size, bias, act_dtype, conv_weight, conv_bias,
                                    conv_state, conv_start=0):
    xz = torch.ops.quamba.w4a16_linear(x, w_packed, w_scale, group_size, bias)
    return xz, xz.new_empty((conv_state.shape[0], conv_state.shape[1], 1))


@graph_op("quamba::w4a8_gemm")
def w4a8_gemm_op(x_q: Tensor, x_scale: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int,
                 bias: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The W4A8 GEMM kernel; numerics of `torch.ops.quamba.w4a8_linear` up to the order of the group sum."""
    return w4a8_gemm(x_q, x_scale, w_packed, w_scale, group_size, bias, out_scale, out_dtype)


@w4a8_gemm_op.register_fake
def _w4a8_gemm_fake(x_q, x_scale, w_packed, w_scale, group_size, bias=None, out_scale=None, out_dtype=None):
    return torch.ops.quamba.w4a8_linear(x_q, x_scale, w_packed, w_scale, group_size, bias, out_scale, out_dtype)
