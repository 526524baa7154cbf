"""Host time of the Generator's plain (not graph-replayed) calls on a CPU, with the kernels stubbed out.

    python benchmarks/host_cpu.py [--model mamba-130m] [--batch 1] [--prompt 8] [--rounds 6] [--calls 20]
                                  [--compare-flatten] [--json PATH]

No GPU needed. On a GPU host a plain call is host-bound (docs/benchmarks.md, session 46: 160-180 us
of host time a launch), and what the host spends is Python: the graph's code, our kernel wrappers,
Triton's launch path. This runs the same Python on the CPU: the Triton interpreter path
(TRITON_INTERPRET=1, which the script sets for itself) with every kernel launch replaced by a no-op and the logits head by an
identity (its fp16 matmul would dominate on a CPU), so the figure is the host's share of a plain
decode step and a plain prefill, minus Triton's own launcher. `--compare-flatten` also times graphs
built without `runtime._flatten_constants` (weights read through the module tree), interleaved with
the default ones, after checking both give the same logits with the kernels running.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import write_json  # noqa: E402


@contextmanager
def without_flattening() -> Iterator[None]:
    from quamba_fx import runtime

    keep = runtime._flatten_constants
    runtime._flatten_constants = lambda gm: None
    try:
        yield
    finally:
        runtime._flatten_constants = keep


@contextmanager
def stubbed_kernels(generators: List) -> Iterator[None]:
    """Kernel launches are no-ops inside (put back after); the head node of each generator's graphs
    becomes an identity for good (the generators are this script's own)."""
    from triton.runtime import interpreter

    for gen in generators:
        for gm in (gen.prefill_graph, gen.decode_graph):
            for node in gm.graph.nodes:
                if node.op == "call_function" and getattr(node.target, "__name__", "") == "logits_linear":
                    node.target = _identity_head
            gm.recompile()
    launch = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = launch


def _identity_head(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def host_ms(fns: Dict[str, Callable[[], object]], rounds: int, calls: int) -> Dict[str, List[float]]:
    """ms per call of each function, `rounds` interleaved rounds of `calls` calls."""
    out: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            out[name].append((time.perf_counter() - started) * 1e3 / calls)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba-130m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=8, help="prefill length")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--compare-flatten", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    import quamba_fx
    from e2e import random_model
    from quamba_fx.kernels.dispatch import INTERPRET

    if not INTERPRET:
        raise SystemExit("host_cpu.py: run it with TRITON_INTERPRET=1 (set by itself when run as a script), "
                         "so that the kernel wrappers take their Triton path on the CPU")
    torch.manual_seed(0)
    model = random_model(args.model, "cpu")
    vocab = model.config.vocab_size
    lowered = quamba_fx.lower(quamba_fx.quantize(model, [torch.randint(0, vocab, (1, 32))], progress=False))
    variants = {"default": quamba_fx.Generator(lowered, args.batch, cuda_graph=False)}
    if args.compare_flatten:
        with without_flattening():
            variants["not flattened"] = quamba_fx.Generator(lowered, args.batch, cuda_graph=False)
    ids = torch.randint(0, vocab, (args.batch, args.prompt))
    token = ids[:, -1]
    with torch.inference_mode():
        logits = {name: (gen.prefill(ids), gen.decode(token)) for name, gen in variants.items()}
        first = logits["default"]
        for name, got in logits.items():
            if not all(torch.equal(a, b) for a, b in zip(got, first)):
                raise SystemExit(f"host_cpu.py: {name} gives other logits than the default graphs")
        fns = {}
        for name, gen in variants.items():
            fns[f"decode step, {name}"] = lambda gen=gen: gen.decode(token)
            fns[f"prefill {args.batch}x{args.prompt}, {name}"] = lambda gen=gen: gen.prefill(ids)
        with stubbed_kernels(list(variants.values())):
            for fn in fns.values():
                fn()
            times = host_ms(fns, args.rounds, args.calls)
    print(f"{args.model}, host ms per plain call on this CPU (kernels stubbed), {args.rounds} rounds of {args.calls}")
    print("| call | min | median |\n|---|---|---|")
    for name, values in times.items():
        values = sorted(values)
        print(f"| {name} | {values[0]:.2f} | {values[len(values) // 2]:.2f} |")
    if args.json:
        write_json(args.json, "cpu", {"model": args.model, "batch": args.batch, "prompt": args.prompt},
                   times_ms=times)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before quamba_fx decorates its kernels
    sys.exit(main())
