"""The PyTorch references of Mamba-2's scan (SSD, "state space duality"): the chunked form the
custom op runs on CPU, and the plain recurrence it is checked against.

Per head h of a block (P channels of head_dim, N states, heads share B and C within a group):

    dt_t = clamp(softplus(dt_t + dt_bias[h]), dt_min, dt_max)
    S_t  = exp(dt_t * A[h]) * S_{t-1} + dt_t * x_t B_t^T        S: [P, N], fp32
    y_t  = S_t C_t + D[h] * x_t

The chunked form (the SSD paper's block decomposition) computes the same thing chunk by chunk: inside
a chunk of Q steps it is a masked, decayed "attention" `(C B^T * decay) x` (quadratic in Q, but
matrix products), and only the Q-th state is carried to the next chunk. The chunk size changes the
order of the fp32 additions, not the result; HF's and mamba_ssm's kernels use the config's
`chunk_size`, so the op takes it too. A leaf module (torch only), like `scan_reference`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["check_ssd_inputs", "ssd_recurrence_reference", "ssd_scan_reference"]


def check_ssd_inputs(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], chunk_size: int) -> None:
    """Raise `InputError` naming the argument unless the scan's shapes agree and `chunk_size` >= 1."""
    if x.dim() != 4:
        raise InputError(f"ssd_scan: x must be [batch, L, heads, head_dim], got shape {tuple(x.shape)}")
    batch, length, heads, _ = x.shape
    if tuple(dt.shape) != (batch, length, heads):
        raise InputError(f"ssd_scan: dt must be [batch, L, heads] = {(batch, length, heads)}, got {tuple(dt.shape)}")
    if B.dim() != 4 or tuple(B.shape[:2]) != (batch, length) or B.shape != C.shape:
        raise InputError(f"ssd_scan: B and C must both be [batch, L, groups, state] with batch {batch} and L {length}, "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    groups = B.shape[2]
    if groups < 1 or heads % groups:
        raise InputError(f"ssd_scan: {heads} heads cannot share {groups} B/C groups evenly")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (heads,):
            raise InputError(f"ssd_scan: {name} must be [heads] = [{heads}], got {tuple(t.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"ssd_scan: chunk_size must be an integer >= 1, got {chunk_size!r}")


def _discretized_dt(dt: torch.Tensor, dt_bias: Optional[torch.Tensor], dt_softplus: bool, dt_min: float,
                    dt_max: float) -> torch.Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    # HF clamps even at the default (0, inf) limits; clamp_min/max keep an infinite bound exact.
    return dt.clamp(min=dt_min, max=None if math.isinf(dt_max) else dt_max)


def _heads_of_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    # [b, L, G, N] -> [b, L, H, N]: head h reads group h // (H // G), as HF and mamba_ssm do.
    return t.float().repeat_interleave(heads // t.shape[2], dim=2)


def ssd_scan_reference(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = True,
    dt_min: float = 0.0, dt_max: float = math.inf, chunk_size: int = 256,
    initial_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's scan in chunks of `chunk_size` steps, fp32 throughout.

    `x` `[batch, L, heads, head_dim]`, `dt` `[batch, L, heads]`, `A` `[heads]` (negative: it is
    `-exp(A_log)`), `B`, `C` `[batch, L, groups, state]`, `D` and `dt_bias` `[heads]`. Returns
    `(y, final_state)`: y fp32 `[batch, L, heads, head_dim]`, the state after the last step fp32
    `[batch, heads, head_dim, state]` (from `initial_state`, else zeros). Raises `InputError` on
    inconsistent shapes.
    """
    check_ssd_inputs(x, dt, A, B, C, D, dt_bias, chunk_size)
    batch, length, heads, head_dim = x.shape
    x32 = x.float()
    dt32 = _discretized_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)
    B32, C32 = _heads_of_groups(B, heads), _heads_of_groups(C, heads)
    log_decay = dt32 * A.float()  # [b, L, H]: log of each step's state decay
    state = (x32.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_state is None
             else initial_state.float().clone())
    outputs = []
    for start in range(0, length, chunk_size):
        steps = slice(start, min(start + chunk_size, length))
        xs, dts, Bs, Cs = x32[:, steps], dt32[:, steps], B32[:, steps], C32[:, steps]
        cum = log_decay[:, steps].cumsum(dim=1)  # [b, Q, H]: log decay from the chunk's start to step l
        q = cum.shape[1]
        # decay[b, h, l, s] = exp(cum[l] - cum[s]) for s <= l (step s's input as seen at step l), else 0.
        gap = cum.permute(0, 2, 1)[:, :, :, None] - cum.permute(0, 2, 1)[:, :, None, :]
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(gap.masked_fill(~causal, -math.inf))
        scores = torch.einsum("blhn,bshn->bhls", Cs, Bs) * decay
        inputs = xs * dts[..., None]  # dt_s x_s: what step s adds, before the decay
        within = torch.einsum("bhls,bshp->blhp", scores, inputs)
        # The state entering the chunk, decayed to each step and read out through C.
        carried = torch.einsum("blhn,bhpn->blhp", Cs, state) * torch.exp(cum)[..., None]
        outputs.append(within + carried)
        # The state leaving the chunk: the entering one decayed over the whole chunk, plus each
        # step's input decayed from its step to the chunk's end.
        to_end = torch.exp(cum[:, -1:, :] - cum)  # [b, Q, H]
        state = (state * torch.exp(cum[:, -1, :])[:, :, None, None]
                 + torch.einsum("bshn,bshp->bhpn", Bs * to_end[..., None], inputs))
    y = torch.cat(outputs, dim=1) if outputs else x32.new_zeros(batch, 0, heads, head_dim)
    if D is not None:
        y = y + x32 * D.float()[:, None]
    return y, state


def ssd_recurrence_reference(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = True,
    dt_min: float = 0.0, dt_max: float = math.inf, initial_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan as `ssd_scan_reference`, one step at a time: the definition, for tests."""
    check_ssd_inputs(x, dt, A, B, C, D, dt_bias, 1)
    batch, length, heads, head_dim = x.shape
    x32 = x.float()
    dt32 = _discretized_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)
    B32, C32 = _heads_of_groups(B, heads), _heads_of_groups(C, heads)
    state = (x32.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_state is None
             else initial_state.float().clone())
    ys = []
    for t in range(length):
        dt_t = dt32[:, t, :, None, None]
        state = torch.exp(dt_t * A.float()[:, None, None]) * state + dt_t * x32[:, t, :, :, None] * B32[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C32[:, t]))
    y = torch.stack(ys, dim=1) if ys else x32.new_zeros(batch, 0, heads, head_dim)
    if D is not None:
        y = y + x32 * D.float()[:, None]
    return y, state
