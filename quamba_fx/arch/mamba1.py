"""Mamba-1 (`transformers` `MambaForCausalLM` / `MambaModel`, `config.model_type == "mamba"`).

A block is `layers.{i}` with an RMSNorm `norm` and a `mixer` holding `in_proj` (to x and the gate
z), a depthwise causal `conv1d` + SiLU, `x_proj` (to dt, B, C), `dt_proj`, the selective scan over
`A_log`/`D`, and `out_proj`; the residual adds around it. The W8A8 taps are the Quamba dataflow's
boundaries (see the shared dataflow note): everything between the RMSNorm and out_proj is int8 on
the wire; the residual stream, embeddings and lm_head stay float.
"""

from __future__ import annotations

from transformers import MambaForCausalLM, MambaModel

from .registry import register_arch
from .spec import ArchSpec, CacheLayout, Tap, Topology

__all__ = ["CONV_OUT", "DT_PROJ_OUT", "IN_PROJ_OUT", "MAMBA1", "NORM_OUT", "OUT_PROJ_IN", "W8A8_TAPS", "X_PROJ_OUT"]

NORM_OUT = Tap("norm", "output_scale", "output")
IN_PROJ_OUT = Tap("mixer.in_proj", "output_scale", "output")
CONV_OUT = Tap("mixer.conv1d", "output_scale", "activation")
X_PROJ_OUT = Tap("mixer.x_proj", "output_scale", "output")
DT_PROJ_OUT = Tap("mixer.dt_proj", "output_scale", "output")
OUT_PROJ_IN = Tap("mixer.out_proj", "input_scale", "input")
W8A8_TAPS = (NORM_OUT, IN_PROJ_OUT, CONV_OUT, X_PROJ_OUT, DT_PROJ_OUT, OUT_PROJ_IN)

MAMBA1 = register_arch(ArchSpec(
    name="mamba1",
    display_name="Mamba",
    model_type="mamba",
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
    topology=Topology(
        conv="conv1d", producer="in_proj", consumer="x_proj",
        rules=("conv_never_feeds_conv", "one_conv_per_block", "producer", "consumers"),
    ),
    taps=W8A8_TAPS,
    cache=CacheLayout(conv="conv1d", scan="scan", ssm_param="A_log"),
))
