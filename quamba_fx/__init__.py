"""quamba-fx: capture, verify and quantize Hugging Face Mamba models as torch.fx graphs.

The package imports torch and transformers only when one of its names is first used, so the
command line answers `--help` and usage errors at once. The first use imports every public module,
as an eager import did (which also registers the torch.compile backend). What verification accepts
does not depend on imports: `graph_info` declares every op kind itself.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .errors import (
    CheckpointError,
    InputError,
    InvalidArgumentError,
    MetaDeviceError,
    MissingDependencyError,
    NonFiniteError,
    PassError,
    QuambaError,
    RecipeError,
    TopologyError,
    UnsupportedModelError,
)

from ._version import __version__

# Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "Calibration": "calibrate", "CalibrationError": "calibrate", "calibrate": "calibrate",
    "MambaGraphModule": "capture", "annotate_shapes": "capture", "capture": "capture",
    "from_pretrained": "checkpoint", "save_pretrained": "checkpoint",
    "dump": "dump", "write_dump": "dump",
    "BUILTIN_SHAPES": "models", "builtin_config": "models", "load_model": "models", "random_model": "models",
    "FuseConv1dSiLU": "passes.conv_fusion", "fuse": "flows",
    "LowerToKernels": "passes.kernel_lowering", "lower": "flows",
    "VerifyTopology": "passes.verify", "verify_topology": "passes.verify",
    "EvalResult": "evaluate", "evaluate": "evaluate",
    "Pipeline": "pipeline",
    "QuantSpec": "recipes", "Recipe": "recipes", "WeightSpec": "recipes", "make_recipe": "recipes",
    "register_recipe": "recipes",
    "Generator": "runtime", "MambaCache": "runtime",
    "quantize": "flows",
}

__all__ = [
    *_EXPORTS, "__version__", "CheckpointError", "InputError", "InvalidArgumentError", "MetaDeviceError",
    "MissingDependencyError", "NonFiniteError", "PassError", "QuambaError", "RecipeError", "TopologyError",
    "UnsupportedModelError",
]


def _import_all() -> None:
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    importlib.import_module(".backend", __name__)  # registers the torch.compile backend "quamba"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_all()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """Keeps `quamba_fx.capture` (and calibrate, dump, evaluate) the function, never the submodule.

    Importing a submodule binds it on its package; an eager `from .capture import capture` used to
    rebind the name to the function afterwards. Lazily, that rebinding may never happen, so the
    import system's binding of a submodule over a public function name is dropped here.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
