"""Loading a script of benchmarks/ in a test: the scripts are not a package, so they are imported
from their file, under a module name of the test's choosing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(file_name: str, module_name: str) -> ModuleType:
    """The module of `benchmarks/<file_name>`, executed and registered in sys.modules as
    `module_name` (dataclasses and pickling look a module up by its name)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
