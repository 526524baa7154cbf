"""The `quamba-fx` command line.

Exit codes: 0 success, 1 a quamba-fx error (bad model, bad graph, bad checkpoint...), 2 bad usage.
Errors print one line; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from .capture import capture
from .dump import FORMATS, dump, write_dump
from .errors import QuambaError
from .graph_info import block, is_kind
from .models import BUILTIN_SHAPES, load_model
from .passes.verify import verify_topology


def _model_arg_help() -> str:
    return f"a save_pretrained directory or a built-in name ({', '.join(BUILTIN_SHAPES)})"


def _load_for_shapes(model: str, device: str | None) -> torch.nn.Module:
    # Dumps need shapes only: built-in models default to the meta device, so even 2.8b costs no memory.
    if device is None:
        device = "meta" if model in BUILTIN_SHAPES else "cpu"
    return load_model(model, device=device)


def cmd_dump(args: argparse.Namespace) -> int:
    gm = capture(_load_for_shapes(args.model, args.device), example_shape=(args.batch, args.seq_len))
    verify_topology(gm)
    if args.out:
        path = write_dump(gm, args.out, args.format, args.block)
        print(f"wrote {args.format} dump of {args.model} to {path}", file=sys.stderr)
    else:
        sys.stdout.write(dump(gm, args.format, args.block))
    return 0


def _linear_shape(module: torch.nn.Module) -> str:
    return f"{module.in_features}->{module.out_features}"


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"quamba-fx demo: {args.model} with seeded random weights (the Hub is not contacted)")
    started = time.perf_counter()
    model = load_model(args.model, seed=args.seed)
    built = time.perf_counter() - started
    started = time.perf_counter()
    gm = capture(model)
    captured = time.perf_counter() - started
    started = time.perf_counter()
    verify_topology(gm)
    verified = time.perf_counter() - started

    per_block = Counter(block(n) for n in gm.graph.nodes if block(n) is not None)
    prefix = gm.meta["quamba"]["prefix"]
    header = f"{'block':>5}  {'nodes':>5}  {'in_proj':>11}  {'conv1d (ch x k)':>15}  {'x_proj':>10}  {'dt_proj':>10}  {'out_proj':>11}"
    print(header)
    for b in sorted(per_block):
        mixer = gm.get_submodule(f"{prefix}layers.{b}.mixer")
        conv = mixer.conv1d
        print(
            f"{b:>5}  {per_block[b]:>5}  {_linear_shape(mixer.in_proj):>11}  "
            f"{f'{conv.out_channels} x {conv.kernel_size[0]}':>15}  {_linear_shape(mixer.x_proj):>10}  "
            f"{_linear_shape(mixer.dt_proj):>10}  {_linear_shape(mixer.out_proj):>11}"
        )
    kinds = Counter(k for n in gm.graph.nodes for k in ("conv1d", "scan") if is_kind(gm, n, k))
    print(f"graph: {len(gm.graph.nodes)} nodes, {kinds['conv1d']} conv1d, {kinds['scan']} selective_scan ops")
    print("topology verified: every block is in_proj -> conv1d -> x_proj, no conv1d feeds a conv1d")
    print(f"time: build {built:.2f} s, capture {captured:.2f} s, verify {verified:.3f} s")
    if args.run:
        ids = torch.randint(0, model.config.vocab_size, (1, args.run), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            started = time.perf_counter()
            logits = gm(ids)
        print(f"ran the graph on {tuple(ids.shape)} token ids: logits {tuple(logits.shape)} in {time.perf_counter() - started:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quamba-fx",
        description="Capture, verify and inspect Hugging Face Mamba models as torch.fx graphs.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="capture and verify a built-in model, print a per-block summary")
    demo.add_argument("--model", default="mamba-130m", help=_model_arg_help() + " (default: mamba-130m)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    demo.add_argument("--run", type=int, default=16, metavar="L",
                      help="also run the captured graph on L random tokens (0 to skip; default: 16)")
    demo.set_defaults(func=cmd_demo)

    d = sub.add_parser("dump", help="print or write the captured graph as text, json, dot or svg")
    d.add_argument("model", help=_model_arg_help())
    d.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    d.add_argument("--block", type=int, default=None, help="only the nodes of this block")
    d.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    d.add_argument("--device", default=None,
                   help="where to build the model: 'meta' (shapes only; default for built-in names) or 'cpu'")
    d.add_argument("--batch", type=int, default=1, help="batch of the example input for shapes (default: 1)")
    d.add_argument("--seq-len", type=int, default=8, help="length of the example input for shapes (default: 8)")
    d.set_defaults(func=cmd_dump)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except QuambaError as exc:
        if args.debug:
            raise
        print(f"quamba-fx: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        if args.debug:
            raise
        print(f"quamba-fx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
