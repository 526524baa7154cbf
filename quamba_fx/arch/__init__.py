"""Architecture specs: what quamba-fx knows of each model family it captures, as data.

One module per architecture (`mamba1.py`, `mamba2.py`), each building a frozen `ArchSpec` (`spec.py`) and
registering it by name (`registry.py`). The built-in ones are imported here explicitly, so they are
registered whatever is imported first.
"""

from __future__ import annotations

from . import mamba1, mamba2  # isort: skip  (register the built-in architectures)
from .registry import (
    DEFAULT_ARCH,
    arch_for_class_name,
    arch_for_model,
    arch_for_model_type,
    arch_named,
    arch_names,
    arch_of,
    register_arch,
)
from .spec import TAP_SITES, ArchSpec, Tap, Topology

MAMBA1 = mamba1.MAMBA1
MAMBA2 = mamba2.MAMBA2

__all__ = [
    "DEFAULT_ARCH", "MAMBA1", "MAMBA2", "TAP_SITES", "ArchSpec", "Tap", "Topology", "arch_for_class_name", "arch_for_model",
    "arch_for_model_type", "arch_named", "arch_names", "arch_of", "register_arch",
]
