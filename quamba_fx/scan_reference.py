"""The PyTorch reference of Mamba's selective scan: the oracle every scan implementation here
(the custom op's CPU path, the Triton kernels, their int8 reference) is checked against.

A leaf module (torch only), so that the op and the kernels can both use it without importing each
other.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_reference"]


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    initial_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference of the scan: a plain loop over time, fp32 state.

    Returns `(y, final_state)` with `final_state` of shape `[batch, d_inner, d_state]` (fp32). The loop
    is the oracle the Triton kernels are tested against, so it favours clarity over speed; it keeps
    one `[batch, d_inner, d_state]` state rather than materialising the `[.., L, d_state]` discretised
    tensors, so memory stays flat in L.
    """
    batch, d_inner, length = u.shape
    d_state = A.shape[-1]
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A32, B32, C32, u32 = A.float(), B.float(), C.float(), u.float()
    if initial_state is None:
        state = u32.new_zeros(batch, d_inner, d_state)
    else:
        state = initial_state.float().clone()
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]
        state = torch.exp(dt_t * A32) * state + (dt_t * u32[:, :, t, None]) * B32[:, None, :, t]
        ys.append(torch.bmm(state, C32[:, :, t, None])[..., 0])
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(batch, d_inner, 0)
    if D is not None:
        y = y + u32 * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), state
