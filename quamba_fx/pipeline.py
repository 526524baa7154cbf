"""Run graph passes in order, checking the graph after every one.

A pass is anything callable on a `GraphModule` that returns a
`torch.fx.passes.infra.pass_base.PassResult(graph_module, modified)`: a `PassBase` subclass, or a plain
function. After each pass the pipeline lints the graph, recompiles it if it changed, runs the checks
(by default `verify_topology`) and optionally dumps it, so a broken invariant is blamed on the pass
that broke it rather than discovered at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from .dump import write_dump
from .errors import PassError
from .passes.verify import verify_topology

GraphPass = Callable[[torch.fx.GraphModule], PassResult]
GraphCheck = Callable[[torch.fx.GraphModule], None]


def pass_name(p: object) -> str:
    """A readable name for a pass: its `name` attribute, its class name, or its function name."""
    name = getattr(p, "name", None)
    if isinstance(name, str):
        return name
    if hasattr(p, "__name__"):
        return p.__name__
    return type(p).__name__


@dataclass
class PassRecord:
    """What one pass did: its name, whether it changed the graph, how long it took."""

    name: str
    modified: bool
    seconds: float


class Pipeline:
    """An ordered list of passes with checks between them.

    `Pipeline([p1, p2])(gm)` returns the final GraphModule. `dump_dir` writes the graph before the
    first pass (`00_input.<fmt>`) and after each pass (`01_<name>.<fmt>`, ...) in every format of
    `dump_formats` (see `quamba_fx.dump`). A failing pass or check raises `PassError` naming the pass
    and the passes that ran before it; `history` lists what ran.
    """

    def __init__(
        self,
        passes: Sequence[GraphPass],
        checks: Iterable[GraphCheck] = (verify_topology,),
        dump_dir: str | Path | None = None,
        dump_formats: Sequence[str] = ("text",),
    ):
        self.passes = list(passes)
        self.checks = list(checks)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.dump_formats = tuple(dump_formats)
        self.history: list[PassRecord] = []

    def __call__(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        self.history = []
        self._dump(gm, 0, "input")
        for index, graph_pass in enumerate(self.passes, start=1):
            name = pass_name(graph_pass)
            started = time.perf_counter()
            try:
                result = graph_pass(gm)
                if not isinstance(result, PassResult):
                    raise TypeError(f"returned {type(result).__name__}; a pass must return a PassResult")
                gm = result.graph_module
                gm.graph.lint()
                if result.modified:
                    gm.recompile()
                for check in self.checks:
                    check(gm)
            except Exception as exc:
                done = [r.name for r in self.history]
                before = ", ".join(done) if done else "none"
                raise PassError(
                    f"pass {index} '{name}' failed ({type(exc).__name__}): {exc}\n(passes run before it: {before})",
                    pass_name=name,
                    passes_before=done,
                ) from exc
            self.history.append(PassRecord(name, bool(result.modified), time.perf_counter() - started))
            self._dump(gm, index, name)
        return gm

    def _dump(self, gm: torch.fx.GraphModule, index: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        for fmt in self.dump_formats:
            write_dump(gm, self.dump_dir / f"{index:02d}_{name}.{fmt_suffix(fmt)}", fmt)


def fmt_suffix(fmt: str) -> str:
    return {"text": "txt"}.get(fmt, fmt)
