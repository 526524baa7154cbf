"""Benchmark the W8A8 GEMM kernel (`int8_gemm`) against cuBLAS fp16 and `torch._int_mm` on Mamba shapes.

    python benchmarks/gemm.py [--json PATH] [--out {int8,fp16,fp32}] [--m 1 16 2048 16384]
                              [--only SUBSTRING] [--no-graph] [--profile] [--variants] [--before FILE]
                              [--model-outs]

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

TOP/s counts 2 * M * N * K operations for every row, from graph times; wTB/s the weight bytes
streamed per second (int8 ours, fp16 cuBLAS), what bounds decode and short prompts. Speedups are fp16 time /
ours time. The check compares ours with the reference (`torch.ops.quamba.int8_linear`) on every
row: the kernel is expected to be bit-exact, and must be within one int8 step.

`--model-outs` gives each 2.8b shape the output the lowered model asks of it (in_proj, x_proj and
dt_proj int8 with a per-tensor out_scale, out_proj fp16; `--out` for the others). `--variants`
also times, graph-replayed and checked bit for bit on every row, each tile config of the
persistent TMA kernel (`quamba_fx.kernels.gemm_tma`, candidates plus one ablation: no loop
flattening) and, with `--ptr`, the pointer kernel of gemm.py forced on the
shape;
`--before FILE` adds the `int8_gemm` of another gemm.py (e.g. `git show REV:quamba_fx/kernels/
gemm.py > /tmp/gemm_before.py`), imported as a sibling of gemm.py, as "before". The variants'
kernels are compiled up front in parallel.
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
    # Mamba-2's in_proj (z, xBC and dt in one: 2 * 5120 + 2 * 128 + 80); its out_proj is 2.8b's.
    "2.7b in_proj": (2560, 10576),
}
DEFAULT_M = [1, 16, 2048, 16384]
CHECK_ROWS = 256  # rows that calibrate the int8 out_scale
# What the lowered 2.8b model asks of each projection (quamba_fx.passes.lower: int8 where the
# next kernel reads int8, fp16 before the residual add).
MODEL_OUTS = {"in_proj": "int8", "x_proj": "int8", "dt_proj": "int8", "out_proj": "fp16"}
DEVICE = "cuda"
OUT_DTYPES = {"int8": torch.int8, "fp16": torch.float16, "fp32": torch.float32}


def _int_mm_ok(M: int, K: int, N: int) -> bool:
    # torch._int_mm's CUDA rules (cuBLASLt): M > 16, K and N multiples of 8 (and K >= 16).
    return M > 16 and K % 8 == 0 and N % 8 == 0 and K >= 16


def _inputs(M: int, K: int, N: int, out: str, gen: torch.Generator) -> Dict:
    from quamba_fx.kernels.gemm import int8_gemm_reference

    dev = DEVICE
    x_q = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=gen).to(dev)
    w_q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen).to(dev)
    x_scale = torch.tensor(0.02, device=dev)
    w_scale = (torch.rand(N, generator=gen) * 1e-3 + 1e-4).to(dev)
    bias = torch.randn(N, generator=gen).to(dev)
    out_scale = None
    if out == "int8":
        # A realistic (static, calibrated) output scale: max |y| maps to 127.
        y = int8_gemm_reference(x_q[:CHECK_ROWS], x_scale, w_q, w_scale, bias)
        out_scale = (y.abs().amax() / 127).reshape(()).float()
    kw = dict(out_scale=out_scale) if out == "int8" else dict(out_dtype=OUT_DTYPES[out])
    return dict(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias, kw=kw)


def _check(got: torch.Tensor, want: torch.Tensor) -> Dict:
    if got.dtype == torch.int8:
        diff = (got.int() - want.int()).abs()
    else:
        diff = (got.float() - want.float()).abs()
    return {"n_diff": int((diff != 0).sum()), "max_abs_diff": float(diff.max()), "numel": diff.numel(),
            "int8": got.dtype == torch.int8,
            "max_rel_diff": float(diff.max() / want.float().abs().max().clamp_min(1e-30))}


def _variant_fns(inp: Dict, M: int, K: int, N: int, before, ptr: bool,
                 tma: bool = True) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a call returning the output, for every TMA config (`tma`), the pointer kernel and
    `before`."""
    from quamba_fx.kernels import gemm, gemm_tma

    x_q, x_scale, w_q, w_scale, bias, kw = (inp[k] for k in ("x_q", "x_scale", "w_q", "w_scale", "bias", "kw"))
    os_ = kw.get("out_scale")
    dtype = torch.int8 if os_ is not None else kw["out_dtype"]
    flags = dict(W_PER_CHANNEL=True, HAS_BIAS=True, OUT_MODE=gemm._OUT_MODES[dtype], OUT_PER_CHANNEL=False)
    out = torch.empty(M, N, dtype=dtype, device=DEVICE)
    tensors = (x_q, w_q, x_scale, w_scale, bias, os_ if os_ is not None else x_scale, out)
    fns: Dict[str, Callable[[], torch.Tensor]] = {}
    for c in _tma_variants(N, K, out.element_size()) if tma else ():
        def call(c=c):
            gemm_tma.launch_config(c, tensors, M, N, K, flags)
            return out
        fns["tma " + _cfg_name(c)] = call

    def ptr_call():
        saved, gemm._TMA_MIN_M = gemm._TMA_MIN_M, 1 << 62
        try:
            return gemm.int8_gemm(x_q, x_scale, w_q, w_scale, bias, **kw)
        finally:
            gemm._TMA_MIN_M = saved

    if ptr:
        fns["ptr"] = ptr_call
    if before is not None:
        fns["before"] = lambda: before.int8_gemm(x_q, x_scale, w_q, w_scale, bias, **kw)
    return fns


