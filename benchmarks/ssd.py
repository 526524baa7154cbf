"""Mamba-2's scan (SSD) alone: our Triton kernels (`quamba_fx/kernels/ssd.py`) against mamba_ssm's
Triton SSD, on mamba2-2.7b's scan shapes; prefill and decode steps.

    python benchmarks/ssd.py [--shapes 1,2048 8,2048] [--decode-batches 1 16 64] [--json PATH]
        [--commit SHA] [--kernels] [--launch KERNEL.KEY=V1,V2 ...] [--smoke]

Prefill rows, each a CUDA-graph replay median (ms) and the output's error against the fp32 PyTorch
reference on the same inputs (max |diff| / max |reference|):

* `ours_fp16`: fp16 x, dt, B, C (an fp16 model's), fp16 products, fp16 y;
* `ours_lowered`: the same values as int8 codes with per-tensor scales, fp16 products and fp16 y,
  what a W8A8 graph lowered to fp16 runs (its error against the reference of the dequantized codes);
* `ours_lowered_channel`: the same with x's codes and scales per channel, as Quamba2's recipes
  quantize x (the kernels' PER_CHANNEL_X path; its time does not depend on the values, call 41c);
* `reference_op`: `quamba::ssd_scan`'s PyTorch reference on the fp32 inputs, what an unlowered
  graph runs on CUDA;
* `mamba_ssm`: `mamba_chunk_scan_combined`, what mamba_ssm's Mamba-2 runs, on the fp16 inputs.

Decode rows (one token a sequence, from an fp16 state): ours `ssd_state_update` against mamba_ssm's
`selective_state_update` with its Mamba-2 layouts (A, dt, D broadcast over head_dim), each
updating a copy of the same state; us a step and the state's error after 8 steps against the
reference recurrence.

`--kernels` adds each prefill implementation's time per kernel (torch.profiler) to its row.
`--launch scan.num_warps=4,8` (repeatable: every combination is a variant) times ours under each
value of `quamba_fx.kernels.ssd.LAUNCH`'s settings (prefill rows only, after the default's full
rows), the sweep that chose the defaults. Needs a CUDA device; mamba_ssm from `.anchors/` (see
../shared/anchors/README.md), else ours alone. `--smoke` runs tiny shapes on CPU under
TRITON_INTERPRET=1 (timings mean nothing there; the code paths and the JSON run).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_timing (also when a test imports this file)
from gpu_timing import graphed, kernel_ms, require_gpu, setting_grid, time_ms, write_json  # noqa: E402

# mamba2-2.7b: d_model 2560, 80 heads of 64 channels, one B/C group, state 128, chunk 256.
SHAPE = dict(heads=80, head_dim=64, groups=1, state=128, chunk=256)
SMOKE_SHAPE = dict(heads=4, head_dim=16, groups=2, state=16, chunk=16)
DECODE_CHECK_STEPS = 8


def make_inputs(batch: int, length: int, shape: dict, device: str, seed: int = 0) -> dict:
    """fp16 x, dt, B, C (as in_proj and the conv1d leave them in an fp16 model); fp32 A, D, dt_bias."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*dims, scale=1.0):
        return (torch.randn(*dims, generator=g, device=device) * scale).half()

    heads = shape["heads"]
    return dict(
        x=randn(batch, length, heads, shape["head_dim"]), dt=randn(batch, length, heads, scale=0.5),
        A=-torch.rand(heads, generator=g, device=device) * 8 - 1,
        B=randn(batch, length, shape["groups"], shape["state"]),
        C=randn(batch, length, shape["groups"], shape["state"]),
        D=torch.randn(heads, generator=g, device=device), dt_bias=torch.rand(heads, generator=g, device=device) - 4.0,
    )


def _int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor int8 codes of `t` and their fp32 scale (amax / 127), as the W8A8 recipe stores them."""
    scale = (t.float().abs().max() / 127).clamp(min=1e-12)
    return (t.float() / scale).round().clamp(-128, 127).to(torch.int8), scale


def _int8_per_channel(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of x `[batch, L, heads, head_dim]` with one fp32 scale per channel `[heads, head_dim]`."""
    scale = (t.float().abs().amax(dim=(0, 1)) / 127).clamp(min=1e-12)
    return (t.float() / scale).round().clamp(-128, 127).to(torch.int8), scale


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def _wall_ms(fn) -> float:
    # --smoke: one call after a warm-up, on the host clock (the interpreter has no device to time).
    fn()
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def load_mamba_ssm():
    """(mamba_chunk_scan_combined, selective_state_update), or (None, None) without mamba_ssm."""
    try:
        import anchors

        anchors.enable()
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as exc:
        print(f"benchmarks/ssd.py: mamba_ssm not available ({exc}); timing ours alone", file=sys.stderr)
        return None, None
    return mamba_chunk_scan_combined, selective_state_update


