"""The `quamba-fx` command line.

Exit codes: 0 success, 1 a quamba-fx error (bad model, bad graph, bad checkpoint...), 2 bad usage.
Errors print one line; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.fx

from .capture import annotate_shapes, capture
from .checkpoint import from_pretrained, is_quamba_checkpoint
from .dump import FORMATS, dump, write_dump
from .errors import InputError, QuambaError
from .graph_info import block, is_kind
from .evaluate import EvalResult, evaluate
from .models import BUILTIN_SHAPES, DEFAULT_MODEL, PACKAGED_MODELS, load_model
from .passes.fuse_conv import fuse
from .passes.lower import lower
from .passes.verify import verify_topology
from .recipe import RECIPE_NAMES, make_recipe
from .text import ByteCodec, TextCodec, graph_codec, source_codec, text_windows
from .textdata import find_wikitext
from .w8a8 import quantize


def _model_arg_help() -> str:
    return f"a save_pretrained directory or a built-in name ({', '.join([*PACKAGED_MODELS, *BUILTIN_SHAPES])})"


def _load_for_shapes(model: str, device: str | None) -> torch.nn.Module:
    # Dumps need shapes only: built-in models default to the meta device, so even 2.8b costs no memory.
    if device is None:
        device = "meta" if model in BUILTIN_SHAPES else "cpu"
    return load_model(model, device=device)


def load_graph(source: str, device: str | None = None, example_shape: tuple[int, int] = (1, 8)) -> torch.fx.GraphModule:
    """A quantized checkpoint directory (from save_pretrained) as it was saved, anything else captured."""
    if is_quamba_checkpoint(source):
        gm = from_pretrained(source)
        annotate_shapes(gm, example_shape)
        return gm
    return capture(_load_for_shapes(source, device), example_shape=example_shape)


def cmd_dump(args: argparse.Namespace) -> int:
    gm = load_graph(args.model, args.device, (args.batch, args.seq_len))
    if args.kernels:
        gm = _lowered(gm, args.model)
    verify_topology(gm)
    if args.out:
        path = write_dump(gm, args.out, args.format, args.block)
        print(f"wrote {args.format} dump of {args.model} to {path}", file=sys.stderr)
    else:
        sys.stdout.write(dump(gm, args.format, args.block))
    return 0


def _linear_shape(module: torch.nn.Module) -> str:
    return f"{module.in_features}->{module.out_features}"


def _print_block_summary(gm: torch.fx.GraphModule) -> None:
    per_block = Counter(block(n) for n in gm.graph.nodes if block(n) is not None)
    prefix = gm.meta["quamba"]["prefix"]
    print(f"{'block':>5}  {'nodes':>5}  {'in_proj':>11}  {'conv1d (ch x k)':>15}  {'x_proj':>10}  "
          f"{'dt_proj':>10}  {'out_proj':>11}")
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


def state_bytes(module: torch.nn.Module, float_bytes: int | None = None) -> int:
    """Bytes of the state dict, each shared tensor (tied embeddings) counted once; `float_bytes`
    counts floating-point tensors at that width (2 for "as if fp16")."""
    unique = {t.data_ptr(): t for t in module.state_dict().values()}.values()
    return sum(t.numel() * (float_bytes if float_bytes and t.is_floating_point() else t.element_size())
               for t in unique)


def _text_windows(split: str, seq_len: int, count: int, path: Path | None = None,
                  codec: TextCodec | None = None) -> torch.Tensor:
    """`count` windows of `seq_len` tokens of a text file (default: WikiText-2 `split`), read
    through `codec` (default: bytes)."""
    return text_windows(codec or ByteCodec(), path if path is not None else find_wikitext(split), seq_len, count)


def _unit(codec: TextCodec) -> str:
    return "bytes" if isinstance(codec, ByteCodec) else "tokens"


def _print_accuracy(name: str, result: EvalResult, perplexity: bool = False) -> None:
    """One row: bits per byte (and, for a tokenized model, perplexity per token) vs the reference."""
    print(f"{name:<8} bits/byte {result.bits_per_byte:.4f}", end="")
    if perplexity and result.perplexity is not None:
        print(f"  perplexity {result.perplexity:.3f}/token", end="")
    if result.reference_bits_per_byte is not None:
        rel = result.bits_per_byte / result.reference_bits_per_byte - 1
        print(f"  ({rel:+.2%} vs fp32)  KL {result.kl_divergence:.5f}  top-1 agreement {result.top1_agreement:.4f}", end="")
    print()


def _reference_row(result: EvalResult) -> EvalResult:
    return EvalResult(result.reference_bits_per_byte, result.windows, result.seq_len,
                      perplexity=result.reference_perplexity)


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"quamba-fx demo: {args.model} (no network access is needed)")
    started = time.perf_counter()
    model = load_model(args.model, seed=args.seed)
    built = time.perf_counter() - started
    started = time.perf_counter()
    gm = capture(model)
    captured = time.perf_counter() - started
    started = time.perf_counter()
    verify_topology(gm)
    verified = time.perf_counter() - started
    _print_block_summary(gm)
    print("topology verified: every block is in_proj -> conv1d -> x_proj, no conv1d feeds a conv1d")
    print(f"time: load {built:.2f} s, capture {captured:.2f} s, verify {verified:.3f} s")
    if args.run:
        ids = torch.randint(0, model.config.vocab_size, (1, args.run), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            started = time.perf_counter()
            logits = gm(ids)
        print(f"ran the graph on {tuple(ids.shape)} token ids: logits {tuple(logits.shape)} in {time.perf_counter() - started:.2f} s")
    if model.config.vocab_size != 256 or args.windows == 0:
        print("(W8A8 quantization and text accuracy run on byte-level models, e.g. --model mamba-bytes-wt2)")
        return 0
    calib = _text_windows("valid", args.seq_len, args.windows)
    held_out = _text_windows("test", args.seq_len, args.windows)
    started = time.perf_counter()
    qm = quantize(gm, calib.split(args.batch_size), recipe="quamba", progress=not args.quiet)
    # Both sides count the tensors left in floating point (embeddings, norms, A, D, conv) at fp16,
    # as deployed; the CPU reference keeps them in fp32.
    print(f"quantized W8A8 (quamba recipe) in {time.perf_counter() - started:.1f} s; state dict "
          f"{state_bytes(gm, float_bytes=2) / 1e6:.2f} MB fp16 -> {state_bytes(qm, float_bytes=2) / 1e6:.2f} MB W8A8")
    verify_topology(qm)
    result = evaluate(qm, held_out, gm, batch_size=args.batch_size, progress=not args.quiet)
    print(f"accuracy on {result.windows} windows of {result.seq_len} bytes of WikiText-2 test.txt:")
    _print_accuracy("fp32", EvalResult(result.reference_bits_per_byte, result.windows, result.seq_len))
    _print_accuracy("W8A8", result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if is_quamba_checkpoint(args.model):
        return _eval_checkpoint(args)
    model = load_model(args.model, seed=args.seed)
    codec = source_codec(args.model, model.config.vocab_size)
    held_out = _text_windows("test", args.seq_len, args.windows, args.text, codec)
    tokenized = not isinstance(codec, ByteCodec)
    gm = capture(model)
    if args.recipe == "none":
        result = evaluate(gm, held_out, batch_size=args.batch_size, progress=not args.quiet, codec=codec)
        _print_accuracy("fp32", result, tokenized)
        return 0
    calib = _text_windows("valid", args.seq_len, args.calib_windows, args.calib, codec)
    recipe = make_recipe(args.recipe, percentile=args.percentile)
    qm = quantize(gm, calib.split(args.batch_size), recipe=recipe, progress=not args.quiet)
    result = evaluate(qm, held_out, gm, batch_size=args.batch_size, progress=not args.quiet, codec=codec)
    print(f"{args.model}: {result.windows} windows of {result.seq_len} {_unit(codec)}; recipe {args.recipe}")
    _print_accuracy("fp32", _reference_row(result), tokenized)
    _print_accuracy(args.recipe, result, tokenized)
    return 0


def _eval_checkpoint(args: argparse.Namespace) -> int:
    qm = from_pretrained(args.model)
    codec = graph_codec(qm, f"evaluating {args.model}")
    held_out = _text_windows("test", args.seq_len, args.windows, args.text, codec)
    tokenized = not isinstance(codec, ByteCodec)
    reference = None
    if args.reference:
        reference = capture(load_model(args.reference))
    result = evaluate(qm, held_out, reference, batch_size=args.batch_size, progress=not args.quiet, codec=codec)
    recipe = qm.meta["quamba"].get("recipe") or "float"
    print(f"{args.model}: {result.windows} windows of {result.seq_len} {_unit(codec)}; recipe {recipe}")
    if reference is not None:
        _print_accuracy("fp32", _reference_row(result), tokenized)
    _print_accuracy(recipe, result, tokenized)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    model = load_model(args.model, seed=args.seed)
    codec = source_codec(args.model, model.config.vocab_size)
    calib = _text_windows("valid", args.seq_len, args.calib_windows, args.calib, codec)
    recipe = make_recipe(args.recipe, percentile=args.percentile)
    started = time.perf_counter()
    qm = quantize(model, calib.split(args.batch_size), recipe=recipe, progress=not args.quiet)
    if args.fuse:
        qm = fuse(qm)
    verify_topology(qm)
    qm.save_pretrained(args.out, tokenizer=codec)  # the checkpoint keeps the model's tokenizer
    print(f"quantized {args.model} with the {args.recipe} recipe on {calib.shape[0]} x {calib.shape[1]} {_unit(codec)} "
          f"in {time.perf_counter() - started:.1f} s{' (conv1d fused)' if args.fuse else ''}")
    print(f"wrote {args.out}: {state_bytes(qm) / 1e6:.2f} MB of tensors "
          f"(the float model: {state_bytes(model) / 1e6:.2f} MB as loaded, {state_bytes(model, float_bytes=2) / 1e6:.2f} MB as fp16)")
    return 0


def _lowered(gm: torch.fx.GraphModule, name: str) -> torch.fx.GraphModule:
    """`--kernels`: the graph lowered to the Triton kernel ops (quantized graphs only)."""
    if not gm.meta["quamba"].get("recipe"):
        raise InputError(f"--kernels runs the W8A8 kernels: {name} is a float model; quantize it first "
                         "(quamba-fx quantize ... --out DIR) and pass the checkpoint directory")
    return lower(gm)


def _synchronized_seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    gm = load_graph(args.model, device="cpu")
    if args.kernels:
        gm = _lowered(gm, args.model)
    gm = gm.to(device)
    vocab = gm.meta["quamba"]["hf_config"]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    kind = "W8A8 kernels" if args.kernels else f"recipe {gm.meta['quamba'].get('recipe') or 'float'}"
    print(f"{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{kind}; median of {args.repeats} after 1 warm-up")
    print(f"{'batch':>5} {'seq':>6} {'ms':>10} {'tokens/s':>10}")
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator).to(device)
    with torch.no_grad():
        times = [_synchronized_seconds(lambda: gm(ids), device) for _ in range(args.repeats + 1)]
    median = statistics.median(times[1:])  # the first call is the warm-up
    print(f"{args.batch:>5} {args.seq_len:>6} {median * 1e3:>10.2f} {args.batch * args.seq_len / median:>10.0f}")
    if args.kernels and args.decode_steps > 0:
        from .runtime import Generator

        runner = Generator(gm, args.batch)
        with torch.no_grad():
            token = runner.prefill(ids)[:, -1].argmax(-1)
            token = runner.decode(token).argmax(-1)  # warm-up (and CUDA-graph capture)

            def steps():
                nonlocal token
                for _ in range(args.decode_steps):
                    token = runner.decode(token).argmax(-1)

            seconds = _synchronized_seconds(steps, device)
        graph = " (CUDA graph)" if runner.use_cuda_graph else ""
        print(f"decode{graph}: {args.decode_steps} steps at batch {args.batch}, "
              f"{seconds / args.decode_steps * 1e3:.2f} ms/step, {args.batch * args.decode_steps / seconds:.0f} tokens/s")
    print(f"state dict: {state_bytes(gm) / 1e6:.2f} MB")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generate_text

    gm = load_graph(args.model, device="cpu")
    codec = source_codec(args.model, gm.meta["quamba"]["hf_config"]["vocab_size"])
    started = time.perf_counter()
    if args.kernels:
        from .runtime import Generator

        if args.sample:
            raise InputError("--kernels decodes greedily; drop --sample (or --kernels)")
        device = torch.device(args.device)
        runner = Generator(_lowered(gm, args.model).to(device), batch_size=1)
        prompt = torch.tensor([codec.encode(args.prompt)], dtype=torch.long)
        if prompt.shape[1] == 0:
            raise InputError("prompt is empty: generation needs at least one token to continue")
        tokens = runner.generate(prompt, args.max_new_tokens)[0, prompt.shape[1]:].tolist()
        text = codec.decode(tokens)
        how = f"W8A8 kernels on {device}, decode cache"
    else:
        text = generate_text(gm, args.prompt, args.max_new_tokens, do_sample=args.sample,
                             temperature=args.temperature if args.sample else None,
                             top_k=args.top_k if args.sample else None, seed=args.seed, tokenizer=codec)
        how = (f"recipe {gm.meta['quamba'].get('recipe') or 'float'}; no decode cache: each step reruns "
               "the prefix (--kernels decodes from a cache)")
    elapsed = time.perf_counter() - started
    print(args.prompt + text)
    count = "" if isinstance(codec, ByteCodec) else f"{len(codec.encode(text))} tokens, "
    print(f"({count}{len(text.encode())} bytes in {elapsed:.1f} s, {how})", file=sys.stderr)
    return 0


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that calibrate (eval, quantize)."""
    parser.add_argument("--calib", type=Path, default=None, help="calibration text file (default: WikiText-2 valid.txt)")
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default: 32)")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="tokens per window: bytes for a byte-level model (default: 512)")
    parser.add_argument("--percentile", type=float, default=99.999,
                        help="percentile of |x| for the conv1d output scale in the quamba recipe (default: 99.999)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights for built-in shapes (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quamba-fx",
        description="Capture, verify, quantize (W8A8) and inspect Hugging Face Mamba models as torch.fx graphs.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="capture, verify, quantize and evaluate a built-in model")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=_model_arg_help() + f" (default: {DEFAULT_MODEL})")
    demo.add_argument("--seed", type=int, default=0, help="seed of random weights for built-in shapes (default: 0)")
    demo.add_argument("--run", type=int, default=16, metavar="L",
                      help="also run the captured graph on L random tokens (0 to skip; default: 16)")
    demo.add_argument("--windows", type=int, default=16,
                      help="text windows for calibration and for evaluation (0 skips quantization; default: 16)")
    demo.add_argument("--seq-len", type=int, default=512, help="bytes per window (default: 512)")
    demo.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="bits per byte (and perplexity per token) on WikiText-2 test.txt, float or "
                        "quantized, vs the float model")
    ev.add_argument("model", help=_model_arg_help() + " (byte-level, or with its tokenizer.json), or a checkpoint "
                    "directory from `quantize`")
    ev.add_argument("--recipe", choices=("none", *RECIPE_NAMES), default="quamba",
                    help="none (float), naive or quamba W8A8 (default: quamba)")
    ev.add_argument("--windows", type=int, default=64, help="evaluation windows, spread over test.txt (default: 64)")
    ev.add_argument("--text", type=Path, default=None, help="evaluation text file (default: WikiText-2 test.txt)")
    ev.add_argument("--reference", default=None,
                    help="for a quantized checkpoint: the float model to compare with (KL, top-1 agreement)")
    _add_calibration_args(ev)
    ev.set_defaults(func=cmd_eval)

    qz = sub.add_parser("quantize", help="calibrate on text, quantize to W8A8 and save a checkpoint directory")
    qz.add_argument("model", help=_model_arg_help() + " (byte-level, or with its tokenizer.json)")
    qz.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (replaced atomically)")
    qz.add_argument("--recipe", choices=RECIPE_NAMES, default="quamba", help="W8A8 recipe (default: quamba)")
    qz.add_argument("--fuse", action="store_true", help="also fuse each conv1d + SiLU into the int8 Triton kernel")
    _add_calibration_args(qz)
    qz.set_defaults(func=cmd_quantize)

    gen = sub.add_parser("generate", help="continue a prompt with a model or checkpoint (bytes or its tokenizer)")
    gen.add_argument("model", help=_model_arg_help() + ", or a checkpoint directory from `quantize`")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens (bytes for byte-level models) to "
                     "generate (default: 64)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: 50)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--kernels", action="store_true",
                     help="a quantized checkpoint on the W8A8 kernels with a decode cache (greedy)")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="with --kernels: cpu or cuda (default: cuda when available)")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="time a forward pass (prefill) of a model or checkpoint")
    bench.add_argument("model", help=_model_arg_help() + ", or a checkpoint directory from `quantize`")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    bench.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    bench.add_argument("--repeats", type=int, default=5, help="timed repetitions (default: 5)")
    bench.add_argument("--kernels", action="store_true",
                       help="lower a quantized checkpoint to the W8A8 kernels first, and time cached decode")
    bench.add_argument("--decode-steps", type=int, default=32, help="with --kernels: decode steps to time (default: 32)")
    bench.set_defaults(func=cmd_bench)

    d = sub.add_parser("dump", help="print or write the captured graph as text, json, dot or svg")
    d.add_argument("model", help=_model_arg_help())
    d.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    d.add_argument("--block", type=int, default=None, help="only the nodes of this block")
    d.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    d.add_argument("--device", default=None,
                   help="where to build the model: 'meta' (shapes only; default for built-in names) or 'cpu'")
    d.add_argument("--batch", type=int, default=1, help="batch of the example input for shapes (default: 1)")
    d.add_argument("--seq-len", type=int, default=8, help="length of the example input for shapes (default: 8)")
    d.add_argument("--kernels", action="store_true",
                   help="dump a quantized checkpoint lowered to the kernel ops (adds a kernel column)")
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
