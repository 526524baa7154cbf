"""Save and load captured (float, quantized or fused) graphs: safetensors weights plus a JSON recipe.

A checkpoint directory holds `config.json` (format version, library version, recipe, the source
model's Hugging Face config, dtype, the SHA-256 of the weights) and `model.safetensors` (int8
weights, every scale, the float parameters). No pickle: the graph is not stored but rebuilt, by
running the same passes on a meta-device copy of the source architecture, and the tensors are then
loaded into it strictly, so a missing or extra tensor is an error rather than a silent default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import MambaConfig, MambaForCausalLM, MambaModel

from .capture import annotate_shapes, capture
from .errors import CheckpointError
from .passes.fuse_conv import FuseConv1dSiLU
from .pipeline import Pipeline
from .recipe import block_paths, make_recipe
from .text import (
    CHECKPOINT_TOKENIZER_DIR, TextCodec, as_codec, attach_tokenizer, check_fits, save_tokenizer,
)
from .w8a8 import float_passes, quantization_passes

FORMAT_NAME = "quamba-fx"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _library_version() -> str:
    from . import __version__

    return __version__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unique_tensors(gm: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor (tied embeddings) once, and the aliases of the rest."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for key, tensor in gm.state_dict().items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if identity in first_key:
            aliases[key] = first_key[identity]
        else:
            first_key[identity] = key
            tensors[key] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def save_pretrained(gm: torch.fx.GraphModule, path: str | Path, *, tokenizer: Any = None) -> Path:
    """Write `gm` (from `capture`, `quantize` or `fuse`) to the directory `path`, atomically.

    Everything is written to a temporary sibling directory first and renamed into place, so an
    interrupted save leaves either the previous checkpoint or none, never half of one.
    `tokenizer` (anything `quamba_fx.text.as_codec` takes; default: the one the graph carries
    from `from_pretrained`) is copied into `path/tokenizer/`, so the checkpoint is self-contained.
    """
    meta = gm.meta.get("quamba")
    if not meta or "hf_config" not in meta:
        raise CheckpointError("save_pretrained needs a graph made by quamba_fx.capture (it has no capture metadata)")
    if meta.get("on_meta_device"):
        raise CheckpointError("this graph was captured on the meta device: it has no weights to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = _checkpoint_codec(gm, tokenizer)
    tensors, aliases = _unique_tensors(gm)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "recipe": meta.get("recipe"),
            "percentile": meta.get("percentile"),
            "fused": bool(meta.get("fused", False)),
            "source": meta["source"],
            "dtype": meta["dtype"],
            "example_shape": meta.get("example_shape", [1, 8]),
            "aliases": aliases,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
            "source_config": meta["hf_config"],
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        if codec is not None:
            save_tokenizer(codec, tmp / CHECKPOINT_TOKENIZER_DIR)
        backup = None
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, backup)
        os.replace(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _checkpoint_codec(gm: torch.fx.GraphModule, tokenizer: Any = None) -> TextCodec | None:
    """The tokenizer a checkpoint of `gm` keeps: `tokenizer`, else the graph's own; checked
    against the graph's vocabulary before anything is written."""
    tokenizer = tokenizer if tokenizer is not None else gm.meta["quamba"].get("tokenizer")
    if tokenizer is None:
        return None
    codec = as_codec(tokenizer)
    check_fits(codec, gm.meta["quamba"]["hf_config"].get("vocab_size"), "this graph")
    return codec


def is_quamba_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_pretrained` (not a Hugging Face checkpoint)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory written by save_pretrained")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} has no {CONFIG_FILE}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a quamba-fx checkpoint config")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in checkpoint format {version!r}, newer than this quamba-fx "
            f"({_library_version()}) reads (up to {FORMAT_VERSION}): upgrade quamba-fx"
        )
    missing = [k for k in ("source", "dtype", "source_config", "weights_sha256") if k not in config]
    if missing:
        raise CheckpointError(f"{path / CONFIG_FILE} lacks {', '.join(missing)}")
    return config


def _skeleton(config: dict[str, Any]) -> torch.fx.GraphModule:
    """The checkpoint's graph with the right structure and meta-device tensors."""
    hf_config = MambaConfig.from_dict(config["source_config"])
    cls = MambaModel if config["source"] == "MambaModel" else MambaForCausalLM
    dtype = getattr(torch, config["dtype"].replace("torch.", ""))
    with torch.device("meta"):
        model = cls(hf_config).to(dtype)
    gm = capture(model.eval(), propagate_shapes=False)
    recipe_name = config.get("recipe")
    if recipe_name is None:
        return gm
    recipe = make_recipe(recipe_name, **({"percentile": config["percentile"]} if config.get("percentile") else {}))
    keys = [f"{p}.{tap.module}.{tap.scale}" for p in block_paths(gm) for tap in recipe.taps]
    passes = float_passes(recipe) + quantization_passes(dict.fromkeys(keys, 1.0), recipe)
    if config.get("fused"):
        passes.append(FuseConv1dSiLU())
    gm = Pipeline(passes)(gm)
    gm.meta["quamba"].update(recipe=recipe_name, fused=bool(config.get("fused")))
    return gm


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.fx.GraphModule:
    """Load a graph written by `save_pretrained`; its logits equal the saved graph's bit for bit.

    Raises `CheckpointError` for a missing or malformed config, a config from a newer format, a
    truncated or modified weights file (checked against its recorded SHA-256), or missing tensors.
    """
    path = Path(path)
    config = _read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    if _sha256(weights) != config["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the SHA-256 recorded in {CONFIG_FILE}: it was modified or truncated")
    try:
        tensors = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {weights}: {exc}") from exc
    for alias, source in config.get("aliases", {}).items():
        if source not in tensors:
            raise CheckpointError(f"{weights} lacks {source} (aliased by {alias})")
        tensors[alias] = tensors[source]
    gm = _skeleton(config)
    try:
        gm.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the tensors in {weights} do not fit the graph its config describes: {exc}") from exc
    left = [name for name, t in [*gm.named_parameters(), *gm.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{weights} lacks tensors: {', '.join(left[:8])}")
    gm.meta["quamba"]["on_meta_device"] = False
    attach_tokenizer(gm, path)
    annotate_shapes(gm, tuple(config.get("example_shape", (1, 8))))
    return gm
