"""Where a recipe's taps sit in a captured graph (`block_paths`, `recipe_for_graph`, `tap_node`).

The recipes themselves (`Recipe`, `QuantSpec`, `Tap`, the registry and the built-in recipes)
live in `quamba_fx.recipes`; the names re-exported here keep `quamba_fx.recipe.make_recipe` and
`quamba_fx.recipe.Recipe` working.
"""

from __future__ import annotations

import torch.fx

from .arch import arch_named, arch_names, arch_of
from .errors import RecipeError
from .graph_info import is_kind, module_call, op_name
from .graph_meta import graph_meta
from .recipes import (
    CONV_OUT,
    DT_PROJ_OUT,
    IN_PROJ_OUT,
    NORM_OUT,
    OUT_PROJ_IN,
    W8A8_TAPS,
    X_PROJ_OUT,
    QuantSpec,
    Recipe,
    Tap,
    as_recipe,
    make_recipe,
    register_recipe,
)

__all__ = [
    "CONV_OUT", "DT_PROJ_OUT", "IN_PROJ_OUT", "NORM_OUT", "OUT_PROJ_IN", "W8A8_TAPS", "X_PROJ_OUT", "QuantSpec",
    "Recipe", "Tap", "as_recipe", "block_paths", "head_input_node", "head_node", "head_scale_key", "head_scale_path", "make_recipe", "recipe_for_graph",
    "register_recipe", "tap_node",
]


def block_paths(gm: torch.fx.GraphModule) -> list[str]:
    """Module path of every block: `backbone.layers.0`, ... (where the graph's architecture puts them)."""
    meta = graph_meta(gm)
    arch = arch_of(gm)
    return [arch.block_path(meta.prefix, b) for b in range(meta.num_blocks)]


def head_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The graph's call of its language-model head (the module labelled `lm_head` at capture), None
    for a graph without one."""
    return module_call(gm, "lm_head")


def head_path(gm: torch.fx.GraphModule) -> str | None:
    """Module path of the language-model head the graph calls (`lm_head`), None for a graph without one."""
    head = head_node(gm)
    return None if head is None else head.target


# The head's input scale buffer (on the head module) under a recipe with a `head` spec.
HEAD_INPUT_SCALE = "input_scale"


def head_scale_path(head: str) -> str:
    """The buffer path of the input scale of the head at module path `head`: `lm_head.input_scale`.
    The one spelling that calibration, the quantize pass and the flows share."""
    return f"{head}.{HEAD_INPUT_SCALE}"


def head_scale_key(gm: torch.fx.GraphModule, recipe: Recipe) -> str | None:
    """The buffer path of the head's input scale (`head_scale_path`) where `recipe` quantizes
    the head's input (`Recipe.head`) and the graph has a head; else None."""
    head = head_path(gm)
    return head_scale_path(head) if recipe.head is not None and head is not None else None


def head_input_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The value the LM head's input quantization reads: the head's input under any `.to(dtype)`
    casts (the capture's `norm_f(x).to(weight.dtype)`), so the quantize follows the final norm
    directly and fuses into its kernel, and the casts apply to the dequantized value, which
    `passes.quantize.fold_cast_into_dequantize` then folds; None for a graph without a head."""
    head = head_node(gm)
    if head is None:
        return None
    node = head.args[0]
    while (node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs
           and isinstance(node.args[0], torch.fx.Node) and isinstance(node.args[1], torch.dtype)):
        node = node.args[0]
    return node


def recipe_for_graph(gm: torch.fx.GraphModule, recipe: str | Recipe) -> Recipe:
    """`recipe` (a name or a `Recipe`) as it applies to `gm`'s architecture: its taps and weight
    modules on modules that the architecture's blocks have (the built-in recipes name Mamba-1's six; a Mamba-2 block
    has four of them), and its per-channel specs in place where the architecture takes them
    (`Recipe.with_channel_scales`). A tap on a module that no registered architecture has is a
    `RecipeError`, not dropped: it is a misspelt path."""
    recipe = as_recipe(recipe)
    known = {path for spec in map(arch_named, arch_names()) for _, path in spec.modules}
    unknown = [tap.key for tap in recipe.taps if tap.module not in known]
    unknown += [f"weights.modules: {m}" for m in recipe.weights.modules if m not in known]
    if unknown:
        raise RecipeError("taps", f"{', '.join(unknown)}: no registered architecture has such a module "
                                  f"(known: {', '.join(sorted(known - {''}))})")
    arch = arch_of(gm)
    recipe = recipe.restricted_to({path for _, path in arch.modules}).with_channel_scales(arch.channel_taps)
    misplaced = [tap.key for tap, spec in recipe.specs if spec.granularity == "per_channel"
                 and tap.key not in arch.channel_taps]
    if misplaced:
        where = ", ".join(arch.channel_taps) or "none"
        raise RecipeError("taps", f"{', '.join(misplaced)}: {arch.title} takes one scale per channel only at {where}; "
                                  "give the tap a per_tensor spec (or a per-channel one in channel_specs)")
    return recipe


def tap_node(gm: torch.fx.GraphModule, block_path: str, tap: Tap) -> torch.fx.Node:
    """The node whose value `tap` quantizes in the block at `block_path`."""
    target = f"{block_path}.{tap.module}"
    module_node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == target), None)
    if module_node is None:
        raise LookupError(f"no call of module {target} in the graph")
    if tap.at == "output":
        return module_node
    if tap.at == "input":
        return module_node.args[0]
    node = module_node
    while op_name(node) != "silu":
        followers = [u for u in node.users if is_kind(gm, u, "layout") or op_name(u) == "silu"]
        if len(followers) != 1:
            raise LookupError(f"no single SiLU after {target}")
        node = followers[0]
    return node
