"""Time the decode GEMMs the way a decode step runs them, and every config of the few-row kernel.

    python benchmarks/decode_gemm.py [--models 2.8b 130m] [--m 1 2 4 8 16 32 64] [--sweep-m 16 64]
                                     [--sweep-models 2.8b] [--gemv-sweep] [--json PATH]

Needs a CUDA device. A decode step launches its GEMMs back to back on weights that do not fit in
L2; `benchmarks/gemm.py` (do_bench: one launch between L2 flushes) ranks small kernels otherwise.
Here each row is R launches in a row, each on its own copy of the weight (R copies make at least
`--chain-mb` MB, several times the H200's 50 MB of L2), captured in one CUDA graph and replayed;
the figure is microseconds per launch, and wTB/s the weight bytes streamed per second. Kernels
launch with programmatic dependent launch where the GPU has it, as in the model.

Rows for each Mamba projection (2.8b and 130m shapes, the output dtype the lowered model asks of
it) and each M:

* rule    -- `int8_gemm` as the model calls it (the GEMV at one row; at 2-64 rows gemm_skinny's
             rule where `gemm_skinny.use_for` picks it, else the pointer kernel);
* pointer -- gemm.py's tensor-core kernel (autotuned), what ran at 2-64 rows before gemm_skinny;
* fp16    -- cuBLAS `F.linear` in fp16 on fp16 copies of the weight (mamba_ssm's GEMMs);
* with `--sweep-m`, at those M, every candidate config of gemm_skinny (`candidates`), best first;
* with `--gemv-sweep`, at M = 1, every GEMV config of `GEMV_TILES` with each split;
* with `--pointer-sweep-m`, at those M, every config of the pointer kernel's autotuner
  (`pointer_candidates`); the rule row's notes name the one it chose.

Every output is checked against `int8_linear` (int8 within one step, as the CUDA kernel tests).
"""

from __future__ import annotations

import argparse
import statistics
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional
from unittest import mock

import torch
import torch.nn.functional as F
from gemm import MODEL_OUTS, SHAPES, _check, _inputs
from gpu_timing import require_gpu, write_json

DEVICE = "cuda"


