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
