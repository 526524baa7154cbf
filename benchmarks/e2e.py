"""End-to-end W8A8 on the GPU: prefill latency, decode throughput, memory, and GPU accuracy.

    python benchmarks/e2e.py [--models mamba-130m mamba-2.8b] [--json PATH] [--no-compile] [--no-hf]

Needs CUDA. For each model shape (random weights, seeded; in/x/out_proj drawn as mamba_ssm does so
activations look like a trained model's), all in one run:

* prefill ms at (B, L) = (1, 128), (1, 2048), (8, 2048) for: HF `transformers` fp16 eager (its
  torch fallback path: no mamba_ssm kernels on the image), our captured graph in fp16 under
  `torch.compile` (Inductor; the scan is our Triton kernel in float mode), our W8A8 lowered graph
  called from Python and replayed from a CUDA graph ("w8a8 vs compile" uses the plain call);
* decode tokens/s at batch 1 and 16: HF fp16 eager with its cache (`generate`), our W8A8 graph with
  the cache, plain calls and CUDA-graph replay;
* peak GPU memory of each prefill and the bytes of the weights (parameters + buffers);
* accuracy: bits per byte of the packaged `mamba-bytes-wt2` on WikiText-2 test.txt, the CPU reference
  W8A8 graph vs the lowered GPU graph on the same windows, and whether cached greedy decoding on
  the GPU reproduces the reference's tokens.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from gpu_timing import write_json

PREFILL_SHAPES = [(1, 128), (1, 2048), (8, 2048)]
DECODE_BATCHES = [1, 16]
DECODE_STEPS = 64
DEVICE = "cuda"  # --smoke runs the script's logic on CPU with tiny shapes (no timings worth reading)
_STARTED = time.perf_counter()


def log(msg: str) -> None:
    """Progress with the seconds since start: the run must fit a device time limit."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {msg}", flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _fail(msg: str) -> None:
    print(f"benchmarks/e2e.py: {msg}", file=sys.stderr)
    sys.exit(2)


def time_ms(fn: Callable[[], object], budget_s: float = 1.0, max_reps: int = 20) -> float:
    """Median wall time of `fn` (synchronized) after one warm-up call; fewer reps for slow functions."""
    fn()
    sync()
    times = []
    spent = 0.0
    while len(times) < max_reps and (spent < budget_s or len(times) < 2):
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1e3)
        spent += times[-1] / 1e3
    return statistics.median(times)


def peak_mb(fn: Callable[[], object]) -> float:
    if DEVICE != "cuda":
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def random_model(name: str, device: str | None = None):
    """The seeded random `MambaForCausalLM` (`Mamba2ForCausalLM` for `mamba2-*`) of a built-in
    shape, its block Linears (in/x/out_proj; in/out_proj for Mamba-2) re-drawn on `device` (default:
    this script's) as mamba_ssm initialises them; benchmarks/reference.py times it too."""
    import quamba_fx
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    config = quamba_fx.builtin_config(name)
    model_class = Mamba2ForCausalLM if config.model_type == "mamba2" else MambaForCausalLM
    with torch.device(device or DEVICE):
        torch.manual_seed(0)
        model = model_class(config).eval()
        with torch.no_grad():
            for layer in model.backbone.layers:
                names = ("in_proj", "x_proj", "out_proj")
                for linear in (getattr(layer.mixer, n) for n in names if hasattr(layer.mixer, n)):
                    bound = 1.0 / linear.in_features ** 0.5
                    linear.weight.uniform_(-bound, bound)
    return model


