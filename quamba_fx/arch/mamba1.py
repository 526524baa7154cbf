"""Mamba-1 (`transformers` `MambaForCausalLM` / `MambaModel`, `config.model_type == "mamba"`).

A block is `layers.{i}` with an RMSNorm `norm` and a `mixer` holding `in_proj` (to x and the gate
z), a depthwise causal `conv1d` + SiLU, `x_proj` (to dt, B, C), `dt_proj`, the selective scan over
`A_log`/`D`, and `out_proj`; the residual adds around it. The W8A8 taps are the Quamba dataflow's
boundaries (see the shared dataflow note): everything between the RMSNorm and out_proj is int8 on
the wire; the residual stream, embeddings and lm_head stay float.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from transformers import MambaConfig, MambaForCausalLM, MambaModel

from .. import ops  # noqa: F401  (registers torch.ops.quamba.selective_scan, which the forward calls)
from .registry import register_arch
from .root import BackboneRoot
from .spec import ArchSpec, Tap, Topology
from .tracing import stage

__all__ = [
    "CONV_OUT", "DT_PROJ_OUT", "IN_PROJ_OUT", "MAMBA1", "NORM_OUT", "OUT_PROJ_IN", "W8A8_TAPS", "X_PROJ_OUT",
    "Mamba1Root",
]

NORM_OUT = Tap("norm", "output_scale", "output")
IN_PROJ_OUT = Tap("mixer.in_proj", "output_scale", "output")
CONV_OUT = Tap("mixer.conv1d", "output_scale", "activation")
X_PROJ_OUT = Tap("mixer.x_proj", "output_scale", "output")
DT_PROJ_OUT = Tap("mixer.dt_proj", "output_scale", "output")
OUT_PROJ_IN = Tap("mixer.out_proj", "input_scale", "input")
W8A8_TAPS = (NORM_OUT, IN_PROJ_OUT, CONV_OUT, X_PROJ_OUT, DT_PROJ_OUT, OUT_PROJ_IN)


class Mamba1Root(BackboneRoot):
    """A Mamba-1 model's submodules with a traceable forward (`arch.root`): the scan is one
    `torch.ops.quamba.selective_scan` node."""

    def __init__(self, model: nn.Module):
        super().__init__(model, MambaForCausalLM)

    def _block(self, layer: nn.Module, hidden, seq_len, i: int, path: str):
        mixer, m = layer.mixer, f"{path}.mixer"
        act_dtype = self.act_dtypes[i]
        with stage("norm", i, f"{path}.norm"):
            normed = layer.norm(hidden.to(act_dtype))
        with stage("in_proj", i, f"{m}.in_proj"):
            xz = mixer.in_proj(normed).transpose(1, 2)
            halves = xz.chunk(2, dim=1)
            x, z = halves[0], halves[1]
        with stage("conv1d", i, f"{m}.conv1d"):
            x = mixer.conv1d(x)[:, :, :seq_len]
            x = F.silu(x)
        with stage("x_proj", i, f"{m}.x_proj"):
            x_dbl = mixer.x_proj(x.transpose(1, 2))
            rank, n = mixer.time_step_rank, mixer.ssm_state_size
            parts = torch.split(x_dbl, [rank, n, n], dim=-1)
            dt, B, C = parts[0], parts[1], parts[2]
        with stage("dt_proj", i, f"{m}.dt_proj"):
            # The bias is applied here rather than inside the scan: softplus(W dt + b) either way.
            dt = mixer.dt_proj(dt).transpose(1, 2)
        with stage("scan", i, m):
            A = -torch.exp(mixer.A_log.float())
            y = torch.ops.quamba.selective_scan(
                x, dt, A, B.transpose(1, 2), C.transpose(1, 2), mixer.D.float(), z, None, True
            )
        with stage("out_proj", i, f"{m}.out_proj"):
            out = mixer.out_proj(y.transpose(1, 2).to(act_dtype))
        return self._residual(layer, hidden, out, i, path)


def weight_shapes(config: MambaConfig, prefix: str) -> dict[str, list[int]]:
    """The tensors of a Mamba-1 model of `config` whose blocks' parent is `prefix`, with their shapes."""
    hidden, inner, state = config.hidden_size, config.intermediate_size, config.state_size
    rank = config.time_step_rank
    shapes = {f"{prefix}embeddings.weight": [config.vocab_size, hidden], f"{prefix}norm_f.weight": [hidden]}
    for i in range(config.num_hidden_layers):
        block = f"{prefix}layers.{i}"
        shapes.update({
            f"{block}.norm.weight": [hidden],
            f"{block}.mixer.in_proj.weight": [2 * inner, hidden],
            f"{block}.mixer.conv1d.weight": [inner, 1, config.conv_kernel],
            f"{block}.mixer.x_proj.weight": [rank + 2 * state, inner],
            f"{block}.mixer.dt_proj.weight": [inner, rank],
            f"{block}.mixer.A_log": [inner, state],
            f"{block}.mixer.out_proj.weight": [hidden, inner],
        })
    return shapes


def cache_shapes(gm: torch.fx.GraphModule, block_path: str, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(conv_state, ssm_state)` shapes of a Mamba-1 block: `[B, D, W-1]` from the conv1d weight
    `[D, 1, W]`, and `[B, D, N]` from `A_log` `[D, N]`."""
    d_inner, _, width = gm.get_submodule(f"{block_path}.mixer.conv1d").weight.shape
    states = gm.get_submodule(f"{block_path}.mixer").A_log.shape[-1]
    return (batch_size, d_inner, width - 1), (batch_size, d_inner, states)


MAMBA1 = register_arch(ArchSpec(
    name="mamba1",
    title="Mamba-1",
    display_name="Mamba",
    model_type="mamba",
    config_class=MambaConfig,
    classes=(MambaForCausalLM, MambaModel),
    head_class=MambaForCausalLM,
    head_prefix="backbone.",
    blocks="layers",
    # Glue nodes (transpose, split, casts) take the role of the stage they serve, so a dump or a
    # pass can select a whole stage by role.
    roles=(
        "input", "embedding", "norm", "residual", "in_proj", "conv1d", "x_proj", "dt_proj", "scan",
        "out_proj", "norm_f", "lm_head", "output",
    ),
    modules=(
        ("norm", "norm"), ("in_proj", "mixer.in_proj"), ("conv1d", "mixer.conv1d"), ("x_proj", "mixer.x_proj"),
        ("dt_proj", "mixer.dt_proj"), ("scan", "mixer"), ("out_proj", "mixer.out_proj"), ("residual", ""),
    ),
    activations=("silu",),
    config_keys=(
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "state_size", "num_hidden_layers",
        "expand", "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias", "residual_in_fp32",
        "layer_norm_epsilon", "tie_word_embeddings", "hidden_act",
    ),
    positive_ints=(
        "vocab_size", "hidden_size", "intermediate_size", "state_size", "num_hidden_layers", "conv_kernel",
        "time_step_rank",
    ),
    positive_numbers=("layer_norm_epsilon",),
    # transformers 5.0's MambaConfig has no tie_word_embeddings attribute at all
    booleans=("use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings"),
    topology=Topology(
        conv="conv1d", producer="in_proj", consumer="x_proj",
        rules=("conv_never_feeds_conv", "one_conv_per_block", "producer", "consumers"),
    ),
    taps=W8A8_TAPS,
    # The scan output's outlier channels (Quamba, section 4).
    rotated="out_proj",
    scan_op="selective_scan",
    cache_shapes=cache_shapes,
    weight_shapes=weight_shapes,
    capture_root=Mamba1Root,
))