def _tma_variants(N: int, K: int, out_bytes: int) -> List:
    from quamba_fx.kernels import gemm_tma

    cands = gemm_tma.candidates(N, K, out_bytes)
    # Ablation of the first (largest) candidate: what flattening the tile and K loops is worth.
    # (Triton 3.6's automatic warp specialization, `warp_specialize=True`, compiles to the same
    # registers and shared memory as without it for sm_90 here: not applied, so not timed.)
    extra = [cands[0]._replace(flatten=False)]
    return cands + [c for c in extra if c not in cands]


def _cfg_name(c) -> str:
    name = f"{c.block_m}x{c.block_n}x{c.block_k} g{c.group_m} s{c.stages} w{c.warps}"
    for flag, on in (("split", c.split), ("noflat", not c.flatten), ("ws", c.warp_specialize)):
        if on:
            name += " " + flag
    return name + (f" x{c.per_sm}/SM" if c.per_sm != 1 else "")


def precompile_variants(jobs: List[Dict]) -> None:
    """Compile every job's TMA variants in one parallel batch (the autotuners of `ours`, `ptr`
    and `before` precompile their own configs)."""
    from quamba_fx.kernels import gemm, gemm_tma
    from quamba_fx.kernels.dispatch import precompile_calls

    calls = []
    for job in jobs:
        inp, M, K, N = job["inputs"], job["M"], job["K"], job["N"]
        os_ = inp["kw"].get("out_scale")
        dtype = torch.int8 if os_ is not None else inp["kw"]["out_dtype"]
        flags = dict(W_PER_CHANNEL=True, HAS_BIAS=True, OUT_MODE=gemm._OUT_MODES[dtype], OUT_PER_CHANNEL=False)
        out = torch.empty(M, N, dtype=dtype, device=DEVICE)
        tensors = (inp["x_q"], inp["w_q"], inp["x_scale"], inp["w_scale"], inp["bias"],
                   os_ if os_ is not None else inp["x_scale"], out)
        for c in _tma_variants(N, K, out.element_size()):
            args, kwargs, _ = gemm_tma._call(c, tensors, M, N, K, flags)
            calls.append((args, kwargs))
    precompile_calls(gemm_tma._gemm_tma_jit, calls)


