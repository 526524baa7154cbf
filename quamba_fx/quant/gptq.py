"""GPTQ (Frantar et al., 2022) for grouped 4-bit weights: the input statistics it needs
(`HessianObserver`) and the column-by-column quantization with error feedback (`gptq_int4`).

Round-to-nearest quantizes every weight on its own. GPTQ quantizes one input column at a time and
moves each column's rounding error onto the columns not yet quantized, weighted by the inverse of
`H = 2 X^T X / rows` (X: the Linear's calibration inputs), which minimises the error of the layer's
output `X W^T` rather than of the weight. Group scales are set when the quantizer reaches a group's
first column, from the weights as the earlier error feedback left them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .int4 import _check_weight_groups, group_count, int4_scales, pack_int4, quantize_int4_codes

__all__ = ["DEFAULT_DAMPING", "HessianObserver", "gptq_int4"]

# Added to H's diagonal as a fraction of its mean, so that its inverse exists and rounding errors
# are not amplified along directions the calibration data barely spans (GPTQ's default).
DEFAULT_DAMPING = 0.01


class HessianObserver:
    """Accumulates `H = 2 X^T X / rows` over the inputs `[..., K]` a Linear receives, in fp32.

    `label` names the Linear in error messages. The running mean keeps the sum's magnitude that of
    one batch, however many batches come.
    """

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.hessian: Tensor | None = None
        self.rows = 0

    def observe(self, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"the input of {self.label or 'a Linear'} holds NaN or Inf")
        if self.hessian is None:
            self.hessian = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
        elif self.hessian.shape[0] != rows.shape[1]:
            raise ValueError(f"{self.label or 'a Linear'} got inputs of {rows.shape[1]} features after {self.hessian.shape[0]}")
        total = self.rows + rows.shape[0]
        self.hessian.mul_(self.rows / total).addmm_(rows.t(), rows, alpha=2.0 / total)
        self.rows = total


def _inverse_cholesky(hessian: Tensor, damping: float) -> Tensor:
    """Upper Cholesky factor of `(H + damping * mean(diag H) * I)^-1`, raising the damping tenfold
    (up to four times) when rounding leaves the damped matrix not positive definite."""
    k = hessian.shape[0]
    mean = float(hessian.diagonal().mean())
    for attempt in range(5):
        damped = hessian + (damping * 10 ** attempt) * max(mean, 1e-12) * torch.eye(k, dtype=hessian.dtype, device=hessian.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("GPTQ: the input Hessian is not positive definite even with 10000x the damping; "
                     "the calibration inputs may be degenerate")


def gptq_int4(weight: Tensor, hessian: Tensor, group_size: int, damping: float = DEFAULT_DAMPING) -> tuple[Tensor, Tensor]:
    """Quantize a Linear weight `[N, K]` to grouped int4 with GPTQ, given its input Hessian `[K, K]`
    (`HessianObserver.hessian`). Returns what `quantize_weight_int4` returns: `(packed uint8
    [N, ceil(K/2)], scale fp16 [N, ceil(K/group_size)])`. Computes in fp32 on the weight's device.

    Columns whose input was always zero (a zero diagonal) carry no information: their weights are
    set to zero and take no error. Raises `ValueError` for mismatched shapes or a Hessian that
    holds NaN or Inf.
    """
    _check_weight_groups(weight, group_size, "gptq_int4")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq_int4: the Hessian must be [K={k}, K], got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("gptq_int4: the Hessian holds NaN or Inf")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    inverse = _inverse_cholesky(h, damping)
    codes = torch.zeros(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, group_count(k, group_size), dtype=torch.float16, device=w.device)
    # Lazy batch updates: columns are quantized in blocks that hold whole groups, and the block's
    # accumulated error reaches the later columns in one matmul.
    block = max(128 // group_size, 1) * group_size
    for start in range(0, k, block):
        stop = min(start + block, k)
        w_block = w[:, start:stop].clone()
        errors = torch.zeros_like(w_block)
        inv_block = inverse[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % group_size == 0:
                g = column // group_size
                scales[:, g] = int4_scales(w_block[:, i:i + group_size].abs().amax(dim=1))
            scale = scales[:, column // group_size].to(torch.float32)
            q = quantize_int4_codes(w_block[:, i], scale)
            codes[:, column] = q
            error = (w_block[:, i] - q.to(torch.float32) * scale) / inv_block[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * inv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ inverse[start:stop, stop:]
    return pack_int4(codes), scales
