"""What each `quamba-fx` command does; `cli.py` parses and validates the arguments, then calls these.

Every command takes the parsed `argparse.Namespace` and returns the exit code. Problems with the
model, the data or the environment raise `QuambaError` subclasses; `cli.main` prints them as one line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.fx

from .arch import arch_of
from .capture import annotate_shapes, capture
from .checkpoint import from_pretrained, is_quamba_checkpoint
from .dump import dump, write_dump
from .errors import InputError
from .graph_info import block, is_kind, op_name
from .graph_meta import graph_meta
from .evaluate import EvalResult, evaluate
from .flows import fuse, lower, quantize
from .models import BUILTIN_SHAPES, load_model
from .passes.verify import verify_topology
from .recipe import make_recipe
from .text import ByteCodec, TextCodec, graph_codec, source_codec, text_windows
from .textdata import find_wikitext


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


def _module_shape(module: torch.nn.Module) -> str | None:
    """`in->out` for a Linear (float or quantized), `channels x k` for a Conv1d, None otherwise."""
    if isinstance(module, torch.nn.Conv1d):
        return f"{module.out_channels} x {module.kernel_size[0]}"
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return f"{module.in_features}->{module.out_features}"
    return None


def _print_block_summary(gm: torch.fx.GraphModule) -> None:
    per_block = Counter(block(n) for n in gm.graph.nodes if block(n) is not None)
    arch, prefix = arch_of(gm), graph_meta(gm).prefix
    # The block's Linear and Conv1d roles, in the architecture's dataflow order.
    first = arch.block_path(prefix, min(per_block, default=0))
    columns = [(role, path) for role, path in arch.modules
               if path and _module_shape(gm.get_submodule(f"{first}.{path}")) is not None]
    widths = [max(len(role), 15) for role, _ in columns]
    print(f"{'block':>5}  {'nodes':>5}  " + "  ".join(f"{role:>{w}}" for (role, _), w in zip(columns, widths)))
    for b in sorted(per_block):
        path = arch.block_path(prefix, b)
        shapes = [_module_shape(gm.get_submodule(f"{path}.{inner}")) for _, inner in columns]
        print(f"{b:>5}  {per_block[b]:>5}  " + "  ".join(f"{shape:>{w}}" for shape, w in zip(shapes, widths)))
    kinds = Counter(k for n in gm.graph.nodes for k in ("conv1d", "scan") if is_kind(gm, n, k))
    scan = next((op_name(n) for n in gm.graph.nodes if is_kind(gm, n, "scan")), "scan")
    print(f"graph: {len(gm.graph.nodes)} nodes, {kinds['conv1d']} conv1d, {kinds['scan']} {scan} ops")


def state_bytes(module: torch.nn.Module, float_bytes: int | None = None) -> int:
    """Bytes of the state dict, each shared tensor (tied embeddings) counted once; `float_bytes`
    counts wider floating-point tensors at that width (2 for "as if fp16"); narrower ones (e4m3
    weights) keep their own."""
    unique = {t.data_ptr(): t for t in module.state_dict().values()}.values()
    return sum(t.numel() * (min(float_bytes, t.element_size()) if float_bytes and t.is_floating_point()
                            else t.element_size())
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
    topology = arch_of(gm).topology
    print(f"topology verified: every block is {topology.producer} -> {topology.conv} -> {topology.consumer}, "
          f"no conv1d feeds a conv1d")
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
    recipe = graph_meta(qm).recipe or "float"
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
    qm.save_pretrained(args.out, overwrite=args.overwrite, tokenizer=codec)  # the checkpoint keeps the tokenizer
    print(f"quantized {args.model} with the {args.recipe} recipe on {calib.shape[0]} x {calib.shape[1]} {_unit(codec)} "
          f"in {time.perf_counter() - started:.1f} s{' (conv1d fused)' if args.fuse else ''}")
    print(f"wrote {args.out}: {state_bytes(qm) / 1e6:.2f} MB of tensors "
          f"(the float model: {state_bytes(model) / 1e6:.2f} MB as loaded, {state_bytes(model, float_bytes=2) / 1e6:.2f} MB as fp16)")
    return 0


def _lowered(gm: torch.fx.GraphModule, name: str) -> torch.fx.GraphModule:
    """`--kernels`: the graph lowered to the Triton kernel ops (quantized graphs only)."""
    if not graph_meta(gm).recipe:
        raise InputError(f"--kernels runs the quantized kernels: {name} is a float model; quantize it first "
                         "(quamba-fx quantize ... --out DIR) and pass the checkpoint directory")
    return lower(gm)


def _device(name: str | None) -> torch.device:
    """The `--device` of bench and generate; by default the GPU when one is visible, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _synchronized_seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def cmd_bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    gm = load_graph(args.model, device="cpu")
    if args.kernels:
        gm = _lowered(gm, args.model)
    gm = gm.to(device)
    vocab = graph_meta(gm).hf_config["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    recipe = graph_meta(gm).recipe
    kind = f"{recipe} kernels" if args.kernels else f"recipe {recipe or 'float'}"
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
    codec = source_codec(args.model, graph_meta(gm).hf_config["vocab_size"])
    started = time.perf_counter()
    if args.kernels:
        from .runtime import Generator

        if args.sample:
            raise InputError("--kernels decodes greedily; drop --sample (or --kernels)")
        device = _device(args.device)
        runner = Generator(_lowered(gm, args.model).to(device), batch_size=1)
        prompt = torch.tensor([codec.encode(args.prompt)], dtype=torch.long)
        if prompt.shape[1] == 0:
            raise InputError("prompt is empty: generation needs at least one token to continue")
        tokens = runner.generate(prompt, args.max_new_tokens)[0, prompt.shape[1]:].tolist()
        text = codec.decode(tokens)
        how = f"{graph_meta(gm).recipe} kernels on {device}, decode cache"
    else:
        text = generate_text(gm, args.prompt, args.max_new_tokens, do_sample=args.sample,
                             temperature=args.temperature if args.sample else None,
                             top_k=args.top_k if args.sample else None, seed=args.seed, tokenizer=codec)
        how = (f"recipe {graph_meta(gm).recipe or 'float'}; no decode cache: each step reruns "
               "the prefix (--kernels decodes from a cache)")
    elapsed = time.perf_counter() - started
    print(args.prompt + text)
    count = "" if isinstance(codec, ByteCodec) else f"{len(codec.encode(text))} tokens, "
    print(f"({count}{len(text.encode())} bytes in {elapsed:.1f} s, {how})", file=sys.stderr)
    return 0
