"""Save and load captured (float, quantized or fused) graphs: safetensors weights plus a JSON recipe.

The format and saving live in `quamba_fx.checkpoint_format` (re-exported here). Loading validates
the directory before it builds anything, then rebuilds the graph by running the same flow on a
meta-device copy of the source architecture (`flows.quantized_structure`) and loads the tensors into
it strictly, so a missing or extra tensor is an error rather than a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import _atomic_dir
from .arch import DEFAULT_ARCH, arch_for_model_type, arch_named
from .capture import annotate_shapes, capture
from .checkpoint_format import (  # noqa: F401  (re-exported: the checkpoint API and its format constants)
    CONFIG_DIGEST_KEY,
    CONFIG_FILE,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_EXAMPLE_TOKENS,
    SAFETENSORS_DTYPES,
    SOURCES,
    WEIGHTS_FILE,
    _is_intact,
    _validated_config,
    is_quamba_checkpoint,
    save_pretrained,
)
from .errors import CheckpointError
from .flows import quantized_structure
from .graph_meta import graph_meta
from .tensor_checks import name_list, non_finite_tensors
from .text import attach_tokenizer


def _skeleton(config: dict[str, Any]) -> torch.fx.GraphModule:
    """The checkpoint's graph with the right structure and meta-device tensors."""
    arch = arch_for_model_type(config["source_config"].get("model_type")) or arch_named(DEFAULT_ARCH)
    hf_config = arch.config_class.from_dict(config["source_config"])
    cls = arch.class_named(config["source"])
    dtype = getattr(torch, config["dtype"])
    with torch.device("meta"):
        model = cls(hf_config).to(dtype)
    _tie_as_saved(model, config["aliases"])
    gm = capture(model.eval(), propagate_shapes=False)
    if config["recipe"] is None:
        return gm
    return quantized_structure(gm, config["recipe"], fused=bool(config.get("fused")))


def _tie_as_saved(model: torch.nn.Module, aliases: dict[str, str]) -> None:
    """Share the parameters the checkpoint stored once (its `aliases`) in the float model the
    skeleton starts from. Quantization decides by that sharing whether a W8A8 head and the
    embedding get one int8 table, and whether transformers ties a model built on the meta device
    depends on its version (5.0 does not)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, source in aliases.items():
        if alias in params and source in params and params[alias] is not params[source]:
            owner, _, name = alias.rpartition(".")
            setattr(model.get_submodule(owner), name, params[source])


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.fx.GraphModule:
    """Load a graph written by `save_pretrained`; its logits equal the saved graph's bit for bit.

    Raises `CheckpointError` (one line, naming the file) for a missing or malformed config, a config
    from a newer format, an edited config or weights file (checked against the SHA-256 each file
    records of the other), an architecture that does not match the stored tensors, missing tensors
    or non-finite values. A save of `path` that was killed half way is put right first.
    """
    path = Path(path)
    _atomic_dir.recover_if_needed(path, _is_intact)
    return _atomic_dir.read_consistently(path, lambda: _load(path, device))


def _load(path: Path, device: str | torch.device) -> torch.fx.GraphModule:
    config = _validated_config(path)
    weights = path / WEIGHTS_FILE
    try:
        tensors = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {weights}: {exc}") from exc
    bad = non_finite_tensors(tensors.items())
    if bad:
        raise CheckpointError(f"{weights} holds NaN or infinite values in {name_list(bad)}")
    for alias, source in config["aliases"].items():
        tensors[alias] = tensors[source]
    try:
        gm = _skeleton(config)
    except Exception as exc:  # what the config describes could not be built; never a raw traceback
        message = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path / CONFIG_FILE} describes a graph that cannot be rebuilt ({type(exc).__name__}: {message})") from exc
    try:
        gm.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        message = " ".join(str(exc).split())
        raise CheckpointError(f"the tensors in {weights} do not fit the graph its config describes: {message}") from exc
    left = [name for name, t in [*gm.named_parameters(), *gm.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{weights} lacks tensors: {', '.join(left[:8])}")
    graph_meta(gm).on_meta_device = False
    attach_tokenizer(gm, path)
    annotate_shapes(gm, tuple(config["example_shape"]))
    return gm