def chained_us(launch: Callable[[int], object], copies: int, replays: int = 10) -> float:
    """Microseconds per launch of `launch(r)` for r = 0 .. copies-1, captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for r in range(copies):  # outside the capture: compiles, tunes, allocates split-K scratch
            launch(r)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(copies):
            launch(r)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def _cfg_name(meta: dict, warps: int, stages: int) -> str:
    loop = "early" if meta["EARLY"] else f"pipe{stages}"
    return f"bn{meta['BLOCK_N']} bk{meta['BLOCK_K']} split{meta['SPLIT_K']} {loop} w{warps}"


# The one-row GEMV's sweep (`--gemv-sweep`): (BLOCK_N, BLOCK_K in int32 words, warps), each with every
# SPLIT_K from 1 up to the K steps available.
GEMV_TILES = [(16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 4), (16, 128, 8), (32, 128, 8)]


def gemv_candidates(n: int, k: int) -> list:
    """Every GEMV config (`triton.Config`) of the sweep for an `n x k` weight."""
    from quamba_fx.kernels import gemv

    out = []
    for bn, bk, warps in GEMV_TILES:
        k_steps = -(-(k // 4) // bk)
        split = 1
        while split <= min(k_steps, 32):
            out.append(gemv._cfg(bn, bk, split, 1, warps))
            split *= 2
    return out


def _pointer_name(meta: dict) -> str:
    return (f"ptr bm{meta['BLOCK_M']} bn{meta['BLOCK_N']} bk{meta['BLOCK_K']} split{meta['SPLIT_K']}"
            f" s{meta['num_stages']} w{meta['num_warps']}")


def pointer_candidates(m: int, n: int, k: int) -> List[dict]:
    """The launch metas of every config the pointer kernel's autotuner times for an `m x n x k`
    problem."""
    from quamba_fx.kernels import gemm
    from quamba_fx.kernels.dispatch import next_pow2

    named = {"M_BUCKET": min(next_pow2(m), gemm._M_BUCKET_CAP), "N": n, "K": k}
    return [c.all_kwargs() for c in gemm._prune_configs([], named)]


def bench_shape(name: str, m: int, k: int, n: int, sweep: bool, chain_mb: float,
                gen: torch.Generator, gemv_sweep: bool = False, pointer_sweep: bool = False) -> List[Dict]:
    from quamba_fx.kernels import gemm, gemm_skinny, gemv
    from quamba_fx.kernels.dispatch import next_pow2, precompile_calls, sm_count

    out = MODEL_OUTS[name.split()[-1]]
    inp = _inputs(m, k, n, out, gen)
    x_q, x_scale, w_scale, bias, kw = (inp[key] for key in ("x_q", "x_scale", "w_scale", "bias", "kw"))
    # At most 512 launches a chain: the smallest 130m weights then stay in L2, as they mostly would
    # in a step too (a whole 130m step streams ~130 MB).
    copies = min(512, max(2, -(-int(chain_mb * 2**20) // (n * k))))
    weights = [inp["w_q"]] + [inp["w_q"].clone() for _ in range(copies - 1)]
    want = gemm.int8_gemm_reference(x_q, x_scale, inp["w_q"], w_scale, bias, **kw)

    def model_call(r: int):
        return gemm.int8_gemm(x_q, x_scale, weights[r], w_scale, bias, **kw)

    def pointer_call(r: int):
        with mock.patch.object(gemm_skinny, "MAX_M", 0), mock.patch.object(gemv, "GEMV_MAX_M", 0):
            return gemm.int8_gemm(x_q, x_scale, weights[r], w_scale, bias, **kw)

    rows: List[Dict] = []

    def row(variant: str, launch: Callable[[int], object]) -> None:
        try:
            check = _check(launch(0), want)
            us = chained_us(launch, copies)
        except Exception as exc:  # noqa: BLE001 - one failing config must not end the sweep
            print(f"  {name} M={m} [{variant}] failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            return
        ok = check["max_abs_diff"] <= (1 if check["int8"] else 1e-2 * float(want.float().abs().max()))
        rows.append(dict(shape=name, M=m, K=k, N=n, out=out, variant=variant, us=us, copies=copies,
                         weight_tbps=n * k / (us * 1e-6) / 1e12, check=check, ok=ok))

    row("rule", model_call)
    chosen = [meta for key, meta in gemm._TUNED.items() if key[:3] == (n, k, min(next_pow2(m), gemm._M_BUCKET_CAP))]
    if rows and rows[-1]["variant"] == "rule" and chosen:
        rows[-1]["notes"] = "pointer kernel " + _pointer_name(chosen[0])
    if m > 1:
        row("pointer", pointer_call)
    w16 = [w.half() for w in weights]
    x16, b16 = x_q.half(), bias.half()
    fp16_us = chained_us(lambda r: F.linear(x16, w16[r], b16), copies)
    rows.append(dict(shape=name, M=m, K=k, N=n, out="fp16", variant="fp16", us=fp16_us, copies=copies,
                     weight_tbps=n * k * 2 / (fp16_us * 1e-6) / 1e12, ok=True))
    if gemv_sweep and m == 1:
        for config in gemv_candidates(n, k):
            meta = config.all_kwargs()
            name_ = f"gemv bn{meta['BLOCK_N']} bk{meta['BLOCK_K']} split{meta['SPLIT_K']} w{config.num_warps}"

            # The rule's config is chosen once per problem key: forget it, and answer with this one.
            gemv._TUNED.clear()
            with mock.patch.object(gemv, "gpu_config", lambda *_, config=config: config):
                row(name_, model_call)
        gemv._TUNED.clear()
    if pointer_sweep:
        # Already compiled, in parallel, where the pointer kernel ran on this problem above (the
        # rule's or the pointer row's call: gemm's autotuner precompiles this same family); at
        # one row, where neither runs it, they compile one by one.
        for meta in pointer_candidates(m, n, k):
            def pinned_call(r: int, meta=meta):
                # A `_TUNED` table that answers every problem with this config (only `get` is read).
                with mock.patch.object(gemm, "_TUNED", SimpleNamespace(get=lambda *_, meta=meta: meta)):
                    return pointer_call(r)
            row(_pointer_name(meta), pinned_call)
    if sweep and gemm_skinny.MIN_M <= m <= gemm_skinny.MAX_M:
        dtype = want.dtype
        os_ = kw.get("out_scale")
        flags = dict(W_PER_CHANNEL=True, HAS_BIAS=True, OUT_MODE=gemm._OUT_MODES[dtype], OUT_PER_CHANNEL=False)
        outs = torch.empty(m, n, dtype=dtype, device=DEVICE)
        tensors = [(x_q, w, x_scale, w_scale, bias, os_ if os_ is not None else x_scale, outs) for w in weights]
        configs = gemm_skinny.candidates(m, n, k, sm_count())
        metas = [c.all_kwargs() for c in configs]
        calls = []
        for meta in metas:
            _, args, kwargs = gemm_skinny.launch_call(tensors[0], m, n, k, flags, meta)
            calls.append((args, kwargs))
        precompile_calls(gemm_skinny._int8_gemm_skinny_jit, calls)
        for c, meta in zip(configs, metas):
            def sweep_call(r: int, meta=meta):
                gemm_skinny.launch(tensors[r], m, n, k, None, flags, meta=meta)
                return outs
            row(_cfg_name(meta, c.num_warps, c.num_stages), sweep_call)
    return rows


def _print(rows: List[Dict]) -> None:
    by_problem: Dict[tuple, List[Dict]] = {}
    for r in rows:
        by_problem.setdefault((r["shape"], r["M"]), []).append(r)
    print(f"{'shape':16} {'M':>3} {'rule us':>8} {'pointer':>8} {'fp16':>8} {'best config':>38} {'us':>7} "
          f"{'rule wTB/s':>10} {'configs':>7} {'bad':>4}")
    for (shape, m), rs in by_problem.items():
        get = {r["variant"]: r for r in rs}
        sweep = sorted((r for r in rs if r["variant"] not in ("rule", "pointer", "fp16")), key=lambda r: r["us"])

        def us(v: str) -> str:
            return f"{get[v]['us']:8.2f}" if v in get else f"{'-':>8}"

        best = sweep[0] if sweep else None
        bad = sum(1 for r in rs if not r.get("ok", True))
        rule_tbps = f"{get['rule']['weight_tbps']:10.2f}" if "rule" in get else f"{'-':>10}"
        print(f"{shape:16} {m:3d} {us('rule')} {us('pointer')} {us('fp16')} "
              f"{best['variant'] if best else '-':>38} {best['us'] if best else float('nan'):7.2f} "
              f"{rule_tbps} {len(sweep):7d} {bad:4d}")
    for (shape, m), rs in by_problem.items():
        if any(r["variant"].startswith("ptr ") for r in rs):
            rule = next((r for r in rs if r["variant"] == "rule"), {})
            print(f"\n{shape} M={m}, the pointer kernel's configs (rule: {rule.get('us', float('nan')):.2f} us, "
                  f"{rule.get('notes', 'config unknown')}):")
            for r in sorted((r for r in rs if r["variant"].startswith("ptr ")), key=lambda r: r["us"]):
                print(f"  {r['variant']:44} {r['us']:8.2f} us {r['weight_tbps']:6.2f} wTB/s{'' if r['ok'] else ' BAD'}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["2.8b", "130m"], help="shape sets of benchmarks/gemm.py")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="rows (decode batch)")
    parser.add_argument("--sweep-m", type=int, nargs="*", default=[], help="M at which to time every config")
    parser.add_argument("--sweep-models", nargs="*", default=["2.8b"], help="shape sets the sweep covers")
    parser.add_argument("--gemv-sweep", action="store_true", help="at M = 1, time every GEMV config of the sweep")
    parser.add_argument("--pointer-sweep-m", type=int, nargs="*", default=[],
                        help="M at which to time every config of the pointer kernel (`pointer_candidates`)")
    parser.add_argument("--chain-mb", type=float, default=400.0, help="weight MB a chain of launches streams")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON (rewritten after each shape)")
    parser.add_argument("--commit", default="", help="recorded in the JSON")
    args = parser.parse_args(argv)
    device = require_gpu("decode_gemm.py")
    print(f"device: {device}")
    gen = torch.Generator().manual_seed(0)
    rows: List[Dict] = []
    for name, (k, n) in SHAPES.items():
        if name.split()[0] not in args.models:
            continue
        for m in args.m:
            sweep = m in args.sweep_m and name.split()[0] in args.sweep_models
            rows += bench_shape(name, m, k, n, sweep, args.chain_mb, gen, args.gemv_sweep,
                                pointer_sweep=m in args.pointer_sweep_m and name.split()[0] in args.sweep_models)
            if args.json:
                write_json(args.json, device, {"commit": args.commit, "chain_mb": args.chain_mb}, rows=rows)
    _print(rows)
    bad = [r for r in rows if not r.get("ok", True)]
    for r in bad:
        print(f"OUTPUT MISMATCH: {r['shape']} M={r['M']} {r['variant']}: {r['check']}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
