"""Architecture specs by name, and which one a model or a captured graph is.

The built-in specs are registered by `quamba_fx.arch`'s `__init__`, which imports each of them
explicitly, so the registry holds them whatever is imported first; `register_arch` adds another.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from ..graph_meta import GraphMeta, find_graph_meta
from .spec import ArchSpec

__all__ = ["DEFAULT_ARCH", "arch_for_class_name", "arch_for_model", "arch_for_model_type", "arch_named", "arch_names", "arch_of",
           "register_arch"]

# Graphs without capture metadata (Dynamo's, in the torch.compile backend) are read as this
# architecture: the only one quamba-fx captured before specs existed.
DEFAULT_ARCH = "mamba1"

_SPECS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add `spec` under `spec.name`; re-registering the same spec is a no-op. Returns `spec`."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_arch takes an ArchSpec, got {type(spec).__name__}")
    known = _SPECS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"an architecture named {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def arch_names() -> list[str]:
    """The registered architectures' names, in registration order."""
    return list(_SPECS)


def arch_named(name: str) -> ArchSpec:
    """The spec registered as `name`; `UnsupportedModelError` if there is none."""
    try:
        return _SPECS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown architecture {name!r}; registered: {', '.join(_SPECS)}"
        ) from None


def arch_for_model_type(model_type: Any) -> ArchSpec | None:
    """The spec whose HF `config.model_type` is `model_type`, or None."""
    return next((spec for spec in _SPECS.values() if spec.model_type == model_type), None)


def arch_for_model(model: Any) -> ArchSpec | None:
    """The spec that accepts `model`'s class, or None."""
    return next((spec for spec in _SPECS.values() if spec.accepts(model)), None)


def arch_for_class_name(name: Any) -> ArchSpec | None:
    """The spec that accepts the model class called `name` (as checkpoints record it), or None."""
    return next((spec for spec in _SPECS.values() if name in spec.class_names), None)


def arch_of(gm: Any) -> ArchSpec:
    """The spec of a captured graph, from the `arch` (or config `model_type`) recorded in its
    `GraphMeta`; graphs without that metadata are read as `DEFAULT_ARCH`."""
    meta = find_graph_meta(gm) or GraphMeta()
    if meta.arch is not None:
        return arch_named(meta.arch)
    model_type = meta.config.get("model_type")
    if model_type is not None:
        spec = arch_for_model_type(model_type)
        if spec is None:
            raise UnsupportedModelError(f"this graph was captured from model_type={model_type!r}, "
                                        f"which no registered architecture accepts ({', '.join(_SPECS)})")
        return spec
    return arch_named(DEFAULT_ARCH)
