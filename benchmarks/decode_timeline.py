"""Where a decode step's time goes between kernels: busy time, idle gaps and overlap, from the
kernels' own start and end times in graph-replayed steps.

    python benchmarks/decode_timeline.py [--model mamba-2.8b] [--recipe quamba2-w4a16] [--rtn-weights]
        [--batches 1 16] [--steps 8] [--ref] [--top 12] [--json PATH] [--commit SHA] [--smoke]

Summed kernel times (`reference.py`'s breakdown) say what each kind costs, but not what a step
waits for: our kernels launch with programmatic dependent launch, so neighbours overlap (session
37 summed 3.05 ms of kernels in a 1.77 ms step), and a step of a few hundred few-microsecond
kernels may lose time in the gaps between them. This profiles `--steps` decode steps replayed from
CUDA graphs (`quamba_fx.Generator`; with `--ref` also mamba_ssm's own graph of the same weights,
as reference.py builds it) at each of `--batches` (one model build for all: a 2.8b build takes
over a minute of a device call) and reports, per step:

* `wall`: the profiled window (first kernel start to last kernel end) over the steps;
* `kernels`: launches a step, and `summed`: their durations added up;
* `busy`: time at least one kernel runs (the union of the intervals), `idle` = wall - busy (no
  kernel running: launch latency not hidden, host gaps between replays), and `overlap` = summed
  - busy (kernels running together: PDL's early starts);
* by kind (reference.py's kinds): launches, summed time, share of the busy time (`step_share`:
  the busy time between the end before a kernel's and its own, what a kernel adds to a chain of
  early-launched kernels, unlike its duration, which counts its wait for the kernel ahead), and
  the idle time just before that kind's kernels (whose start waited on nothing running);
* a block's kernels (from one add + RMSNorm to the next) in the order they end, each position's
  mean share: what in_proj, x_proj, the scan, ... each add to a block;
* the largest gaps by (kernel before, kernel after) pair, summed over the window.

`--smoke` runs mamba-tiny on CPU with the profiler's CPU op events standing in for kernels: the
numbers mean nothing, the code paths and the JSON run (tests/test_decode_timeline_script.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference, gpu_timing (also when a test imports this)
import reference  # noqa: E402
from gpu_timing import profiled_events, write_json  # noqa: E402


class Interval(NamedTuple):
    start: float  # microseconds
    end: float
    name: str


def union(intervals: Sequence[Interval]) -> list[tuple[float, float]]:
    """The union of the intervals as disjoint (start, end) stretches, in order."""
    out: list[tuple[float, float]] = []
    for start, end, _ in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def busy_time(intervals: Sequence[Interval]) -> float:
    """Length of the union of the intervals: time at least one of them runs."""
    return sum(end - start for start, end in union(intervals))


def step_share(intervals: Sequence[Interval]) -> list[tuple[float, str]]:
    """Each interval's share of the busy time: the busy time between the end before its own (in
    end order) and its end, as (share, name). In a chain of kernels launched early that wait for
    the kernel ahead (PDL), a kernel's share is what it adds to the step, its wait and launch
    included, where its duration counts the wait twice; the shares add up to the busy time."""
    stretches = union(intervals)
    out: list[tuple[float, str]] = []
    previous, first = float("-inf"), 0
    for _, end, name in sorted(intervals, key=lambda i: i.end):
        share = 0.0
        while first < len(stretches) and stretches[first][1] <= previous:
            first += 1
        for start, stop in stretches[first:]:
            if start >= end:
                break
            share += min(stop, end) - max(start, previous)
        out.append((share, name))
        previous = end
    return out


def block_shares(shares: Sequence[tuple[float, str]], starts_block: Callable[[str], bool]) -> dict:
    """The mean share (`step_share`, in end order) of each kernel position in a model block, a
    block starting at each kernel `starts_block` names (the add + RMSNorm between blocks): what
    in_proj, x_proj, ... each add to a block, which per-kind sums mix up (the GEMM kind holds
    every projection). Blocks of the most common length count; `blocks` says how many."""
    blocks: list[list[tuple[float, str]]] = []
    for share, name in shares:
        if starts_block(name):
            blocks.append([])
        if blocks:
            blocks[-1].append((share, name))
    if not blocks:
        return {"blocks": 0, "positions": []}
    lengths = [len(b) for b in blocks]
    length = max(set(lengths), key=lengths.count)
    kept = [b for b in blocks if len(b) == length]
    positions = []
    for i in range(length):
        names = sorted({b[i][1] for b in kept})
        positions.append({"kernel": " / ".join(names), "share_us": sum(b[i][0] for b in kept) / len(kept)})
    return {"blocks": len(kept), "positions": positions}


def gaps(intervals: Sequence[Interval]) -> list[tuple[float, str, str]]:
    """Every idle stretch between the first start and the last end: (length, the name of the
    interval that reached furthest before it, the name of the one that ends it)."""
    out: list[tuple[float, str, str]] = []
    reach, last = None, ""
    for start, end, name in sorted(intervals):
        if reach is not None and start > reach:
            out.append((start - reach, last, name))
        if reach is None or end > reach:
            reach, last = end, name
    return out


def summarize(intervals: Sequence[Interval], steps: int, top: int, kind_of: Callable[[str], str]) -> dict:
    """Per-step figures of `intervals` (the kernels of `steps` steps), see the module docstring;
    blocks start at the kernels `kind_of` calls "norm"."""
    if not intervals:
        raise ValueError("no kernel intervals to summarize")
    wall = max(i.end for i in intervals) - min(i.start for i in intervals)
    summed = sum(i.end - i.start for i in intervals)
    busy = busy_time(intervals)
    idle = gaps(intervals)
    kinds: dict[str, dict] = {}
    for start, end, name in intervals:
        entry = kinds.setdefault(kind_of(name), {"launches": 0, "summed_us": 0.0, "share_us": 0.0,
                                                 "idle_before_us": 0.0})
        entry["launches"] += 1
        entry["summed_us"] += end - start
    shares = step_share(intervals)
    for share, name in shares:
        kinds[kind_of(name)]["share_us"] += share
    by_pair: dict[tuple[str, str], list[float]] = {}
    for length, before, after in idle:
        kinds[kind_of(after)]["idle_before_us"] += length
        pair = by_pair.setdefault((before, after), [0.0, 0])
        pair[0] += length
        pair[1] += 1
    per_step = {key: value / steps for key, value in
                dict(wall_us=wall, summed_us=summed, busy_us=busy, idle_us=wall - busy, overlap_us=summed - busy,
                     kernels=len(intervals)).items()}
    for entry in kinds.values():
        for key in entry:
            entry[key] /= steps
    largest = sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:top]
    return {**per_step, "kinds": kinds, "block": block_shares(shares, lambda name: kind_of(name) == "norm"),
            "gaps": [{"before": b, "after": a, "us_per_step": t / steps, "count_per_step": n / steps}
                     for (b, a), (t, n) in largest]}


def kernel_intervals(fn: Callable[[], object], calls: int) -> list[Interval]:
    """The device kernels (CPU op events on CPU) of `calls` calls of `fn`, after one call outside
    the profile, as intervals."""
    on_cuda = reference.DEVICE == "cuda"
    events = profiled_events(fn, calls, cuda=on_cuda)
    if not on_cuda:  # top-level ops only: nested CPU events are not separate work
        events = [e for e in events if e.cpu_parent is None]
    return [Interval(float(e.time_range.start), float(e.time_range.end), e.name) for e in events]


def print_summary(label: str, s: dict) -> None:
    print(f"\n{label}: per step {s['wall_us']:.1f} us wall, {s['kernels']:.0f} kernels, summed {s['summed_us']:.1f}, "
          f"busy {s['busy_us']:.1f}, idle {s['idle_us']:.1f} ({100 * s['idle_us'] / s['wall_us']:.1f}%), "
          f"overlap {s['overlap_us']:.1f}\n")
    print("| kind | launches | summed us | share of busy us | share a launch us | idle before us |")
    print("|---|---|---|---|---|---|")
    for kind, e in sorted(s["kinds"].items(), key=lambda kv: -kv[1]["share_us"]):
        print(f"| {kind} | {e['launches']:.0f} | {e['summed_us']:.1f} | {e['share_us']:.1f} | "
              f"{e['share_us'] / max(e['launches'], 1e-9):.2f} | {e['idle_before_us']:.1f} |")
    print(f"\nA block's kernels in the order they end, mean share us over {s['block']['blocks']} blocks\n")
    print("| position | kernel | share us |")
    print("|---|---|---|")
    for i, p in enumerate(s["block"]["positions"]):
        print(f"| {i} | {p['kernel'][:60]} | {p['share_us']:.2f} |")
    print("\n| gap before | gap after | us per step | gaps per step |")
    print("|---|---|---|---|")
    for g in s["gaps"]:
        print(f"| {g['before'][:48]} | {g['after'][:48]} | {g['us_per_step']:.2f} | {g['count_per_step']:.1f} |")


def timeline_at(lowered, label: str, ref, batch: int, vocab: int, steps: int, top: int) -> dict:
    """{stack: summary} of `steps` decode steps at `batch` after a random prompt: ours (`label`)
    and, with `ref`, mamba_ssm's."""
    import quamba_fx

    prompt = torch.randint(0, vocab, (batch, reference.PROMPT_LEN), device=reference.DEVICE)
    token = prompt[:, -1]
    results: dict = {}
    with torch.inference_mode():
        gen = quamba_fx.Generator(lowered, batch, cuda_graph=reference.DEVICE == "cuda")
        gen.prefill(prompt)
        results[label] = summarize(kernel_intervals(lambda: gen.decode(token), steps), steps, top, reference.classify)
        if ref is not None:
            dec = reference.RefDecoder(ref, batch, reference.PROMPT_LEN + steps + 8)
            dec.prefill(prompt)
            results[reference.REF] = summarize(kernel_intervals(lambda: dec.decode(token), steps), steps, top,
                                               reference.classify)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba-2.8b")
    parser.add_argument("--recipe", default="quamba")
    parser.add_argument("--rtn-weights", action="store_true", help="4-bit recipes round weights to nearest")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=8, help="profiled decode steps")
    parser.add_argument("--top", type=int, default=12, help="largest gap pairs listed")
    parser.add_argument("--ref", action="store_true", help="also mamba_ssm's graph-replayed step")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--smoke", action="store_true", help="mamba-tiny on CPU: the code paths, no figures")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.steps < 1 or args.top < 0:
        parser.error("--batches and --steps must be at least 1, --top at least 0")
    if args.smoke:
        reference.DEVICE, args.model, args.ref = "cpu", "mamba-tiny", False
    else:
        from gpu_timing import require_gpu

        require_gpu("decode_timeline.py")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ours, ref, _, vocab = reference.build(args.model, args.ref, [args.recipe], args.rtn_weights, hf_check=False)
    (label, lowered), = ours.items()
    device = torch.cuda.get_device_name() if reference.DEVICE == "cuda" else "cpu (smoke run)"
    how = "steps from CUDA graphs" if reference.DEVICE == "cuda" else "plain steps"
    results: dict = {}
    for batch in args.batches:
        results[str(batch)] = at_batch = timeline_at(lowered, label, ref, batch, vocab, args.steps, args.top)
        print(f"{device}: {args.model} {label} decode at batch {batch}, {args.steps} {how}")
        for name, summary in at_batch.items():
            print_summary(name, summary)
        if args.json:  # after every batch: a call cut short keeps what it measured
            write_json(args.json, device, {"commit": args.commit, "model": args.model, "recipe": args.recipe,
                                           "batches": args.batches, "steps": args.steps}, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