def prefill_row(batch: int, length: int, shape: dict, device: str, timer, theirs_fn, names=None,
                kernels: bool = False) -> dict:
    """One prefill row: each implementation's error and time (those in `names`, default all), with
    `kernels` also its time per kernel."""
    from quamba_fx.kernels import ssd
    from quamba_fx.ssd_reference import ssd_scan_reference

    kw = make_inputs(batch, length, shape, device)
    chunk = shape["chunk"]
    tail = (kw["D"], kw["dt_bias"], True, 0.0, math.inf, chunk)
    half = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], *tail)
    full = (kw["x"].float(), kw["dt"].float(), kw["A"], kw["B"].float(), kw["C"].float(), *tail)
    expected, _ = ssd_scan_reference(*full)
    codes, scales = zip(*(_int8(kw[k]) for k in ("x", "dt", "B", "C")))
    # x, dt, A, B, C of the int8 codes, dequantized
    dequantized_inputs = (*(q.float() * s for q, s in zip(codes[:2], scales[:2])), kw["A"],
                          *(q.float() * s for q, s in zip(codes[2:], scales[2:])))
    dequantized, _ = ssd_scan_reference(*dequantized_inputs, *tail)
    x_codes, x_scales = _int8_per_channel(kw["x"])
    channel_scales = (x_scales, *scales[1:])
    per_channel, _ = ssd_scan_reference(x_codes.float() * x_scales, *dequantized_inputs[1:], *tail)
    impls = {
        "ours_fp16": lambda: ssd.ssd_scan(*half, out_dtype=torch.float16),
        "ours_lowered": lambda: ssd.ssd_scan(codes[0], codes[1], kw["A"], codes[2], codes[3], *tail,
                                             product_dtype=torch.float16, input_scales=scales,
                                             out_dtype=torch.float16),
        "ours_lowered_channel": lambda: ssd.ssd_scan(x_codes, codes[1], kw["A"], codes[2], codes[3], *tail,
                                                     product_dtype=torch.float16, input_scales=channel_scales,
                                                     out_dtype=torch.float16),
        "reference_op": lambda: ssd_scan_reference(*full)[0],
    }
    references = {"ours_lowered": dequantized, "ours_lowered_channel": per_channel}
    if theirs_fn is not None:
        impls["mamba_ssm"] = lambda: theirs_fn(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, D=kw["D"],
                                               dt_bias=kw["dt_bias"], dt_softplus=True)
    row: dict = {"batch": batch, "L": length}
    for name, fn in impls.items():
        if names is not None and name not in names:
            continue
        row[f"{name}_error"] = relative_error(fn(), references.get(name, expected))
        row[f"{name}_ms"] = timer(fn)
        if kernels and name != "reference_op":
            row[f"{name}_kernels"] = kernel_ms(fn)
    if "mamba_ssm_ms" in row:
        row["ratio_fp16"] = row["mamba_ssm_ms"] / row["ours_fp16_ms"]
        row["ratio_lowered"] = row["mamba_ssm_ms"] / row["ours_lowered_ms"]
        row["ratio_lowered_channel"] = row["mamba_ssm_ms"] / row["ours_lowered_channel_ms"]
    return row


def decode_row(batch: int, shape: dict, device: str, timer, theirs_fn) -> dict:
    from quamba_fx.kernels import ssd
    from quamba_fx.ssd_reference import ssd_scan_reference

    heads, head_dim, n = shape["heads"], shape["head_dim"], shape["state"]
    kw = make_inputs(batch, DECODE_CHECK_STEPS, shape, device, seed=1)
    start = (torch.randn(batch, heads, head_dim, n, device=device) * 0.1).half()
    _, expected = ssd_scan_reference(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["dt_bias"],
                                     initial_state=start.float())

    def ours(state, t):
        return ssd.ssd_state_update(state, kw["x"][:, t:t + 1], kw["dt"][:, t:t + 1], kw["A"], kw["B"][:, t:t + 1],
                                    kw["C"][:, t:t + 1], kw["D"], kw["dt_bias"])

    impls = {"ours": ours}
    if theirs_fn is not None:
        # mamba_ssm's Mamba2.step layouts: A [h, p, n], dt [b, h, p], D and dt_bias [h, p], all
        # broadcast over head_dim with stride 0.
        A = kw["A"][:, None, None].expand(heads, head_dim, n)
        D, bias = (t[:, None].expand(heads, head_dim) for t in (kw["D"], kw["dt_bias"]))

        def theirs(state, t):
            return theirs_fn(state, kw["x"][:, t], kw["dt"][:, t, :, None].expand(batch, heads, head_dim), A,
                             kw["B"][:, t], kw["C"][:, t], D=D, dt_bias=bias, dt_softplus=True)

        impls["mamba_ssm"] = theirs
    row: dict = {"batch": batch}
    for name, step in impls.items():
        state = start.clone()
        for t in range(DECODE_CHECK_STEPS):
            step(state, t)
        row[f"{name}_state_error"] = relative_error(state, expected)
        timed_state = start.clone()
        row[f"{name}_us"] = timer(lambda: step(timed_state, 0)) * 1e3
    if "mamba_ssm_us" in row:
        row["ratio"] = row["mamba_ssm_us"] / row["ours_us"]
    return row


