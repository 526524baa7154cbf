"""Opaque operators that appear as single nodes in captured graphs.

`torch.ops.quamba.selective_scan` is the Mamba-1 selective scan, `torch.ops.quamba.ssd_scan` Mamba-2's;
their `*_cached` forms are what generation's prefill and decode graphs call, carrying the scan
state between calls.
Each is a `torch.library` custom op, so torch.fx, dynamo and export all see one node whatever the
sequence length, and its fake implementation lets shape propagation run without computing anything.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import InputError
from .kernels.scan import selective_scan as triton_selective_scan
from .kernels.scan import selective_state_update as triton_state_update
from .quant.hadamard import hadamard  # noqa: F401  (re-exported: torch.ops.quamba.hadamard is defined beside its math)
from .scan_reference import selective_scan_reference
from .ssd_reference import ssd_scan_reference

__all__ = ["check_token_range", "hadamard", "selective_scan",
           "selective_scan_cached", "selective_scan_reference", "ssd_scan", "ssd_scan_cached", "token_ids_in_range"]


@torch.library.custom_op("quamba::selective_scan", mutates_args=())
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Selective scan `y = scan(u, delta, A, B, C) + D * u`, gated by `silu(z)`.

    Layouts follow mamba_ssm's `selective_scan_fn`: `u`, `delta`, `z` are `[batch, d_inner, L]`,
    `A` is `[d_inner, d_state]`, `B` and `C` are `[batch, d_state, L]`, `D` and `delta_bias` are
    `[d_inner]`. The state is kept in fp32; the result has `u`'s dtype. CUDA tensors run the
    Triton kernel of `quamba_fx.kernels.scan`, others the reference loop of `scan_reference`.
    """
    # Contiguous, as the fake promises: compilers trust the fake's strides.
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[0].contiguous()


@selective_scan.register_kernel("cuda")
def _selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    # The Triton kernel in float mode.
    return triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus).contiguous()


@selective_scan.register_fake
def _selective_scan_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    return u.new_empty(u.shape)


@torch.library.custom_op("quamba::selective_scan_cached", mutates_args=("ssm_state",))
def selective_scan_cached(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    ssm_state: torch.Tensor,
    decode: bool,
) -> torch.Tensor:
    """`selective_scan` with a cache, `ssm_state` `[batch, d_inner, d_state]` (any float dtype).

    Prefill (`decode=False`) starts from zeros, as `selective_scan` does, and leaves the final state
    in `ssm_state`; decode (`decode=True`, any L, typically 1) continues from it and advances it.
    CUDA tensors run the Triton scan in float mode (a one-token decode its state-update kernel),
    others the reference loop.
    """
    y, final = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        initial_state=ssm_state if decode else None)
    ssm_state.copy_(final)
    return y.contiguous()


@selective_scan_cached.register_kernel("cuda")
def _selective_scan_cached_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state, decode):
    return selective_scan_cached_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state, decode)


def selective_scan_cached_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state, decode):
    """`selective_scan_cached` on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if decode and u.shape[-1] == 1:
        y = triton_state_update(ssm_state, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D,
                                None if z is None else z[..., 0], delta_bias, delta_softplus)
        return y[..., None]
    y, final = triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     initial_state=ssm_state if decode else None, return_final_state=True,
                                     state_dtype=ssm_state.dtype)
    ssm_state.copy_(final)
    return y.contiguous()


@selective_scan_cached.register_fake
def _selective_scan_cached_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state, decode):
    return u.new_empty(u.shape)


@torch.library.custom_op("quamba::ssd_scan", mutates_args=())
def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
) -> torch.Tensor:
    """Mamba-2's scan (SSD): `y_t = S_t C_t + D * x_t` with `S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T`.

    Layouts follow Hugging Face's `Mamba2Mixer`: `x` `[batch, L, heads, head_dim]`, `dt`
    `[batch, L, heads]` (before `dt_bias`, softplus and the `[dt_min, dt_max]` clamp), `A`, `D`,
    `dt_bias` `[heads]`, `B`, `C` `[batch, L, groups, state]`. Computed in fp32 in chunks of
    `chunk_size` steps (`quamba_fx.ssd_reference`); the result is fp32 `[batch, L, heads, head_dim]`,
    as Hugging Face's scan returns it to the gated norm. `dt_max` may be `math.inf` (HF's default).
    Every device runs the reference (its einsums are cuBLAS calls on CUDA); lowered graphs run
    `quamba::ssd_scan_triton` instead, the chunked Triton kernels of `quamba_fx.kernels.ssd`.
    """
    return ssd_scan_reference(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size)[0].contiguous()


@ssd_scan.register_fake
def _ssd_scan_fake(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("quamba::ssd_scan_cached", mutates_args=("ssm_state",))
def ssd_scan_cached(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
    ssm_state: torch.Tensor,
    decode: bool,
) -> torch.Tensor:
    """`ssd_scan` with a cache, `ssm_state` `[batch, heads, head_dim, state]` (any float dtype).

    Prefill (`decode=False`) starts from zeros, as `ssd_scan` does, and leaves the final state in
    `ssm_state`; decode (`decode=True`, any L, typically 1) continues from it and advances it.
    """
    y, final = ssd_scan_reference(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size,
                                  initial_state=ssm_state if decode else None)
    ssm_state.copy_(final)
    return y.contiguous()


@ssd_scan_cached.register_fake
def _ssd_scan_cached_fake(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size, ssm_state, decode):
    return x.new_empty(x.shape, dtype=torch.float32)


def check_token_range(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise `InputError` unless every id lies in `[0, vocab_size)` (reads the data: a sync on GPU)."""
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise InputError(f"token ids must lie in [0, {vocab_size}); got values in [{low}, {high}]")


@torch.library.custom_op("quamba::token_ids_in_range", mutates_args=())
def token_ids_in_range(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`input_ids` (a copy), after `check_token_range`: the range check as a node of compiled graphs.

    Compilers drop plain Python checks from the graphs they build; an out-of-range id then reaches a
    compiled embedding, which fails with an index assert that names no token, or aborts the process.
    As an opaque op the check stays, and it costs a copy of the ids, not of the activations.
    """
    check_token_range(input_ids, vocab_size)
    return input_ids.clone()


@token_ids_in_range.register_fake
def _token_ids_in_range_fake(input_ids, vocab_size):
    return torch.empty_like(input_ids)
