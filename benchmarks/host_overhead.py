"""Where the host time of a plain (not graph-replayed) call goes: prefill and one decode step.

    python benchmarks/host_overhead.py [--model mamba-130m] [--shape 1x128] [--top 25] [--json PATH]

Needs CUDA. Builds the lowered W8A8 model as benchmarks/reference.py does, then for a plain prefill
call and a plain decode step (`Generator` with `cuda_graph=False`) prints: the wall time of a call
(synchronized), the GPU kernel time of the same call (`torch.profiler`), their difference (what the
host adds when it cannot keep ahead of the GPU), the number of kernel launches, and a cProfile of
50 calls sorted by own time (`--sort` for others), to show which Python functions the host time is spent in.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import profiled_events, require_gpu, write_json  # noqa: E402


def wall_ms(fn, calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3 / calls


def kernel_ms_and_launches(fn, calls: int = 5) -> tuple[float, int]:
    kernels = profiled_events(fn, calls)
    return sum(e.device_time_total for e in kernels) / 1e3 / calls, len(kernels) // calls


def profile_top(fn, top: int, sort_keys: list[str], calls: int = 50) -> str:
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    for key in sort_keys:
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba-130m")
    parser.add_argument("--shape", default="1x128", help="prefill BxL")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", nargs="+", default=["tottime"], choices=["tottime", "cumtime", "ncalls"],
                        help="the cProfile orders to print, each its own table")
    parser.add_argument("--compare-flatten", action="store_true",
                        help="also time Generator graphs that read weights through the module tree "
                             "(host_cpu.py's A/B, on this host; rounds interleaved)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    batch, length = (int(v) for v in args.shape.lower().split("x"))
    device = require_gpu("host_overhead.py")
    import quamba_fx
    from e2e import random_model

    model = random_model(args.model, "cuda")
    vocab = model.config.vocab_size
    lowered = quamba_fx.lower(quamba_fx.quantize(model, [torch.randint(0, vocab, (1, 256), device="cuda")],
                                                 progress=False))
    del model
    ids = torch.randint(0, vocab, (batch, length), device="cuda")
    gen = quamba_fx.Generator(lowered, batch, cuda_graph=False)
    gen.prefill(ids)
    token = ids[:, -1]
    rows = {}
    with torch.inference_mode():
        for name, fn in (("prefill", lambda: lowered(ids)), ("decode step", lambda: gen.decode(token))):
            wall = wall_ms(fn)
            kernel, launches = kernel_ms_and_launches(fn)
            rows[name] = dict(wall_ms=wall, kernel_ms=kernel, launches=launches,
                              host_us_per_launch=(wall - kernel) * 1e3 / max(launches, 1))
            print(f"{name}: wall {wall:.3f} ms, kernels {kernel:.3f} ms, {launches} launches, "
                  f"{rows[name]['host_us_per_launch']:.1f} us of unhidden host time per launch", flush=True)
            print(profile_top(fn, args.top, args.sort), flush=True)
        if args.compare_flatten:
            from host_cpu import without_flattening

            with without_flattening():
                tree = quamba_fx.Generator(lowered, batch, cuda_graph=False)
            tree.prefill(ids)
            fns = {"decode step": lambda: gen.decode(token), "decode step, not flattened": lambda: tree.decode(token)}
            rounds = {name: [] for name in fns}
            for _ in range(4):
                for name, fn in fns.items():
                    rounds[name].append(wall_ms(fn))
            rows["flatten A/B"] = rounds
            print("flatten A/B, wall ms of a plain decode step, 4 interleaved rounds: "
                  + "; ".join(f"{name} {' / '.join(f'{v:.2f}' for v in values)}" for name, values in rounds.items()))
    if args.json:
        write_json(args.json, device, {"model": args.model, "shape": args.shape}, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