def bench_one(name: str, M: int, K: int, N: int, out: str, graph: bool, gen: torch.Generator,
              variants: bool = False, before=None, inputs: Optional[Dict] = None, ptr: bool = False) -> Dict:
    from quamba_fx.kernels.gemm import int8_gemm, int8_gemm_reference

    dev = DEVICE
    inp = inputs or _inputs(M, K, N, out, gen)
    x_q, x_scale, w_q, w_scale, bias, kw = (inp[k] for k in ("x_q", "x_scale", "w_q", "w_scale", "bias", "kw"))

    # Correctness first (also autotunes this shape), on every row.
    want = int8_gemm_reference(x_q, x_scale, w_q, w_scale, bias, **kw)
    check = _check(int8_gemm(x_q, x_scale, w_q, w_scale, bias, **kw), want)

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
    ms = time_all(fns, rep=100)
    variant_checks: Dict[str, Dict] = {}
    if variants or before is not None:
        vfns: Dict[str, Optional[Callable[[], object]]] = {}
        for vname, fn in _variant_fns(inp, M, K, N, before, ptr, tma=variants).items():
            try:
                variant_checks[vname] = _check(fn(), want)
                vfns[vname + " graph"] = graphed(fn)
            except Exception as exc:  # a config this chip cannot compile or run: report, go on
                print(f"  [{vname}] failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      file=sys.stderr)
                vfns[vname + " graph"] = None
        ms.update(time_all(vfns, rep=40))  # shorter: many variants, each a graph replay
    host_us = _host_us(fns["ours"]) if M == 1 else None
    from quamba_fx.kernels import gemm_tma

    from quamba_fx.kernels import gemm

    tuned = [c._asdict() for key, c in gemm_tma._TUNED.items() if key[:2] == (N, K)]
    ptr_tuned = [meta for key, meta in gemm._TUNED.items() if key[:2] == (N, K)]
    return {"name": name, "M": M, "K": K, "N": N, "out": out, "check": check, "ms": ms,
            "variant_checks": variant_checks, "host_us_per_call": host_us, "tma_tuned": tuned,
            "pointer_tuned": ptr_tuned}


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
    grid = (triton.cdiv(N, meta["BLOCK_N"]) * meta["SPLIT_K"],)
    from quamba_fx.kernels import split_k

    scratch = split_k.scratch(x_q.device, *split_k.scratch_need(1, N, (meta,)))

    def bare():
        gemm._int8_gemm_jit[grid](
            x_q, w_q, xs, ws, b, os_, out, *scratch, 1, N, K, 1, K, K, N,
            W_PER_CHANNEL=True, HAS_BIAS=True, OUT_MODE=0, OUT_PER_CHANNEL=False, enable_fp_fusion=False,
            **meta, EVEN_K=gemm._even_k(K, meta))

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


def _weight_tbps(r: Dict, ms: Optional[float], bytes_per_weight: int) -> str:
    """Weight bytes streamed per second: what bounds a GEMM at small M (decode, short prompts)."""
    if not ms:
        return "n/a"
    return f"{r['N'] * r['K'] * bytes_per_weight / (ms * 1e-3) / 1e12:.2f}"


def _fmt_ms(ms: Optional[float]) -> str:
    return "n/a" if ms is None else f"{ms:.4f}"


def _check_ok(r: Dict) -> bool:
    c = r["check"]
    # int8: one step (the documented GPU tolerance); floats: relative to the output's magnitude.
    return c["max_abs_diff"] <= 1 if c["int8"] else c["max_rel_diff"] <= 1e-5


def _before_text(r: Dict, fp16_ms: Optional[float]) -> str:
    before_ms = r["ms"].get("before graph")
    if not before_ms or not fp16_ms:
        return ""
    return f" | before {_tops(r, before_ms)} TOP/s {fp16_ms / before_ms:.2f}x fp16"


def _print_table(results: List[Dict]) -> None:
    print("Eager: the Python call as a model makes it (host launch cost included, visible at small M).")
    print("Graph: replayed from a CUDA graph, the kernel's GPU time; TOP/s and 'x fp16 gr' use it.\n")
    head = (f"{'shape':15} {'M':>6} {'K':>5} {'N':>6} | {'ours':>8} {'fp16':>8} | {'ours gr':>8} {'fp16 gr':>8} "
            f"{'int_mm gr':>9} | {'ours TOP/s':>10} {'fp16 TF/s':>9} {'int_mm':>7} | {'ours wTB/s':>10} {'fp16 wTB/s':>10} "
            f"| {'x fp16':>6} {'x fp16 gr':>9} | check")
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
              f"{_tops(r, og or ours):>10} {_tops(r, fg or fp16):>9} {_tops(r, ig):>7} | "
              f"{_weight_tbps(r, og or ours, 1):>10} {_weight_tbps(r, fg or fp16, 2):>10} | {speed} {speed_g} | "
              f"{status} {c['n_diff']}/{c['numel']} differ (max {c['max_abs_diff']:g}) out {r['out']}"
              + _before_text(r, fg))