def bench_model(name: str, compile_: bool, hf: bool) -> dict:
    import quamba_fx

    result: dict = {"model": name, "prefill": [], "decode": []}
    model = random_model(name)
    vocab = model.config.vocab_size
    started = time.perf_counter()
    calib = [torch.randint(0, vocab, (1, 256), device=DEVICE)]
    quantized = quamba_fx.quantize(model, calib, progress=False)
    lowered = quamba_fx.lower(quantized)
    del quantized
    result["quantize_s"] = time.perf_counter() - started
    log(f"{name}: quantized and lowered in {result['quantize_s']:.1f} s")
    model.half()
    result["weight_bytes"] = {"fp16": weight_bytes(model), "w8a8": weight_bytes(lowered)}
    fp16_graph = quamba_fx.capture(model)
    compiled = None
    if compile_:
        # One dynamic-shape compile serves the three prefill shapes: three static compiles of a
        # 64-block graph would take minutes of the device budget.
        compiled = torch.compile(fp16_graph, dynamic=True)
        result["compile_note"] = "torch.compile(capture(model.half()), dynamic=True); first call compiles"

    gc.collect()
    empty_cache()
    for batch, length in PREFILL_SHAPES:
        ids = torch.randint(0, vocab, (batch, length), device=DEVICE)
        row = {"shape": [batch, length], "ms": {}, "peak_mb": {}}
        impls = {"w8a8": lambda: lowered(ids)}
        if DEVICE == "cuda":
            # Prefill at B=1 issues ~8 kernels per block from Python; the replay shows the kernels'
            # own time, as a server replaying captured prefill shapes would see it.
            from gpu_timing import graphed

            impls["w8a8 cuda graph"] = graphed(lambda: lowered(ids))
        if compiled is not None:
            impls["fp16 compile"] = lambda: compiled(ids)
        if hf:
            impls["hf fp16 eager"] = lambda: model(ids, use_cache=False).logits
        with torch.no_grad():
            for impl, fn in impls.items():
                try:
                    slow = impl == "hf fp16 eager"
                    started = time.perf_counter()
                    row["ms"][impl] = time_ms(fn, budget_s=0.5 if slow else 1.0, max_reps=3 if slow else 20)
                    if not slow:  # the table shows peaks of ours and the compiled baseline only
                        row["peak_mb"][impl] = peak_mb(fn)
                    # The first call compiles and autotunes: its share of the run shows here.
                    log(f"  {impl} {batch}x{length}: {row['ms'][impl]:.2f} ms, "
                        f"{time.perf_counter() - started:.1f} s with warm-up")
                except Exception as exc:  # report and keep going: one failing baseline is a row
                    print(f"  [{name} {impl} {batch}x{length}] failed: {type(exc).__name__}: {exc}"[:400],
                          file=sys.stderr)
                    row["ms"][impl] = None
                empty_cache()
        result["prefill"].append(row)
        log(f"{name} prefill {batch}x{length}: " + ", ".join(
            f"{k} {v:.2f} ms" if v else f"{k} failed" for k, v in row["ms"].items()))

    for batch in DECODE_BATCHES:
        row = {"batch": batch, "tokens_per_s": {}}
        prompt = torch.randint(0, vocab, (batch, 16), device=DEVICE)
        modes = (("w8a8 cuda graph", True), ("w8a8 plain", False)) if DEVICE == "cuda" else (("w8a8 plain", False),)
        for impl, graph in modes:
            gen = quamba_fx.Generator(lowered, batch, cuda_graph=graph)
            row["tokens_per_s"][impl] = _decode_rate(gen, prompt)
        if hf:
            row["tokens_per_s"]["hf fp16 eager"] = _hf_decode_rate(model, prompt)
        result["decode"].append(row)
        log(f"{name} decode batch {batch}: " + ", ".join(
            f"{k} {v:.0f} tok/s" for k, v in row["tokens_per_s"].items() if v))
    return result


@torch.no_grad()
def _decode_rate(gen, prompt: torch.Tensor) -> float:
    logits = gen.prefill(prompt)[:, -1]
    token = logits.argmax(-1)
    for _ in range(3):  # warm-up: capture / autotune
        token = gen.decode(token).argmax(-1)
    sync()
    started = time.perf_counter()
    for _ in range(DECODE_STEPS):
        token = gen.decode(token).argmax(-1)
    sync()
    return prompt.shape[0] * DECODE_STEPS / (time.perf_counter() - started)


@torch.no_grad()
def _hf_decode_rate(model, prompt: torch.Tensor) -> float | None:
    def run(n: int) -> float:
        sync()
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                       pad_token_id=0)
        sync()
        return time.perf_counter() - started

    try:
        run(2)
        short, long = run(1), run(1 + 16)
        return prompt.shape[0] * 16 / (long - short)
    except Exception as exc:
        print(f"  [hf decode] failed: {type(exc).__name__}: {exc}"[:400], file=sys.stderr)
        return None