def parse_launch(text: str) -> tuple[str, str, list[int]]:
    """`KERNEL.KEY=V1,V2,...` -> (kernel, key, values), checked against `ssd.LAUNCH`."""
    from quamba_fx.kernels import ssd

    name, sep, values = text.partition("=")
    kernel, _, key = name.partition(".")
    if not sep or kernel not in ssd.LAUNCH or key not in ssd.LAUNCH[kernel]:
        raise ValueError(f"--launch {text!r}: expected KERNEL.KEY=V1,V2,... with KERNEL.KEY one of "
                         + ", ".join(f"{k}.{s}" for k, settings in ssd.LAUNCH.items() for s in settings))
    try:
        return kernel, key, [int(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--launch {text!r}: the values must be integers") from None


def _print_row(kind: str, row: dict) -> None:
    print(f"  {kind} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in row.items() if not k.endswith("_kernels")), flush=True)
    for key, per_kernel in row.items():
        if key.endswith("_kernels"):
            print(f"    {key[:-8]}: " + ", ".join(f"{name[:40]} {ms:.4g}" for name, ms in per_kernel.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["1,2048", "8,2048"], metavar="B,L")
    ap.add_argument("--decode-batches", nargs="*", type=int, default=[1, 16, 64])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--commit", default="", help="recorded in the JSON")
    ap.add_argument("--kernels", action="store_true", help="add each prefill implementation's time per kernel")
    ap.add_argument("--launch", action="append", default=[], metavar="KERNEL.KEY=V1,V2",
                    help="also time ours under these ssd.LAUNCH settings (repeatable: a grid)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    try:
        launch = [parse_launch(text) for text in args.launch]
    except ValueError as exc:
        ap.error(str(exc))
    try:
        shapes = [tuple(int(v) for v in text.split(",")) for text in args.shapes]
    except ValueError:
        shapes = []
    if any(len(shape) != 2 or min(shape) < 1 for shape in shapes) or any(b < 1 for b in args.decode_batches):
        ap.error(f"--shapes takes B,L pairs and --decode-batches positive integers, got {args.shapes} "
                 f"and {args.decode_batches}")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--smoke runs the kernels under the interpreter: set TRITON_INTERPRET=1")
        if args.kernels:
            ap.error("--kernels profiles CUDA kernels; the smoke run has none")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        device, where, shape, timer = "cpu", "cpu (smoke)", SMOKE_SHAPE, _wall_ms
        theirs_scan = theirs_update = None
        shapes = [(1, 40), (2, 24)]
        args.decode_batches = [1, 2]
    else:
        where, device, shape = require_gpu("ssd.py"), "cuda", SHAPE

        def timer(fn):
            return time_ms(graphed(fn))

        theirs_scan, theirs_update = load_mamba_ssm()

    result: dict = {"prefill": [], "decode": [], "launch": []}

    def save() -> None:
        if args.json:
            write_json(args.json, where, {"commit": args.commit, "shape": shape}, **result)

    print(f"{where}: SSD scan, {shape}; prefill ms per call, decode us per step (graph replays on CUDA)")
    for batch, length in shapes:
        result["prefill"].append(prefill_row(batch, length, shape, device, timer, theirs_scan, kernels=args.kernels))
        _print_row("prefill", result["prefill"][-1])
        save()
    for batch in args.decode_batches:
        result["decode"].append(decode_row(batch, shape, device, timer, theirs_update))
        _print_row("decode", result["decode"][-1])
        save()
    if launch:
        from quamba_fx.kernels import ssd

        saved = {kernel: dict(settings) for kernel, settings in ssd.LAUNCH.items()}
        try:
            for variant in setting_grid(launch):
                for (kernel, key), value in variant.items():
                    ssd.LAUNCH[kernel][key] = value
                label = ", ".join(f"{kernel}.{key}={value}" for (kernel, key), value in variant.items())
                for batch, length in shapes:
                    row = {"launch": label, **prefill_row(batch, length, shape, device, timer, None,
                                                          names=("ours_fp16", "ours_lowered"), kernels=args.kernels)}
                    result["launch"].append(row)
                    _print_row("prefill", row)
                    save()
        finally:
            for kernel, settings in saved.items():
                ssd.LAUNCH[kernel].clear()
                ssd.LAUNCH[kernel].update(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
