"""Mamba-2 (`transformers` `Mamba2ForCausalLM` / `Mamba2Model`, `config.model_type == "mamba2"`).

A block is `layers.{i}` with an RMSNorm `norm` and a `mixer` whose one `in_proj` makes the gate z,
xBC (the conv1d's input: x, then B and C for every group) and dt per head; a depthwise causal
`conv1d` + SiLU over xBC; the SSD scan over `A_log`/`D`/`dt_bias` (heads of `head_dim` channels,
B and C shared by the heads of a group); the gated RMSNorm `mixer.norm` (`norm(y * silu(z))`, per
group); and `out_proj`. Unlike Mamba-1 there is no x_proj or dt_proj: the conv1d feeds the scan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mamba2Config, Mamba2ForCausalLM, Mamba2Model

from .. import ops  # noqa: F401  (registers torch.ops.quamba.ssd_scan, which the forward calls)
from ..errors import UnsupportedModelError
from ..graph_meta import graph_meta
from .registry import register_arch
from .root import BackboneRoot
from .spec import ArchSpec, Topology
from .tracing import stage

__all__ = ["MAMBA2", "Mamba2Root"]


def _widths(config: Mamba2Config) -> tuple[int, int, int]:
    """(d_inner, conv_dim, heads) of a block: in_proj's output is z | xBC | dt of these widths."""
    d_inner = int(config.expand * config.hidden_size)
    return d_inner, d_inner + 2 * config.n_groups * config.state_size, config.num_heads


class Mamba2Root(BackboneRoot):
    """A Mamba-2 model's submodules with a traceable forward (`arch.root`): the scan is one
    `torch.ops.quamba.ssd_scan` node. The gated RMSNorm stays one module call, so it computes
    whatever the installed transformers computes (5.0 normalises over all of d_inner, later
    releases per group; the same when n_groups is 1).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model, Mamba2ForCausalLM)
        config = self.config
        # Plain Python values, read before tracing (the tracer would turn tensor attributes into nodes).
        self.d_inner, self.conv_dim, self.heads = _widths(config)
        self.head_dim, self.groups, self.state = config.head_dim, config.n_groups, config.state_size
        self.chunk_size = int(config.chunk_size)
        self.dt_min, self.dt_max = (float(v) for v in config.time_step_limit)
        wanted = self.d_inner + self.conv_dim + self.heads
        for i, layer in enumerate(self.block_modules()):
            # transformers 5.0 also accepted an in_proj with extra "MLP" columns, which no published
            # Mamba-2 checkpoint has and later releases dropped.
            if layer.mixer.in_proj.out_features != wanted:
                raise UnsupportedModelError(
                    f"Mamba-2 block {i}: in_proj makes {layer.mixer.in_proj.out_features} features, expected "
                    f"{wanted} (z {self.d_inner} + xBC {self.conv_dim} + dt {self.heads})")

    def _block(self, layer: nn.Module, hidden, seq_len, i: int, path: str):
        mixer, m = layer.mixer, f"{path}.mixer"
        act_dtype = self.act_dtypes[i]
        with stage("norm", i, f"{path}.norm"):
            normed = layer.norm(hidden.to(act_dtype))
        with stage("in_proj", i, f"{m}.in_proj"):
            parts = torch.split(mixer.in_proj(normed), [self.d_inner, self.conv_dim, self.heads], dim=-1)
            z, xbc, dt = parts[0], parts[1], parts[2]
        with stage("conv1d", i, f"{m}.conv1d"):
            xbc = mixer.conv1d(xbc.transpose(1, 2))[:, :, :seq_len]
            xbc = F.silu(xbc)
        with stage("scan", i, m):
            n = self.groups * self.state
            parts = torch.split(xbc.transpose(1, 2), [self.d_inner, n, n], dim=-1)
            x, B, C = parts[0], parts[1], parts[2]
            A = -torch.exp(mixer.A_log.float())
            y = torch.ops.quamba.ssd_scan(
                x.unflatten(-1, (self.heads, self.head_dim)), dt, A, B.unflatten(-1, (self.groups, self.state)),
                C.unflatten(-1, (self.groups, self.state)), mixer.D, mixer.dt_bias, True, self.dt_min, self.dt_max,
                self.chunk_size,
            )
            y = y.flatten(-2)
        with stage("gate_norm", i, f"{m}.norm"):
            y = mixer.norm(y, z)
        with stage("out_proj", i, f"{m}.out_proj"):
            out = mixer.out_proj(y.to(act_dtype))
        return self._residual(layer, hidden, out, i, path)


def weight_shapes(config: Mamba2Config, prefix: str) -> dict[str, list[int]]:
    """The tensors of a Mamba-2 model of `config` whose blocks' parent is `prefix`, with their shapes."""
    hidden = config.hidden_size
    d_inner, conv_dim, heads = _widths(config)
    shapes = {f"{prefix}embeddings.weight": [config.vocab_size, hidden], f"{prefix}norm_f.weight": [hidden]}
    for i in range(config.num_hidden_layers):
        block = f"{prefix}layers.{i}"
        shapes.update({
            f"{block}.norm.weight": [hidden],
            f"{block}.mixer.in_proj.weight": [d_inner + conv_dim + heads, hidden],
            f"{block}.mixer.conv1d.weight": [conv_dim, 1, config.conv_kernel],
            f"{block}.mixer.dt_bias": [heads],
            f"{block}.mixer.A_log": [heads],
            f"{block}.mixer.D": [heads],
            f"{block}.mixer.norm.weight": [d_inner],
            f"{block}.mixer.out_proj.weight": [hidden, d_inner],
        })
    return shapes