@torch.no_grad()
def accuracy(windows: int, seq_len: int, new_tokens: int) -> dict:
    """CPU reference W8A8 vs the lowered GPU graph on mamba-bytes-wt2, and cached greedy decoding.

    Both lowerings are checked: fp16 between kernels (the default, what the speed rows run) and
    fp32 between kernels (`lower(qm, dtype=torch.float32)`, the exact option).
    """
    import quamba_fx
    from quamba_fx import textdata

    model = quamba_fx.load_model("mamba-bytes-wt2")
    test = textdata.load_bytes(textdata.find_wikitext("test"))
    valid = textdata.load_bytes(textdata.find_wikitext("valid"))
    held_out = textdata.chunk_sequences(test, seq_len, num_sequences=windows)
    calib = textdata.chunk_sequences(valid, 512, num_sequences=16)
    quantized = quamba_fx.quantize(model, calib.split(8), progress=False)
    cpu = quamba_fx.evaluate(quantized, held_out, batch_size=8, progress=False)
    prompt = held_out[:1, :seq_len // 2]
    ref_tokens = prompt.clone()
    for _ in range(new_tokens):  # the reference: full recompute on CPU
        ref_tokens = torch.cat([ref_tokens, quantized(ref_tokens)[:, -1:].argmax(-1)], dim=1)
    result = {"windows": windows, "seq_len": seq_len, "cpu_reference_bpb": cpu.bits_per_byte,
              "greedy_tokens": new_tokens,
              "reference_text": bytes(ref_tokens[0, prompt.shape[1]:].tolist()).decode("utf-8", "replace")}
    for dtype in (torch.float16, torch.float32):
        lowered = quamba_fx.lower(quantized, dtype=dtype).to(DEVICE)
        gpu = quamba_fx.evaluate(lowered, held_out, batch_size=8, progress=False, device=DEVICE)
        gen_tokens = quamba_fx.Generator(lowered, 1).generate(prompt.to(DEVICE), new_tokens).cpu()
        first_diff = next((i - prompt.shape[1] for i in range(prompt.shape[1], ref_tokens.shape[1])
                           if ref_tokens[0, i] != gen_tokens[0, i]), None)
        margin = None
        if first_diff is not None:  # how close the reference's own choice was at that step
            logits = quantized(ref_tokens[:, :prompt.shape[1] + first_diff])[0, -1].float()
            top2 = logits.topk(2).values
            margin = float(top2[0] - top2[1])
        result[str(dtype).removeprefix("torch.")] = {
            "gpu_lowered_bpb": gpu.bits_per_byte,
            "relative_difference": gpu.bits_per_byte / cpu.bits_per_byte - 1,
            "greedy_equal": first_diff is None, "first_difference_at": first_diff,
            "reference_logit_margin_there": margin,
            "generated_text": bytes(gen_tokens[0, prompt.shape[1]:].tolist()).decode("utf-8", "replace"),
        }
        del lowered
    return result


def print_tables(results: list[dict], acc: dict | None) -> None:
    print("\nPrefill latency (ms; lower is better) and peak memory above the weights (MB)")
    print(f"{'model':<11} {'B x L':>9} {'hf fp16 eager':>14} {'fp16 compile':>13} {'w8a8':>9} {'w8a8 graph':>11} "
          f"{'w8a8 vs compile':>16} {'peak MB fp16c / w8a8':>21}")
    for r in results:
        for row in r["prefill"]:
            ms = row["ms"]
            cell = lambda k: f"{ms[k]:.2f}" if ms.get(k) else "-"  # noqa: E731
            speed = f"{ms['fp16 compile'] / ms['w8a8']:.2f}x" if ms.get("fp16 compile") and ms.get("w8a8") else "-"
            peak = row["peak_mb"]
            peaks = f"{peak.get('fp16 compile', 0):.0f} / {peak.get('w8a8', 0):.0f}"
            print(f"{r['model']:<11} {row['shape'][0]:>3} x {row['shape'][1]:<4} {cell('hf fp16 eager'):>14} "
                  f"{cell('fp16 compile'):>13} {cell('w8a8'):>9} {cell('w8a8 cuda graph'):>11} {speed:>16} {peaks:>21}")
    print("\nDecode throughput (tokens/s; higher is better)")
    print(f"{'model':<11} {'batch':>5} {'hf fp16 eager':>14} {'w8a8 plain':>11} {'w8a8 cuda graph':>16} {'vs hf':>7}")
    for r in results:
        for row in r["decode"]:
            t = row["tokens_per_s"]
            cell = lambda k: f"{t[k]:.0f}" if t.get(k) else "-"  # noqa: E731
            best = t.get("w8a8 cuda graph") or t.get("w8a8 plain")
            ratio = f"{best / t['hf fp16 eager']:.1f}x" if best and t.get("hf fp16 eager") else "-"
            print(f"{r['model']:<11} {row['batch']:>5} {cell('hf fp16 eager'):>14} {cell('w8a8 plain'):>11} "
                  f"{cell('w8a8 cuda graph'):>16} {ratio:>7}")
    print("\nWeights")
    for r in results:
        wb = r["weight_bytes"]
        print(f"{r['model']:<11} fp16 {wb['fp16'] / 1e9:.3f} GB, w8a8 {wb['w8a8'] / 1e9:.3f} GB "
              f"({wb['w8a8'] / wb['fp16']:.3f}x)")
    if acc:
        print(f"\nAccuracy, mamba-bytes-wt2, {acc['windows']} x {acc['seq_len']} bytes of test.txt: CPU reference "
              f"{acc['cpu_reference_bpb']:.5f} bits/byte")
        for dtype in ("float16", "float32"):
            a = acc[dtype]
            greedy = ("equals the reference" if a["greedy_equal"] else
                      f"differs from byte {a['first_difference_at']} on (reference top-2 logit margin there "
                      f"{a['reference_logit_margin_there']:.3f})")
            print(f"  lowered, {dtype} between kernels, on {DEVICE}: {a['gpu_lowered_bpb']:.5f} bits/byte "
                  f"({a['relative_difference']:+.4%}); cached greedy decode of {acc['greedy_tokens']} bytes {greedy}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mamba-130m", "mamba-2.8b"],
                        help="model shapes to time (none: only the accuracy check)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--no-compile", action="store_true", help="skip the fp16 torch.compile baseline")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF fp16 eager baseline")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--accuracy-windows", type=int, default=32)
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU with mamba-tiny and tiny shapes (kernel references)")
    args = parser.parse_args(argv)
    global DEVICE, PREFILL_SHAPES, DECODE_BATCHES, DECODE_STEPS
    if args.smoke:
        DEVICE, PREFILL_SHAPES, DECODE_BATCHES, DECODE_STEPS = "cpu", [(1, 8), (2, 16)], [1, 2], 3
        args.models, args.accuracy_windows = ["mamba-tiny"], 2
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        _fail("TRITON_INTERPRET=1 is set; unset it, the benchmark must run compiled kernels")
    elif not torch.cuda.is_available():
        _fail("no CUDA device found; this benchmark needs a GPU")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import triton
    import transformers

    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    print(f"device: {device}  torch {torch.__version__}  triton {triton.__version__}  "
          f"transformers {transformers.__version__}", flush=True)
    acc = None if args.no_accuracy else accuracy(args.accuracy_windows, 64 if args.smoke else 512,
                                                 4 if args.smoke else 64)
    if acc:
        log(f"accuracy: {acc}")
    results: list[dict] = []

    def save() -> None:
        # Written after every model, so a run cut short by a time limit keeps what it measured.
        if args.json:
            write_json(args.json, device, {"transformers": transformers.__version__}, results=results, accuracy=acc)

    save()
    for name in args.models:
        results.append(bench_model(name, not args.no_compile, not args.no_hf))
        save()
        gc.collect()  # the model's locals are gone: give its memory back before the next one
        empty_cache()
    print_tables(results, acc)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
