"""The `quamba-fx` command line: parse and validate arguments, run a command, report errors.

Exit codes: 0 success; 1 the command failed (a bad model, graph, checkpoint or file; a missing GPU),
with one line on stderr; 2 bad usage (argparse's own message); 130 interrupted. `--debug` shows
the traceback instead of the one line.

This module imports neither torch nor transformers: arguments are checked here, before the
seconds-long imports that `commands` (the command bodies) needs, so `--help` and usage errors
answer at once.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from .catalog import BUILTIN_SHAPES, DEFAULT_MODEL, DUMP_FORMATS, PACKAGED_MODELS, RECIPE_NAMES
from .errors import QuambaError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def percentile(text: str) -> float:
    value = positive_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"a percentile lies in (0, 100], got {text}")
    return value


_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?$")


def compute_device(text: str) -> str:
    """cpu, cuda or cuda:N. Whether a GPU is really there is checked when the command runs."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} {'is a directory' if path.is_dir() else 'does not exist'}")
    return path


def _model_arg_help() -> str:
    return f"a save_pretrained directory or a built-in name ({', '.join([*PACKAGED_MODELS, *BUILTIN_SHAPES])})"


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that calibrate (eval, quantize)."""
    parser.add_argument("--calib", type=existing_file, default=None,
                        help="calibration text file (default: WikiText-2 valid.txt)")
    parser.add_argument("--calib-windows", type=positive_int, default=32, help="calibration windows (default: 32)")
    parser.add_argument("--seq-len", type=_int_at_least(2), default=512, help="tokens per window (default: 512)")
    parser.add_argument("--percentile", type=percentile, default=99.999,
                        help="percentile of |x| for the conv1d output scale in the quamba recipe (default: 99.999)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per batch (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights for built-in shapes (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quamba-fx",
        description="Capture, verify, quantize (W8A8) and inspect Hugging Face Mamba models as torch.fx graphs.",
        epilog="Exit codes: 0 ok, 1 the command failed (one line on stderr), 2 bad usage.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="capture, verify, quantize and evaluate a built-in model")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=_model_arg_help() + f" (default: {DEFAULT_MODEL})")
    demo.add_argument("--seed", type=int, default=0, help="seed of random weights for built-in shapes (default: 0)")
    demo.add_argument("--run", type=non_negative_int, default=16, metavar="L",
                      help="also run the captured graph on L random tokens (0 to skip; default: 16)")
    demo.add_argument("--windows", type=non_negative_int, default=16,
                      help="text windows for calibration and for evaluation (0 skips quantization; default: 16)")
    demo.add_argument("--seq-len", type=_int_at_least(2), default=512, help="bytes per window (default: 512)")
    demo.add_argument("--batch-size", type=positive_int, default=8, help="windows per batch (default: 8)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(command_name="demo")

    ev = sub.add_parser("eval", help="bits per byte (and perplexity per token) on WikiText-2 test.txt, float or "
                        "quantized, vs the float model")
    ev.add_argument("model", help=_model_arg_help() + " (byte-level, or with its tokenizer.json), or a checkpoint "
                    "directory from `quantize`")
    ev.add_argument("--recipe", choices=("none", *RECIPE_NAMES), default="quamba",
                    help="none (float), or a recipe: naive, quamba (int8 W8A8), fp8 (e4m3), the 4-bit-weight "
                    "naive-w4a8, naive-w4a16, quamba2-w4a8, quamba2-w4a16 (default: quamba)")
    ev.add_argument("--windows", type=positive_int, default=64,
                    help="evaluation windows, spread over the text (default: 64)")
    ev.add_argument("--text", type=existing_file, default=None, help="evaluation text file (default: WikiText-2 test.txt)")
    ev.add_argument("--reference", default=None,
                    help="for a quantized checkpoint: the float model to compare with (KL, top-1 agreement)")
    _add_calibration_args(ev)
    ev.set_defaults(command_name="eval")

    qz = sub.add_parser("quantize", help="calibrate on text, quantize to W8A8 and save a checkpoint directory")
    qz.add_argument("model", help=_model_arg_help() + " (byte-level, or with its tokenizer.json)")
    qz.add_argument("--out", type=Path, required=True,
                    help="checkpoint directory to write (new, or empty; never replaces anything else)")
    qz.add_argument("--overwrite", action="store_true",
                    help="replace --out if it holds a quamba-fx checkpoint (anything else is always refused)")
    qz.add_argument("--recipe", choices=RECIPE_NAMES, default="quamba", help="recipe (default: quamba, W8A8)")
    qz.add_argument("--fuse", action="store_true", help="also fuse each conv1d + SiLU into the int8 Triton kernel")
    _add_calibration_args(qz)
    qz.set_defaults(command_name="quantize")

    gen = sub.add_parser("generate", help="continue a prompt with a model or checkpoint (bytes or its tokenizer)")
    gen.add_argument("model", help=_model_arg_help() + ", or a checkpoint directory from `quantize`")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens (bytes for byte-level models) to "
                     "generate (default: 64)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature (default: 0.8)")
    gen.add_argument("--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens (default: 50)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--kernels", action="store_true",
                     help="a quantized checkpoint on its recipe's Triton kernels with a decode cache (greedy)")
    gen.add_argument("--device", type=compute_device, default=None,
                     help="with --kernels: cpu, cuda or cuda:N (default: cuda when available)")
    gen.set_defaults(command_name="generate")

    bench = sub.add_parser("bench", help="time a forward pass (prefill) of a model or checkpoint")
    bench.add_argument("model", help=_model_arg_help() + ", or a checkpoint directory from `quantize`")
    bench.add_argument("--device", type=compute_device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when available)")
    bench.add_argument("--batch", type=positive_int, default=1, help="batch size (default: 1)")
    bench.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence (default: 128)")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions (default: 5)")
    bench.add_argument("--kernels", action="store_true",
                       help="lower a quantized checkpoint to its recipe's Triton kernels first, and time cached decode")
    bench.add_argument("--decode-steps", type=non_negative_int, default=32,
                       help="with --kernels: decode steps to time (default: 32)")
    bench.set_defaults(command_name="bench")

    d = sub.add_parser("dump", help="print or write the captured graph as text, json, dot or svg")
    d.add_argument("model", help=_model_arg_help())
    d.add_argument("--format", choices=DUMP_FORMATS, default="text", help="output format (default: text)")
    d.add_argument("--block", type=non_negative_int, default=None, help="only the nodes of this block")
    d.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    d.add_argument("--device", choices=("meta", "cpu"), default=None,
                   help="where to build the model: 'meta' (shapes only; default for built-in names) or 'cpu'")
    d.add_argument("--batch", type=positive_int, default=1, help="batch of the example input for shapes (default: 1)")
    d.add_argument("--seq-len", type=positive_int, default=8, help="length of the example input for shapes (default: 8)")
    d.add_argument("--kernels", action="store_true",
                   help="dump a quantized checkpoint lowered to the kernel ops (adds a kernel column)")
    d.set_defaults(command_name="dump")
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`) and return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        from . import commands  # the heavy imports (torch, transformers) start here

        return getattr(commands, f"cmd_{args.command_name}")(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("quamba-fx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (QuambaError, OSError) as exc:  # OSError: a file we were asked to read or write
        if args.debug:
            raise
        print(f"quamba-fx: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug of ours: still one line, and how to see more
        if args.debug:
            raise
        print(f"quamba-fx: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
