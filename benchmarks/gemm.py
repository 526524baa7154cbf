"""Benchmark the W8A8 GEMM kernel (`int8_gemm`) against cuBLAS fp16 and `torch._int_mm` on Mamba shapes.

    python benchmarks/gemm.py [--json PATH] [--out {int8,fp16,fp32}] [--m 1 16 2048 16384]
                              [--only SUBSTRING] [--no-graph] [--profile]

Needs a CUDA device. For each Linear of Mamba-130m and -2.8b (K -> N) and each M (tokens: 1 and
16 are decode batches, 2048 and 16384 prefill), it times (median of triton.testing.do_bench, which
flushes L2 between repetitions, as a model's next layer would have):

* ours      -- `int8_gemm` with per-channel weight scales and a bias, int8 output by default
               (`--out`), i.e. GEMM + dequantize + bias + requantize in one kernel;
* fp16      -- `F.linear` in fp16 with bias (cuBLAS), what the unquantized model runs;
* int_mm    -- `torch._int_mm` (cuBLASLt int8 -> int32, no epilogue at all), where its shape
               rules allow (M > 16, K and N multiples of 8); "n/a" otherwise.

Each is timed twice: eagerly (the Python call, host launch cost included: it dominates at small M
and can even show at M = 2048 when the host is slower than the L2 flush do_bench runs between
calls) and replayed from a CUDA graph ("gr", the GPU time of the kernels alone). It also reports
the host microseconds per call of our wrapper, of its validation alone and of the bare Triton
launch (`--profile` adds a cProfile of the wrapper).

TOP/s counts 2 * M * N * K operations for every row, from graph times. Speedups are fp16 time /
ours time. The check compares ours with the reference (`torch.ops.quamba.int8_linear`) on the
first 256 rows: the kernel is expected to be bit-exact, and must be within one int8 step.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

import torch
from gpu_timing import graphed, require_gpu, time_all, write_json
import torch.nn.functional as F

# name -> (K, N) of nn.Linear(K, N), Mamba's per-block projections.
SHAPES = {
    "130m in_proj": (768, 3072),
    "130m x_proj": (1536, 80),
    "130m dt_proj": (48, 1536),
    "130m out_proj": (1536, 768),
    "2.8b in_proj": (2560, 10240),
    "2.8b x_proj": (5120, 192),
    "2.8b dt_proj": (160, 5120),
    "2.8b out_proj": (5120, 2560),
}
DEFAULT_M = [1, 16, 2048, 16384]
CHECK_ROWS = 256
DEVICE = "cuda"
OUT_DTYPES = {"int8": torch.int8, "fp16": torch.float16, "fp32": torch.float32}


def _int_mm_ok(M: int, K: int, N: int) -> bool:
    # torch._int_mm's CUDA rules (cuBLASLt): M > 16, K and N multiples of 8 (and K >= 16).
    return M > 16 and K % 8 == 0 and N % 8 == 0 and K >= 16


def bench_one(name: str, M: int, K: int, N: int, out: str, graph: bool, gen: torch.Generator) -> Dict:
    from quamba_fx.kernels.gemm import int8_gemm, int8_gemm_reference

    dev = DEVICE
    x_q = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=gen).to(dev)
    w_q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen).to(dev)
    x_scale = torch.tensor(0.02, device=dev)
    w_scale = (torch.rand(N, generator=gen) * 1e-3 + 1e-4).to(dev)
    bias = torch.randn(N, generator=gen).to(dev)
    rows = min(M, CHECK_ROWS)
    out_scale = None
    if out == "int8":
        # A realistic (static, calibrated) output scale: max |y| maps to 127.
        y = int8_gemm_reference(x_q[:rows], x_scale, w_q, w_scale, bias)
        out_scale = (y.abs().amax() / 127).reshape(()).float()
    kw = dict(out_scale=out_scale) if out == "int8" else dict(out_dtype=OUT_DTYPES[out])

    # Correctness first (also autotunes this shape).
    got = int8_gemm(x_q, x_scale, w_q, w_scale, bias, **kw)[:rows]
    want = int8_gemm_reference(x_q[:rows], x_scale, w_q, w_scale, bias, **kw)
    if got.dtype == torch.int8:
        diff = (got.int() - want.int()).abs()
    else:
        diff = (got.float() - want.float()).abs()
    check = {"n_diff": int((diff != 0).sum()), "max_abs_diff": float(diff.max()), "numel": diff.numel(),
             "int8": got.dtype == torch.int8,
             "max_rel_diff": float(diff.max() / want.float().abs().max().clamp_min(1e-30))}

    x16 = torch.randn(M, K, generator=gen).to(dev, torch.float16)
    w16 = (torch.randn(N, K, generator=gen) * K ** -0.5).to(dev, torch.float16)
    b16 = bias.half()
    w_t = w_q.t()  # [K, N] column-major view: cuBLASLt's preferred int8 B layout, no copy

    fns: Dict[str, Optional[Callable[[], object]]] = {
        "ours": lambda: int8_gemm(x_q, x_scale, w_q, w_scale, bias, **kw),
        "fp16": lambda: F.linear(x16, w16, b16),
        "int_mm": (lambda: torch._int_mm(x_q, w_t)) if _int_mm_ok(M, K, N) else None,
    }
    if graph:
        for key in list(fns):
            fns[key + " graph"] = graphed(fns[key]) if fns[key] is not None else None
    host_us = _host_us(fns["ours"]) if M == 1 else None
    return {"name": name, "M": M, "K": K, "N": N, "out": out, "check": check, "ms": time_all(fns, rep=100),
            "host_us_per_call": host_us}


def _host_us(fn: Callable[[], object], calls: int = 300) -> float:
    """CPU time of one call (validation + launch), the GPU being fast enough not to back up."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def launch_overhead(gen: torch.Generator, profile: bool) -> Dict[str, float]:
    """Host microseconds per call at M = 1 (2.8b out_proj): our wrapper, its validation alone,
    the bare Triton launch of the tuned kernel, and cuBLAS fp16 for scale."""
    import triton

    from quamba_fx.kernels import gemm

    dev = DEVICE
    K, N = SHAPES["2.8b out_proj"]
    x_q = torch.randint(-128, 128, (1, K), dtype=torch.int8, generator=gen).to(dev)
    w_q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen).to(dev)
    xs, ws = torch.tensor(0.02, device=dev), torch.rand(N, generator=gen).to(dev) * 1e-3
    b, os_ = torch.randn(N, generator=gen).to(dev), torch.tensor(0.5, device=dev)
    out = torch.empty(1, N, dtype=torch.int8, device=dev)
    x16, w16 = x_q.half(), w_q.half()

    gemm.int8_gemm(x_q, xs, w_q, ws, b, os_)  # tunes, and records the config for the fast path
    meta = next(v for key, v in gemm._TUNED.items() if key[:3] == (N, K, 1))
    grid = (triton.cdiv(N, meta["BLOCK_N"]),)

    def bare():
        gemm._int8_gemm_jit[grid](
            x_q, w_q, xs, ws, b, os_, out, 1, N, K, 1, K, K, N,
            W_PER_CHANNEL=True, HAS_BIAS=True, OUT_MODE=0, OUT_PER_CHANNEL=False, enable_fp_fusion=False,
            **meta, EVEN_K=K % meta["BLOCK_K"] == 0)

    res = {
        "int8_gemm": _host_us(lambda: gemm.int8_gemm(x_q, xs, w_q, ws, b, os_)),
        "validation only": _host_us(lambda: gemm._validate(x_q, xs, w_q, ws, b, os_, None)),
        "bare jit launch": _host_us(bare),
        "fp16 F.linear": _host_us(lambda: torch.nn.functional.linear(x16, w16)),
    }
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            gemm.int8_gemm(x_q, xs, w_q, ws, b, os_)
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return res