def _print_variants(results: List[Dict]) -> None:
    print("\nVariants (graph-replayed kernel time; 'exact' = every output equals the reference):")
    for r in results:
        rows = [(k[:-len(" graph")], v) for k, v in r["ms"].items()
                if k.endswith(" graph") and k[:-len(" graph")] not in ("ours", "fp16", "int_mm")]
        if not rows:
            continue
        fg = r["ms"].get("fp16 graph")
        ours = _fmt_ms(r["ms"].get("ours graph"))
        print(f"{r['name']} M={r['M']} (out {r['out']}; fp16 {_fmt_ms(fg)} ms, ours {ours} ms)")
        for vname, ms in sorted(rows, key=lambda kv: kv[1] if kv[1] else float("inf")):
            c = r["variant_checks"].get(vname)
            exact = "exact" if c and c["n_diff"] == 0 else (f"{c['n_diff']} differ" if c else "failed")
            ratio = f"{fg / ms:5.2f}x" if ms and fg else "  n/a"
            print(f"    {vname:40} {_fmt_ms(ms):>8} ms {_tops(r, ms):>7} TOP/s {ratio} fp16  {exact}")


def _load_before(path: str):
    """Import another gemm.py as a sibling module of quamba_fx.kernels.gemm (its relative imports
    resolve), so the two can be timed in one process."""
    import importlib.util

    name = "quamba_fx.kernels._gemm_before"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (rewritten after each shape)")
    parser.add_argument("--out", choices=sorted(OUT_DTYPES), default="int8",
                        help="our output: int8 (requantized with a calibrated out_scale, default) or a float")
    parser.add_argument("--model-outs", action="store_true",
                        help="2.8b shapes get the output dtype the lowered model uses (out_proj fp16, others int8)")
    parser.add_argument("--m", type=int, nargs="+", default=DEFAULT_M, metavar="M", help="token counts to time")
    parser.add_argument("--only", metavar="SUBSTRING", help="only shapes whose name contains this, e.g. 2.8b")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (kernel-only) timings")
    parser.add_argument("--profile", action="store_true", help="also cProfile 300 host calls of int8_gemm at M=1")
    parser.add_argument("--variants", action="store_true",
                        help="also time every TMA tile config, the pointer kernel and --before on each shape")
    parser.add_argument("--ptr", action="store_true", help="with --variants: also time gemm.py's pointer kernel")
    parser.add_argument("--before", metavar="FILE", help="another gemm.py to time as 'before'")
    parser.add_argument("--no-overhead", action="store_true", help="skip the host launch-overhead measurement")
    args = parser.parse_args(argv)

    dev_name = require_gpu("gemm.py")
    import triton

    print(f"device: {dev_name}  torch {torch.__version__}  triton {triton.__version__}  out={args.out}\n")
    before = _load_before(args.before) if args.before else None
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for name, (K, N) in SHAPES.items():
        if args.only and args.only not in name:
            continue
        out = MODEL_OUTS[name.split()[1]] if args.model_outs and name.startswith(("2.8b", "2.7b")) else args.out
        for M in args.m:
            job = {"name": name, "M": M, "K": K, "N": N, "out": out}
            if args.variants:
                job["inputs"] = _inputs(M, K, N, out, gen)
            jobs.append(job)
    if args.variants:
        precompile_variants(jobs)
    results = []
    for job in jobs:
        results.append(bench_one(job["name"], job["M"], job["K"], job["N"], job["out"], not args.no_graph, gen,
                                 variants=args.variants, before=before, inputs=job.get("inputs"),
                                 ptr=args.ptr))
        job.pop("inputs", None)
        r = results[-1]
        print(f"  done {r['name']} M={r['M']}: ours {_fmt_ms(r['ms'].get('ours'))} ms", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, dev_name, {"out": args.out, "argv": sys.argv[1:]}, results=results)
    print()
    _print_table(results)
    if args.variants or before is not None:
        _print_variants(results)
    overhead = None
    if not args.no_overhead:
        overhead = launch_overhead(gen, args.profile)
        print("\nhost us per call at M=1 (2.8b out_proj): "
              + ", ".join(f"{k} {v:.1f}" for k, v in overhead.items()))

    if args.json:
        write_json(args.json, dev_name, {"out": args.out, "argv": sys.argv[1:]}, results=results, host_us=overhead)
        print(f"\nwrote {args.json}")
    return 0 if all(_check_ok(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
