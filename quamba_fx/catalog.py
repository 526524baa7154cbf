"""Names the command line offers before anything heavy is imported: built-in models, recipes, formats.

This module imports neither torch nor transformers, so `quamba-fx --help` and usage errors answer
at once. The modules that act on these names (`models`, `dump`) import them from here; the recipe
names are the built-ins `quamba_fx.recipes` registers (tests/test_recipes.py checks they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinShape:
    """The architecture of one published state-spaces checkpoint (expand 2, conv 4). Mamba-1: vocab
    50280, d_state 16. Mamba-2 (`arch="mamba2"`): vocab 50288, d_state 128, heads of 64 channels,
    one B/C group, chunks of 256 steps."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int = 50280
    arch: str = "mamba1"
    state_size: int = 16
    head_dim: int = 64
    chunk_size: int = 256


def _mamba2(hidden_size: int, num_hidden_layers: int) -> BuiltinShape:
    return BuiltinShape(hidden_size, num_hidden_layers, vocab_size=50288, arch="mamba2", state_size=128)


BUILTIN_SHAPES: dict[str, BuiltinShape] = {
    "mamba-tiny": BuiltinShape(hidden_size=64, num_hidden_layers=2, vocab_size=256),
    "mamba-130m": BuiltinShape(hidden_size=768, num_hidden_layers=24),
    "mamba-370m": BuiltinShape(hidden_size=1024, num_hidden_layers=48),
    "mamba-790m": BuiltinShape(hidden_size=1536, num_hidden_layers=48),
    "mamba-1.4b": BuiltinShape(hidden_size=2048, num_hidden_layers=48),
    "mamba-2.8b": BuiltinShape(hidden_size=2560, num_hidden_layers=64),
    "mamba2-tiny": BuiltinShape(hidden_size=64, num_hidden_layers=2, vocab_size=256, arch="mamba2", head_dim=16,
                                chunk_size=16),
    "mamba2-130m": _mamba2(768, 24),
    "mamba2-370m": _mamba2(1024, 48),
    "mamba2-780m": _mamba2(1536, 48),
    "mamba2-1.3b": _mamba2(2048, 48),
    "mamba2-2.7b": _mamba2(2560, 64),
}

# Trained checkpoints shipped inside the package (see benchmarks/train_bytes_model.py).
PACKAGED_MODELS: dict[str, Path] = {
    "mamba-bytes-wt2": Path(__file__).parent / "models_data" / "mamba-bytes-wt2",
    "mamba2-bytes-wt2": Path(__file__).parent / "models_data" / "mamba2-bytes-wt2",
}
DEFAULT_MODEL = "mamba-bytes-wt2"

# The --recipe choices; each one is defined in a file of quamba_fx/recipes/.
RECIPE_NAMES = ("naive", "naive-w4a8", "naive-w4a16", "quamba", "fp8", "quamba2-w4a8", "quamba2-w4a16", "quamba2-w8a8")
DUMP_FORMATS = ("text", "json", "dot", "svg")