def _tops(r: Dict, ms: Optional[float]) -> str:
    if not ms:
        return "n/a"
    return f"{2 * r['M'] * r['N'] * r['K'] / (ms * 1e-3) / 1e12:.1f}"


def _fmt_ms(ms: Optional[float]) -> str:
    return "n/a" if ms is None else f"{ms:.4f}"


def _check_ok(r: Dict) -> bool:
    c = r["check"]
    # int8: one step (the documented GPU tolerance); floats: relative to the output's magnitude.
    return c["max_abs_diff"] <= 1 if c["int8"] else c["max_rel_diff"] <= 1e-5


def _print_table(results: List[Dict]) -> None:
    print("Eager: the Python call as a model makes it (host launch cost included, visible at small M).")
    print("Graph: replayed from a CUDA graph, the kernel's GPU time; TOP/s and 'x fp16 gr' use it.\n")
    head = (f"{'shape':15} {'M':>6} {'K':>5} {'N':>6} | {'ours':>8} {'fp16':>8} | {'ours gr':>8} {'fp16 gr':>8} "
            f"{'int_mm gr':>9} | {'ours TOP/s':>10} {'fp16 TF/s':>9} {'int_mm':>7} | {'x fp16':>6} {'x fp16 gr':>9} "
            f"| check")
    print(head)
    print("-" * len(head))
    for r in results:
        ms = r["ms"]
        ours, fp16, og, fg = ms.get("ours"), ms.get("fp16"), ms.get("ours graph"), ms.get("fp16 graph")
        ig = ms.get("int_mm graph", ms.get("int_mm"))
        speed = f"{fp16 / ours:6.2f}" if ours and fp16 else "   n/a"
        speed_g = f"{fg / og:9.2f}" if og and fg else "      n/a"
        c = r["check"]
        status = "OK" if _check_ok(r) else "FAIL"
        print(f"{r['name']:15} {r['M']:>6} {r['K']:>5} {r['N']:>6} | {_fmt_ms(ours):>8} {_fmt_ms(fp16):>8} | "
              f"{_fmt_ms(og):>8} {_fmt_ms(fg):>8} {_fmt_ms(ig):>9} | "
              f"{_tops(r, og or ours):>10} {_tops(r, fg or fp16):>9} {_tops(r, ig):>7} | {speed} {speed_g} | "
              f"{status} {c['n_diff']}/{c['numel']} differ (max {c['max_abs_diff']:g})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--out", choices=sorted(OUT_DTYPES), default="int8",
                        help="our output: int8 (requantized with a calibrated out_scale, default) or a float")
    parser.add_argument("--m", type=int, nargs="+", default=DEFAULT_M, metavar="M", help="token counts to time")
    parser.add_argument("--only", metavar="SUBSTRING", help="only shapes whose name contains this, e.g. 2.8b")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (kernel-only) timings")
    parser.add_argument("--profile", action="store_true", help="also cProfile 300 host calls of int8_gemm at M=1")
    args = parser.parse_args(argv)

    dev_name = require_gpu("gemm.py")
    import triton

    print(f"device: {dev_name}  torch {torch.__version__}  triton {triton.__version__}  out={args.out}\n")
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, (K, N) in SHAPES.items():
        if args.only and args.only not in name:
            continue
        for M in args.m:
            results.append(bench_one(name, M, K, N, args.out, not args.no_graph, gen))
            r = results[-1]
            print(f"  done {name} M={M}: ours {_fmt_ms(r['ms'].get('ours'))} ms", file=sys.stderr, flush=True)
    print()
    _print_table(results)
    overhead = launch_overhead(gen, args.profile)
    print("\nhost us per call at M=1 (2.8b out_proj): "
          + ", ".join(f"{k} {v:.1f}" for k, v in overhead.items()))

    if args.json:
        write_json(args.json, dev_name, {"out": args.out}, results=results, host_us=overhead)
        print(f"\nwrote {args.json}")
    return 0 if all(_check_ok(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
