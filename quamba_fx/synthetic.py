"""Synthetic activation outliers, for checking a recipe without a trained checkpoint.

Trained Mamba models have a few channels of the scan output (out_proj's input) that are orders of
magnitude larger than the rest (the Quamba paper, section 3). Random weights don't. `inject_out_proj_outliers`
creates them: it multiplies the skip parameter D of a few channels by `factor` (the skip term then
dominates those channels of y) and divides the matching out_proj columns by `factor`, so the
residual stream keeps its scale. The model's function changes; compare it only with itself.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def inject_out_proj_outliers(model: nn.Module, channels: int = 4, factor: float = 100.0, seed: int = 0) -> list[list[int]]:
    """Give every block `channels` outlier channels at out_proj's input; returns them per block."""
    backbone = getattr(model, "backbone", model)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for layer in backbone.layers:
        mixer = layer.mixer
        idx = torch.randperm(mixer.D.shape[0], generator=generator)[:channels]
        mixer.D[idx] *= factor
        mixer.out_proj.weight[:, idx] /= factor
        chosen.append(sorted(idx.tolist()))
    return chosen


@torch.no_grad()
def reinit_like_mamba_ssm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw in_proj, x_proj and out_proj with PyTorch's default Linear init (as mamba_ssm does).

    HF's `_init_weights` draws every Linear from N(0, 0.1), about 7x wider than mamba_ssm's
    kaiming-uniform for d_inner=1536: x_proj's B and C then reach ~16 and the random 130m model's
    scan output ~6000, a dynamic range no trained model has. dt_proj, A and D keep HF's
    (mamba_ssm's) special initialisation.
    """
    generator = torch.Generator().manual_seed(seed)
    backbone = getattr(model, "backbone", model)
    for layer in backbone.layers:
        for linear in (layer.mixer.in_proj, layer.mixer.x_proj, layer.mixer.out_proj):
            bound = 1.0 / linear.in_features ** 0.5
            linear.weight.copy_(torch.empty_like(linear.weight).uniform_(-bound, bound, generator=generator))
    return model
