"""The checkpoint directory: its format, writing it (`save_pretrained`) and validating it on disk.

A checkpoint directory holds `config.json` (format version, library version, the whole recipe as
`Recipe.to_dict()` writes it, the source model's Hugging Face config, dtype, the SHA-256 of the
weights) and `model.safetensors` (int8 weights, every scale, the float parameters; its metadata
records the SHA-256 of the config, so an edit of either file is caught). No pickle: the graph is not
stored; `quamba_fx.checkpoint.from_pretrained` rebuilds it from the config and loads the tensors.

Validation (`_validated_config`) checks the config's fields (types and ranges, the recipe through
`Recipe.from_dict`), the architecture against the tensor names and shapes in the safetensors header,
then both hashes. Format 1 (before recipes were data) stored only the recipe's name and percentile;
`_format_1_recipe` still reads it. Saving goes through `_atomic_dir`: written aside, swapped in
under a lock, recoverable if killed.

This module knows nothing of capture or the passes (capture's `MambaGraphModule.save_pretrained`
calls it), so it sits below them; loading, which runs them, is `quamba_fx.checkpoint`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import _atomic_dir
from ._version import __version__
from .arch import arch_for_class_name, arch_named, arch_names
from .errors import CheckpointError, RecipeError
from .graph_meta import find_graph_meta, graph_meta
from .quant.int4 import packed_columns
from .recipes import CONV_OUT, W8A8_TAPS, QuantSpec, Recipe
from .tensor_checks import name_list, non_finite_tensors
from .text import CHECKPOINT_TOKENIZER_DIR, TextCodec, as_codec, check_fits, save_tokenizer

FORMAT_NAME = "quamba-fx"
# 2: the recipe is stored whole (`Recipe.to_dict()`); 1: by name and percentile only.
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Key of the safetensors metadata entry holding the config's digest (absent in checkpoints written
# before it existed, which load with the weights hash alone).
CONFIG_DIGEST_KEY = "quamba_fx_config_sha256"
# The model classes a checkpoint may record as its source: those of every registered architecture.
SOURCES = tuple(name for spec in map(arch_named, arch_names()) for name in spec.class_names)
DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_EXAMPLE_TOKENS = 1 << 24  # a shape annotation, never allocated; bounded so a typo stands out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of the config as canonical JSON, without `weights_sha256` (which hashes the weights
    file, and so the digest stored in it)."""
    body = {key: value for key, value in config.items() if key != "weights_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _has_our_config(path: Path) -> bool:
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def _check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty directory or (with `overwrite`) our own checkpoint."""
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link; refusing to replace it: save to the directory it points to")
    if not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; refusing to replace it: choose another path")
    if not any(path.iterdir()):
        return
    if not _has_our_config(path):
        raise CheckpointError(
            f"{path} exists and is not a quamba-fx checkpoint (no {CONFIG_FILE} of ours); "
            "refusing to replace it: choose another path or empty it"
        )
    if not overwrite:
        raise CheckpointError(f"{path} already holds a quamba-fx checkpoint; pass overwrite=True (command line: --overwrite) to replace it")


def _missing_ancestors(directory: Path) -> list[Path]:
    missing = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def save_pretrained(gm: torch.fx.GraphModule, path: str | Path, overwrite: bool = True, *, tokenizer: Any = None) -> Path:
    """Write `gm` (from `capture`, `quantize` or `fuse`) to the directory `path`, atomically.

    `path` may be missing, an empty directory, or (when `overwrite`) a quamba-fx checkpoint; anything
    else (a file, another directory) raises `CheckpointError` and is left untouched. The files are
    written to a hidden sibling and swapped in under a lock, so readers and concurrent writers see
    either the previous checkpoint or the new one; a save killed half way is put right by the next
    save or load of `path`. Non-finite weights, or a place that can't be written, raise
    `CheckpointError` and leave nothing behind. `tokenizer` (anything `quamba_fx.text.as_codec`
    takes; default: the one the graph carries) is copied into `path/tokenizer/`, its files hashed in
    the config, so the checkpoint is self-contained.
    """
    meta = find_graph_meta(gm)
    if meta is None or meta.hf_config is None:
        raise CheckpointError("save_pretrained needs a graph made by quamba_fx.capture (it has no capture metadata)")
    if meta.on_meta_device:
        raise CheckpointError("this graph was captured on the meta device: it has no weights to save")
    recipe = meta.recipe_spec
    if meta.recipe is not None and not isinstance(recipe, Recipe):
        raise CheckpointError(
            f"this graph says it was quantized with recipe {meta.recipe!r} but carries no Recipe "
            "(graph_meta(gm).recipe_spec): quantize it with quamba_fx.quantize"
        )
    path = Path(path)
    codec = _checkpoint_codec(gm, tokenizer)
    tensors, aliases = _unique_tensors(gm)
    bad = non_finite_tensors(tensors.items())
    if bad:
        raise CheckpointError(f"not saving {path}: NaN or infinite values in {name_list(bad)}; nothing was written")
    # Through JSON and back, so the digest is computed over exactly what a loader will read.
    config = json.loads(json.dumps({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "fused": bool(meta.fused),
        "source": meta.source,
        "dtype": meta.dtype,
        "example_shape": meta.example_shape if meta.example_shape is not None else [1, 8],
        "aliases": aliases,
        "source_config": meta.hf_config,
    }))
    created = _missing_ancestors(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_dir.replacing(path, functools.partial(_check_replaceable, overwrite=overwrite), _is_intact) as staging:
            if codec is not None:
                # First, so its files' hashes are part of the config the weights' metadata hashes.
                save_tokenizer(codec, staging / CHECKPOINT_TOKENIZER_DIR)
                config["tokenizer_sha256"] = _tokenizer_hashes(staging)
            save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt", CONFIG_DIGEST_KEY: _config_digest(config)})
            _atomic_dir.crash_point("weights-written")
            config["weights_sha256"] = _sha256(staging / WEIGHTS_FILE)
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    except BaseException as exc:
        for directory in created:
            try:
                os.rmdir(directory)
            except OSError:
                break
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            reason = exc.strerror or str(exc)
            where = f" ({exc.filename})" if exc.filename else ""
            raise CheckpointError(f"cannot write a checkpoint to {path}: {reason}{where}") from exc
        raise
    return path


def _checkpoint_codec(gm: torch.fx.GraphModule, tokenizer: Any = None) -> TextCodec | None:
    """The tokenizer a checkpoint of `gm` keeps: `tokenizer`, else the graph's own; checked
    against the graph's vocabulary before anything is written."""
    meta = graph_meta(gm)
    tokenizer = tokenizer if tokenizer is not None else meta.tokenizer
    if tokenizer is None:
        return None
    codec = as_codec(tokenizer)
    check_fits(codec, meta.hf_config.get("vocab_size"), "this graph")
    return codec


def _tokenizer_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every file in the checkpoint's tokenizer folder, by name (empty if it has none)."""
    folder = path / CHECKPOINT_TOKENIZER_DIR
    if not folder.is_dir():
        return {}
    return {entry.name: _sha256(entry) for entry in sorted(folder.iterdir()) if entry.is_file()}


def is_quamba_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_pretrained` (not a Hugging Face checkpoint).

    Like `from_pretrained`, it first puts right a save of `path` that was killed half way.
    """
    path = Path(path)
    _atomic_dir.recover_if_needed(path, _is_intact)
    return _has_our_config(path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_error(where: Path, field: str, expected: str, value: Any) -> CheckpointError:
    return CheckpointError(
        f"{where}: {field} must be {expected}, got {_short(value)}; the file was edited or damaged: save the model again"
    )


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int in Python, and a format version is never True


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    """The config of the checkpoint at `path`, its top-level fields checked for type and range and
    the optional ones filled in, and the digest of the config as it was read."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory written by save_pretrained")
    where = path / CONFIG_FILE
    try:
        config = json.loads(where.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} has no {CONFIG_FILE}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {where}: {exc.strerror or exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where} is not a quamba-fx checkpoint config")
    version = config.get("format_version")
    if not _is_int(version) or version < 1:
        raise _field_error(where, "format_version", "a positive integer", version)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in checkpoint format {version!r}, newer than this quamba-fx "
            f"({__version__}) reads (up to {FORMAT_VERSION}): upgrade quamba-fx"
        )
    missing = [k for k in ("source", "dtype", "source_config", "weights_sha256") if k not in config]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}")
    digest = _config_digest(config)
    config.setdefault("recipe", None)
    config.setdefault("fused", False)
    config.setdefault("example_shape", [1, 8])
    config.setdefault("aliases", {})
    config.setdefault("tokenizer_sha256", None)
    checks = {
        "source": (config["source"] in SOURCES, f"one of {', '.join(SOURCES)}"),
        "dtype": (isinstance(config["dtype"], str) and config["dtype"].replace("torch.", "") in DTYPES,
                  f"one of {', '.join(DTYPES)}"),
        "fused": (type(config["fused"]) is bool and not (config["fused"] and config["recipe"] is None),
                  "a boolean, true only with a recipe"),
        "example_shape": (isinstance(config["example_shape"], list) and len(config["example_shape"]) == 2
                          and all(_is_int(d) and d >= 1 for d in config["example_shape"])
                          and math.prod(config["example_shape"]) <= MAX_EXAMPLE_TOKENS,
                          f"[batch, seq_len] of positive integers with batch * seq_len <= {MAX_EXAMPLE_TOKENS}"),
        "aliases": (isinstance(config["aliases"], dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in config["aliases"].items()),
                    "an object mapping tensor names to tensor names"),
        "weights_sha256": (isinstance(config["weights_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", config["weights_sha256"]),
                           "64 lowercase hex digits"),
        "source_config": (isinstance(config["source_config"], dict), "an object (a Hugging Face model config)"),
        "tokenizer_sha256": (config["tokenizer_sha256"] is None or (
            isinstance(config["tokenizer_sha256"], dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in config["tokenizer_sha256"].items())),
            "null or an object mapping tokenizer file names to SHA-256 digests"),
    }
    for field, (ok, expected) in checks.items():
        if not ok:
            raise _field_error(where, field, expected, config[field])
    config["recipe"] = _format_1_recipe(config, where) if version == 1 else _stored_recipe(config["recipe"], where)
    config["dtype"] = config["dtype"].replace("torch.", "")
    return config, digest


def _stored_recipe(data: Any, where: Path) -> Recipe | None:
    """The recipe a format-2 config stores (null for a float graph), every field checked."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise _field_error(where, "recipe", "null or an object (a recipe as Recipe.to_dict() writes it)", data)
    try:
        return Recipe.from_dict(data)
    except RecipeError as exc:
        raise CheckpointError(
            f"{where}: recipe.{exc.field}: {exc.problem}; the file was edited or damaged: save the model again"
        ) from exc


# The recipes format 1 named, as they were when it was current. Pinned here rather than taken from
# the registry, so that a later change to a built-in recipe never changes how an old checkpoint loads.
_FORMAT_1_ABS_MAX = QuantSpec(observer="abs_max")
_FORMAT_1_RECIPES = ("naive", "quamba")
_FORMAT_1_DEFAULT_PERCENTILE = 99.999


def _format_1_recipe(config: dict[str, Any], where: Path) -> Recipe | None:
    """The recipe a format-1 config names by `recipe` (null, "naive" or "quamba") and `percentile`
    (null, or the percentile of quamba's conv1d output)."""
    name, percentile = config["recipe"], config.get("percentile")
    if not (name is None or name in _FORMAT_1_RECIPES):
        raise _field_error(where, "recipe", f"null or one of {', '.join(_FORMAT_1_RECIPES)}", name)
    if not (percentile is None or (_is_number(percentile) and 0 < percentile <= 100)):
        raise _field_error(where, "percentile", "null or a number in (0, 100]", percentile)
    if name is None:
        return None
    specs = {tap: _FORMAT_1_ABS_MAX for tap in W8A8_TAPS}
    if name == "naive":
        return Recipe("naive", hadamard=False, specs=specs)
    # Format 1 wrote the percentile of every quamba checkpoint; null only ever meant the default.
    specs[CONV_OUT] = QuantSpec(observer="percentile", observer_args={
        "percentile": percentile or _FORMAT_1_DEFAULT_PERCENTILE, "bins": 4096})
    return Recipe("quamba", hadamard=True, specs=specs)


def _read_header(weights: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """(name -> (dtype, shape)) of every tensor in the safetensors header, and its metadata."""
    try:
        with safe_open(weights, framework="pt") as handle:
            header = {}
            for name in handle.keys():
                tensor = handle.get_slice(name)
                header[name] = (tensor.get_dtype(), list(tensor.get_shape()))
            return header, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {weights}: {exc}") from exc


def _hf_config(config: dict[str, Any], where: Path) -> Any:
    """The source model's config (the source architecture's config class), its architecture fields
    checked for type and range."""
    arch = arch_for_class_name(config["source"])
    config_class = arch.config_class.__name__
    try:
        hf_config = arch.config_class.from_dict(config["source_config"])
    except Exception as exc:  # transformers validates with errors of its own choosing
        message = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{where}: source_config is not a valid {config_class} ({type(exc).__name__}: {message})") from exc
    for key in arch.positive_ints:
        value = getattr(hf_config, key, None)
        if not _is_int(value) or value < 1:
            raise _field_error(where, f"source_config.{key}", "a positive integer", value)
    for key in arch.booleans:
        # a config class may lack a field in some transformers release: checked where present
        if hasattr(hf_config, key) and type(getattr(hf_config, key)) is not bool:
            raise _field_error(where, f"source_config.{key}", "a boolean", getattr(hf_config, key))
    for key in arch.positive_numbers:
        value = getattr(hf_config, key, None)
        if not (_is_number(value) and value > 0):
            raise _field_error(where, f"source_config.{key}", "a positive number", value)
    if getattr(hf_config, "hidden_act", None) not in arch.activations:
        raise _field_error(where, "source_config.hidden_act", " or ".join(repr(a) for a in arch.activations),
                           getattr(hf_config, "hidden_act", None))
    return hf_config


def _check_layer_count(config: dict[str, Any], header: dict, path: Path) -> None:
    """Compare the config's layer count with the layers in the weights file, before transformers
    sees the config: building the HF config allocates per layer, so 10**12 layers must stop here."""
    where, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    count = config["source_config"].get("num_hidden_layers")
    if not _is_int(count) or count < 1:
        raise _field_error(where, "source_config.num_hidden_layers", "a positive integer", count)
    arch = arch_for_class_name(config["source"])
    prefix = arch.prefix(config["source"])
    layers = {i for name in header if (i := arch.block_index(prefix, name)) is not None}
    if len(layers) != count or max(layers, default=-1) != count - 1:  # never range(count): it may be 10**12
        raise CheckpointError(
            f"{where}: source_config.num_hidden_layers is {count} but {weights} holds layers "
            f"{name_list([str(i) for i in sorted(layers)])}: the files do not belong together"
        )


def _check_architecture(config: dict[str, Any], hf_config: Any, header: dict, path: Path) -> None:
    """Compare the architecture the config describes with the tensors the weights file holds."""
    where, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    arch = arch_for_class_name(config["source"])
    prefix = arch.prefix(config["source"])
    for alias, source in config["aliases"].items():
        if source not in header or alias in header:
            raise CheckpointError(f"{where}: alias {alias} -> {source} does not match the tensors in {weights}")
    expected = arch.weight_shapes(hf_config, prefix)
    recipe = config["recipe"]
    packs_embedding = recipe is not None and recipe.weights.embedding_and_head
    if recipe is not None and recipe.weights.bits == 4:  # two 4-bit codes a byte along K
        packed = tuple(f".{module}.weight" for module in recipe.weights.modules)
        packed += (f"{prefix}embeddings.weight",) if packs_embedding else ()
        expected = {name: [shape[0], packed_columns(shape[1])] if name.endswith(packed) else shape
                    for name, shape in expected.items()}
    for name, shape in expected.items():
        stored = header.get(config["aliases"].get(name, name))
        if stored is None:
            raise CheckpointError(f"{weights} lacks {name}, which the architecture in {CONFIG_FILE} needs")
        if stored[1] != shape:
            raise CheckpointError(f"{weights}: {name} has shape {stored[1]} but {where} describes {shape}")
    # The dtype shows in a float table: the embedding's, or where it is quantized (4-bit, or int8
    # sharing a W8A8 head's table), the final norm's.
    embedding = f"{prefix}embeddings.weight"
    quantized_embedding = packs_embedding or header[config["aliases"].get(embedding, embedding)][0] == "I8"
    float_table = f"{prefix}norm_f.weight" if quantized_embedding else embedding
    stored_dtype = header[float_table][0]
    if stored_dtype != SAFETENSORS_DTYPES[config["dtype"]]:
        raise CheckpointError(f"{where}: dtype is {config['dtype']} but {weights} holds {stored_dtype} weights")


def _validated_config(path: Path) -> dict[str, Any]:
    """The config of the checkpoint at `path` once every check that needs no graph has passed."""
    config, digest = _read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    if _sha256(weights) != config["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the SHA-256 recorded in {CONFIG_FILE}: it was modified or truncated")
    header, metadata = _read_header(weights)
    _check_layer_count(config, header, path)
    hf_config = _hf_config(config, path / CONFIG_FILE)
    recorded = metadata.get(CONFIG_DIGEST_KEY)
    if recorded is not None and recorded != digest:
        raise CheckpointError(
            f"{path / CONFIG_FILE} does not match the SHA-256 recorded in {WEIGHTS_FILE}: it was edited after saving; "
            "save the model again"
        )
    _check_architecture(config, hf_config, header, path)
    # Checkpoints from before tokenizers were kept record none; the tokenizer, if any, is then
    # read as it is.
    if config["tokenizer_sha256"] is not None and _tokenizer_hashes(path) != config["tokenizer_sha256"]:
        raise CheckpointError(
            f"{path / CHECKPOINT_TOKENIZER_DIR} does not match the SHA-256s recorded in {CONFIG_FILE}: "
            "a tokenizer file was edited, added or removed; save the model again"
        )
    return config


def _is_intact(path: Path) -> bool:
    """Whether `path` is a complete, unmodified checkpoint (what recovery may put back in place)."""
    try:
        _validated_config(path)
    except CheckpointError:
        return False
    return True
