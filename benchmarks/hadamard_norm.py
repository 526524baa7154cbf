"""Benchmark the fused Hadamard + quantize and residual add + RMSNorm + quantize kernels.

    python benchmarks/hadamard_norm.py [--json PATH] [--shapes ROWSxN ...] [--no-graph] [--only hadamard|norm]

Needs a CUDA device. For each (rows, n) it times (median of triton.testing.do_bench, which flushes
L2 between repetitions), on an fp16 input `[rows, n]`:

Hadamard (n = d_inner, the scan output rotated before out_proj):
* ours        -- `hadamard_quantize(x, scale)` (int8 out);
* ours fp32   -- `hadamard_transform_triton(x)` (the same kernel, fp32 out: 2x the write traffic);
* reference   -- `hadamard_quantize_reference`: `torch.ops.quamba.hadamard` + `quamba.quantize`, eager;
* copy        -- `dst.copy_(src)` moving as many bytes as ours reads and writes, the ceiling.

Issue 13's target: the Hadamard "ours graph" row at >= 70% of copy for n = 5120.

Norm (n = H; x the block output, residual fp32):
* ours        -- `add_rmsnorm_quantize(x, residual, w, eps, scale)` (int8 out + fp32 residual out);
* ours fp16   -- the same without a scale (fp16 out: norm_f before lm_head);
* reference   -- `add_rmsnorm_quantize_reference`, eager PyTorch;
* copy        -- as above.

GB/s counts the bytes the fused kernel must move (Hadamard: 2 + 1 bytes per element; norm: x 2 +
residual 4 + residual out 4 + int8 1 = 11 bytes per element) for every row of a shape, so the column
compares times, not each implementation's own traffic; "% copy" is copy time / row time. The
"graph" rows replay the call from a CUDA graph, separating host launch cost from kernel time (it
dominates small shapes; the copy is timed the same way, so "% copy" of a graph row compares kernel
times). The copy bandwidth line (bytes read + written per second) is one 256 MiB copy, about the
traffic of the largest default shape: on the H200 here a 1 GiB copy read only ~2.8 TB/s where
copies of 0.1-0.3 GB read 3.5-3.9 TB/s, so "% copy" always uses a copy of the row's own size. Also checks the kernels against the references on the timed data
(int8 at most one step apart on rare .5 boundaries; fp32 transform to rtol 1e-5; residual exact).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Dict, List, Optional, Tuple

import torch
from gpu_timing import graphed, print_rows, require_gpu, time_all, time_ms, write_json

# Hadamard: n = d_inner of mamba-2.8b (5120), -130m (1536) and -790m (2560), rows = batch x length for
# 1 x 2048 and 8 x 2048 prefill. Norm: n = d_model (2560 for 2.8b, 768 for 130m).
HADAMARD_SHAPES: List[Tuple[int, int]] = [(2048, 5120), (16384, 5120), (2048, 1536), (16384, 1536), (16384, 2560)]
NORM_SHAPES: List[Tuple[int, int]] = [(16384, 2560), (16384, 768)]
DEVICE = "cuda"
EPS = 1e-5


def _parse_shape(text: str) -> Tuple[int, int]:
    try:
        rows, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxN (e.g. 16384x5120), got {text!r}") from None
    if rows < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"rows and n must be positive, got {text!r}")
    return rows, n


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _int8_check(got: torch.Tensor, want: torch.Tensor) -> Dict[str, int]:
    diff = (got.int() - want.int()).abs()
    return {"n_diff": int((diff != 0).sum()), "max_abs_diff": int(diff.max()) if diff.numel() else 0,
            "numel": diff.numel()}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    # Relative to |want| + the row's RMS: elements near zero are compared at the row's scale.
    rms = want.float().pow(2).mean(-1, keepdim=True).sqrt()
    return float(((got.float() - want.float()).abs() / (want.float().abs() + rms)).max())


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int = 2**28) -> float:
    """GB/s of a device-to-device copy of `nbytes` (read + written: 2 * nbytes moved), replayed
    from a CUDA graph after a warm-up that also brings the clocks up."""
    src = torch.empty(nbytes, dtype=torch.int8, device=DEVICE)
    dst = torch.empty_like(src)
    copy = graphed(functools.partial(dst.copy_, src))
    time_ms(copy, rep=50)  # warm-up: the first timing runs on idle clocks
    ms = time_ms(copy)
    del copy, src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_hadamard(rows: int, n: int, graph: bool, gen: torch.Generator) -> Dict:
    from quamba_fx.kernels.hadamard import (
        hadamard_quantize,
        hadamard_quantize_reference,
        hadamard_transform_reference,
        hadamard_transform_triton,
    )

    x = torch.randn(rows, n, generator=gen).to(DEVICE, torch.float16)
    # Outlier channels, which the rotation exists to spread.
    x[:, : max(1, n // 64)] *= 20
    y_ref = hadamard_transform_reference(x)
    scale = (y_ref.abs().amax() / 127).reshape(()).float()

    check = _int8_check(hadamard_quantize(x, scale), hadamard_quantize_reference(x, scale))
    check["transform_rel_err"] = _rel_err(hadamard_transform_triton(x), y_ref)
    del y_ref

    nbytes = rows * n * (2 + 1)
    src = torch.empty(nbytes // 2, dtype=torch.int8, device=DEVICE)  # read + write = nbytes
    dst = torch.empty_like(src)
    fns = {
        "ours": lambda: hadamard_quantize(x, scale),
        "ours fp32": lambda: hadamard_transform_triton(x),
        "reference": lambda: hadamard_quantize_reference(x, scale),
        "copy": lambda: dst.copy_(src),
    }
    if graph:
        fns["ours graph"] = graphed(fns["ours"])
        fns["copy"] = graphed(fns["copy"])
    return {"kernel": "hadamard_quantize", "shape": [rows, n], "bytes": nbytes, "check": check,
            "ms": time_all(fns)}


def bench_norm(rows: int, h: int, graph: bool, gen: torch.Generator) -> Dict:
    from quamba_fx.kernels.norm import add_rmsnorm_quantize, add_rmsnorm_quantize_reference

    x = torch.randn(rows, h, generator=gen).to(DEVICE, torch.float16)
    residual = (4 * torch.randn(rows, h, generator=gen)).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(h, generator=gen)).to(DEVICE)
    ref, ref_r = add_rmsnorm_quantize_reference(x, residual, weight, EPS, None, torch.float32)
    scale = (ref.abs().amax() / 127).reshape(()).float()

    q, r = add_rmsnorm_quantize(x, residual, weight, EPS, scale)
    check = _int8_check(q, add_rmsnorm_quantize_reference(x, residual, weight, EPS, scale)[0])
    check["residual_exact"] = bool(torch.equal(r, ref_r))
    check["normed_rel_err"] = _rel_err(add_rmsnorm_quantize(x, residual, weight, EPS, None, torch.float32)[0], ref)
    del ref, ref_r, q, r

    nbytes = rows * h * (2 + 4 + 4 + 1)
    src = torch.empty(nbytes // 2, dtype=torch.int8, device=DEVICE)  # read + write = nbytes
    dst = torch.empty_like(src)
    fns = {
        "ours": lambda: add_rmsnorm_quantize(x, residual, weight, EPS, scale),
        "ours fp16": lambda: add_rmsnorm_quantize(x, residual, weight, EPS, None),
        "reference": lambda: add_rmsnorm_quantize_reference(x, residual, weight, EPS, scale),
        "copy": lambda: dst.copy_(src),
    }
    if graph:
        fns["ours graph"] = graphed(fns["ours"])
        fns["copy"] = graphed(fns["copy"])
    return {"kernel": "add_rmsnorm_quantize", "shape": [rows, h], "bytes": nbytes, "check": check,
            "ms": time_all(fns)}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _check_ok(check: Dict) -> bool:
    ok = check["max_abs_diff"] <= 1 and check["n_diff"] <= 1 + check["numel"] // 1000
    if "transform_rel_err" in check:
        ok = ok and check["transform_rel_err"] <= 1e-5
    if "normed_rel_err" in check:
        ok = ok and check["normed_rel_err"] <= 1e-5 and check["residual_exact"]
    return ok


def _print_table(results: List[Dict]) -> None:
    order = ["ours", "ours graph", "ours fp32", "ours fp16", "reference", "copy"]
    print(f"{'kernel':21} {'shape (rows,n)':>15} {'impl':>11} {'ms':>10} {'GB/s':>9} {'% copy':>7}")
    for r in results:
        print_rows(r["kernel"], r["shape"], r["ms"], order, r["bytes"], (21, 15, 11))
        c = r["check"]
        extra = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                          if k not in ("n_diff", "max_abs_diff", "numel"))
        print(f"{'':21} {'':>15} {'check':>11} {'OK' if _check_ok(c) else 'FAIL'}: {c['n_diff']}/{c['numel']} "
              f"int8 differ (max |diff| {c['max_abs_diff']}); {extra}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--shapes", metavar="ROWSxN", nargs="+", type=_parse_shape,
                        help="(rows, n) pairs to time, e.g. 16384x5120 (default: Hadamard "
                        + " ".join(f"{r}x{n}" for r, n in HADAMARD_SHAPES) + "; norm "
                        + " ".join(f"{r}x{n}" for r, n in NORM_SHAPES) + ")")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay rows")
    parser.add_argument("--only", choices=["hadamard", "norm"], help="time one kernel only")
    args = parser.parse_args(argv)

    dev_name = require_gpu("hadamard_norm.py")
    import triton

    print(f"device: {dev_name}  torch {torch.__version__}  triton {triton.__version__}\n")
    copy_gbs = copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    results = []
    for kernel, bench, default in (("hadamard", bench_hadamard, HADAMARD_SHAPES), ("norm", bench_norm, NORM_SHAPES)):
        if args.only not in (None, kernel):
            continue
        for rows, n in args.shapes or default:
            results.append(bench(rows, n, not args.no_graph, gen))
            torch.cuda.empty_cache()
    print(f"copy bandwidth (256 MiB device-to-device, read + write): {copy_gbs:.0f} GB/s\n")
    _print_table(results)

    if args.json:
        write_json(args.json, dev_name, copy_GBps=copy_gbs, results=results)
        print(f"\nwrote {args.json}")
    return 0 if all(_check_ok(r["check"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
