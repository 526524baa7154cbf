"""Loading a script of benchmarks/ in a test: the scripts are not a package, so they are imported
from their file, under a module name of the test's choosing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
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


def run_without_interpreter(args: list[str]) -> str:
    """The stdout of `python <args>` in a child process without TRITON_INTERPRET, with the checkout
    on its path: Triton can only compile (not interpret) kernels there. Fails the test, with the
    child's stderr, if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS.parent), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