def cache_shapes(gm: torch.fx.GraphModule, block_path: str, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(conv_state, ssm_state)` shapes of a Mamba-2 block: `[B, conv_dim, W-1]` and
    `[B, heads, head_dim, state]`."""
    conv_dim, _, width = gm.get_submodule(f"{block_path}.mixer.conv1d").weight.shape
    config = graph_meta(gm).config
    return (batch_size, conv_dim, width - 1), (batch_size, config["num_heads"], config["head_dim"], config["state_size"])


def channel_layout(gm: torch.fx.GraphModule, block_path: str, tap) -> tuple[int, int, tuple[tuple[int, int, int], ...]]:
    """The conv1d output's channels (`[B, conv_dim, L]`: axis 1, conv_dim of them) as the scan reads
    them: x's `d_inner` each with its own scale, then B's and C's a state group at a time (a group's
    scale factors out of `C B^T`; one per state would not)."""
    config = graph_meta(gm).config
    d_inner = int(config["expand"] * config["hidden_size"])
    width, state = config["n_groups"] * config["state_size"], config["state_size"]
    return 1, d_inner + 2 * width, ((d_inner, d_inner + width, state), (d_inner + width, d_inner + 2 * width, state))


MAMBA2 = register_arch(ArchSpec(
    name="mamba2",
    title="Mamba-2",
    display_name="Mamba2",
    model_type="mamba2",
    config_class=Mamba2Config,
    classes=(Mamba2ForCausalLM, Mamba2Model),
    head_class=Mamba2ForCausalLM,
    head_prefix="backbone.",
    blocks="layers",
    roles=(
        "input", "embedding", "norm", "residual", "in_proj", "conv1d", "scan", "gate_norm", "out_proj", "norm_f",
        "lm_head", "output",
    ),
    modules=(
        ("norm", "norm"), ("in_proj", "mixer.in_proj"), ("conv1d", "mixer.conv1d"), ("scan", "mixer"),
        ("gate_norm", "mixer.norm"), ("out_proj", "mixer.out_proj"), ("residual", ""),
    ),
    activations=("silu",),
    config_keys=(
        "model_type", "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
        "num_heads", "head_dim", "n_groups", "chunk_size", "time_step_limit", "use_bias", "use_conv_bias",
        "residual_in_fp32", "layer_norm_epsilon", "tie_word_embeddings", "hidden_act",
    ),
    positive_ints=(
        "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "conv_kernel", "num_heads", "head_dim",
        "n_groups", "chunk_size",
    ),
    positive_numbers=("layer_norm_epsilon",),
    booleans=("use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings"),
    # in_proj -> conv1d -> the scan: the conv1d's output feeds no Linear.
    topology=Topology(
        conv="conv1d", producer="in_proj", consumer="scan",
        rules=("conv_never_feeds_conv", "one_conv_per_block", "producer", "feeds_scan"),
    ),
    # The recipes' taps are Mamba-1's; those on modules a Mamba-2 block has apply (`Recipe.restricted_to`).
    taps=(),
    rotated="out_proj",
    scan_op="ssd_scan",
    cache_shapes=cache_shapes,
    weight_shapes=weight_shapes,
    capture_root=Mamba2Root,
    # The conv1d output feeds the scan alone (Mamba-1's feeds x_proj's GEMM, which needs one scale).
    channel_taps=("mixer.conv1d.output_scale",),
    channel_layout=channel_layout,
))
