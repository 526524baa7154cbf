"""What an architecture's traceable forward uses while `quamba_fx.capture` traces it.

`stage(role, block, module)` labels every node traced inside it; capture's tracer reads
`current_stage()` when it creates a node. `check_input_ids` is the validation node at the top of
every graph (the tracer keeps it as one call, see `autowrap_functions`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .. import ops
from ..errors import InputError, MetaDeviceError

__all__ = ["check_input_ids", "current_stage", "stage"]

_current_stage: dict = {"role": "input", "block": None, "module": ""}


@contextlib.contextmanager
def stage(role: str, block: int | None = None, module: str = "") -> Iterator[None]:
    """Label every node traced inside the block with a role, block index and module path."""
    global _current_stage
    saved = _current_stage
    _current_stage = {"role": role, "block": block, "module": module}
    try:
        yield
    finally:
        _current_stage = saved


def current_stage() -> dict:
    """A copy of the labels of the innermost open `stage`: `{"role", "block", "module"}`."""
    return dict(_current_stage)


def check_input_ids(input_ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """Validate what a captured graph is called with; a node of its own at the top of every graph."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be int64 or int32 token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)}): batch and seq_len must be >= 1")
    if embedding_weight.is_meta and not input_ids.is_meta:
        raise MetaDeviceError(
            "this graph was captured from a model on the meta device: it has shapes but no weights. "
            "Load real weights (a checkpoint or a built-in model on cpu/cuda) and capture again to run it."
        )
    # The range check reads the data; on CUDA that would sync every call, and the embedding's own
    # device assert catches it there, so only CPU pays for the friendlier message.
    if input_ids.device.type != "cpu":
        return input_ids
    # Traced by dynamo, or by AOT/make_fx (fake or functional tensor subclasses): compilers drop
    # Python checks, so the check becomes an op of the graph they build.
    if torch.compiler.is_compiling() or type(input_ids) is not torch.Tensor:
        return torch.ops.quamba.token_ids_in_range(input_ids, embedding_weight.shape[0])
    ops.check_token_range(input_ids, embedding_weight.shape[0])
    return input_ids
