"""Where models come from: built-in configs with seeded random weights, local checkpoints, live objects.

The Hugging Face Hub is never contacted. The built-in names carry the published state-spaces Mamba-1
and Mamba-2 shapes, so capture, dump and benchmarks see real architectures even without their weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import Mamba2Config, MambaConfig, PretrainedConfig

from .arch import arch_for_model, arch_for_model_type, arch_named, arch_names
from .catalog import BUILTIN_SHAPES, DEFAULT_MODEL, PACKAGED_MODELS, BuiltinShape  # noqa: F401  (re-exported)
from .errors import CheckpointError, UnsupportedModelError


def builtin_config(name: str) -> PretrainedConfig:
    """The config (`MambaConfig`, or `Mamba2Config` for `mamba2-*`) of a built-in model name (see
    `BUILTIN_SHAPES`)."""
    if name not in BUILTIN_SHAPES:
        raise UnsupportedModelError(
            f"unknown built-in model {name!r}; built-in names are: {', '.join(BUILTIN_SHAPES)}"
        )
    shape = BUILTIN_SHAPES[name]
    common = dict(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                  state_size=shape.state_size, expand=2, conv_kernel=4, residual_in_fp32=True,
                  tie_word_embeddings=True, use_cache=False)
    if shape.arch == "mamba2":
        return Mamba2Config(num_heads=2 * shape.hidden_size // shape.head_dim, head_dim=shape.head_dim, n_groups=1,
                            chunk_size=shape.chunk_size, **common)
    return MambaConfig(**common)


def random_model(config: PretrainedConfig, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """The causal LM of `config`'s architecture (`MambaForCausalLM`, `Mamba2ForCausalLM`) with HF's
    initialisation under `torch.manual_seed(seed)`.

    On `device="meta"` no memory is allocated: the model has shapes only, enough to capture and dump.
    """
    arch = arch_for_model_type(getattr(config, "model_type", None))
    if arch is None:
        raise UnsupportedModelError(f"random_model needs a Mamba or Mamba2 config, got {type(config).__name__}")
    with torch.device(device):
        torch.manual_seed(seed)
        model = arch.head_class(config)
    return model.eval()


def load_model(
    source: str | Path | nn.Module, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Resolve a model source to an eval-mode `transformers` Mamba model.

    `source` is a live `MambaForCausalLM`/`MambaModel` (returned as is), a directory written by
    `save_pretrained`, a packaged trained model (`mamba-bytes-wt2`: byte-level, trained on
    WikiText-2), or a built-in name (`mamba-tiny`, `mamba-130m`, ... `mamba-2.8b`) that gets seeded
    random weights. `device="meta"` builds built-in models without allocating weights. Checkpoints
    are loaded in `dtype` (default fp32, whatever they were saved in: capture bakes the dtype in).
    """
    if isinstance(source, nn.Module):
        if arch_for_model(source) is None:
            accepted = [name for spec in map(arch_named, arch_names()) for name in spec.class_names]
            raise UnsupportedModelError(
                f"expected a transformers {' or '.join(accepted)}, got {type(source).__name__}"
            )
        return source
    text = str(source)
    if text in PACKAGED_MODELS:
        if not PACKAGED_MODELS[text].is_dir():
            raise CheckpointError(f"the packaged model {text} is missing from this installation ({PACKAGED_MODELS[text]})")
        return _load_checkpoint_dir(PACKAGED_MODELS[text], "cpu" if device == "meta" else device, dtype)
    if text in BUILTIN_SHAPES:
        return random_model(builtin_config(text), seed=seed, device=device)
    path = Path(text)
    if not path.exists():
        names = ", ".join([*PACKAGED_MODELS, *BUILTIN_SHAPES])
        raise CheckpointError(f"{text!r} is neither a built-in model ({names}) nor an existing directory")
    return _load_checkpoint_dir(path, device, dtype)


def _load_checkpoint_dir(path: Path, device: str, dtype: torch.dtype) -> nn.Module:
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a model directory written by save_pretrained")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a save_pretrained directory?")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    arch = arch_for_model_type(model_type)
    if arch is None:
        known = ", ".join(f"{spec.model_type!r} ({spec.title})" for spec in map(arch_named, arch_names()))
        raise UnsupportedModelError(f"{config_file} describes model_type={model_type!r}; quamba-fx supports {known} models")
    weight_files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weight_files:
        raise CheckpointError(f"{path} has a config.json but no weight file (*.safetensors or *.bin)")
    architectures = raw.get("architectures") or [arch.head_class.__name__]
    cls = arch.class_named(architectures[0])
    try:
        model, info = cls.from_pretrained(
            path, local_files_only=True, output_loading_info=True, dtype=dtype
        )
    except Exception as exc:  # transformers raises many types for a damaged checkpoint
        raise CheckpointError(f"could not load the checkpoint in {path}: {type(exc).__name__}: {exc}") from exc
    # transformers fills missing tensors with fresh random values and only warns: that would hand the
    # user a silently wrong model, so a checkpoint missing anything but a tied head is an error here.
    # Tied or not is read off the model: transformers 5.0 configs saved without the field lack it.
    head = model.get_output_embeddings() if isinstance(model, arch.head_class) else None
    tied = {"lm_head.weight"} if head is not None and head.weight is model.get_input_embeddings().weight else set()
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    if missing:
        raise CheckpointError(f"the checkpoint in {path} lacks tensors: {', '.join(missing[:8])}")
    return model.to(device).eval()
