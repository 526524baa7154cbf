"""What every GPU benchmark here shares: the device check, do_bench timing, CUDA-graph rows, JSON.

Scripts import it as `from gpu_timing import ...` (they are run as `python benchmarks/<name>.py`,
which puts this folder on sys.path).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def fail(script: str, msg: str) -> None:
    print(f"benchmarks/{script}: {msg}", file=sys.stderr)
    sys.exit(2)


def require_gpu(script: str) -> str:
    """Exit with a clear message unless compiled kernels can run on CUDA; returns the device name.

    Also puts the checkout on sys.path, so the benchmarks run without installing the package.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        fail(script, "TRITON_INTERPRET=1 is set; unset it, the benchmark must run compiled kernels")
    if not torch.cuda.is_available():
        fail(script, "no CUDA device found (torch.cuda.is_available() is False); this benchmark needs a GPU")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    return torch.cuda.get_device_name()


def time_ms(fn: Callable[[], object], rep: int = 200) -> float:
    """Median of `triton.testing.do_bench` (L2 flushed between repetitions), after one warm-up call
    so that compilation and autotuning stay outside the timed region."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured once in a CUDA graph; the replay times the kernels without host launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture: autotuning and compilation happen here
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def profiled_events(fn: Callable[[], object], calls: int = 5, cuda: bool = True) -> list:
    """The CUDA kernel events (`torch.profiler`) of `calls` calls of `fn`, after one warm-up call
    outside the profile (compilation and autotuning are not kernel time); with `cuda=False` (a
    script's CPU smoke run) its CPU op events instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        sync()
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    return [event for event in prof.events() if event.device_type == wanted]


def kernel_ms(fn: Callable[[], object], calls: int = 5) -> Dict[str, float]:
    """Milliseconds per call of each CUDA kernel `fn` launches, by kernel name, heaviest first."""
    us: Dict[str, float] = {}
    for event in profiled_events(fn, calls):
        us[event.name] = us.get(event.name, 0.0) + event.device_time_total
    return {name: t / 1e3 / calls for name, t in sorted(us.items(), key=lambda kv: -kv[1])}


def setting_grid(settings: List[Tuple[object, str, list]]) -> List[Dict]:
    """Every combination of `(owner, name, values)` settings' values, in order:
    `[{(owner, name): value, ...}, ...]` (the variants of a benchmark's sweep)."""
    keys = [(owner, name) for owner, name, _ in settings]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, _, values in settings))]


def time_all(fns: Dict[str, Optional[Callable[[], object]]], rep: int = 200) -> Dict[str, Optional[float]]:
    """`time_ms` of each function; a failing or absent (None) one becomes a None row, reported."""
    ms: Dict[str, Optional[float]] = {}
    for name, fn in fns.items():
        if fn is None:
            ms[name] = None
            continue
        try:
            ms[name] = time_ms(fn, rep)
        except Exception as exc:  # e.g. Inductor or _int_mm refusing a shape: keep the other rows
            print(f"  [{name}] failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
            ms[name] = None
    return ms


def print_rows(label: str, shape: Sequence[int], ms: Dict[str, Optional[float]], order: List[str], nbytes: int,
               widths: Sequence[int]) -> None:
    """One table row per timed implementation in `order`: ms, GB/s of `nbytes`, and the share of
    the same run's "copy" time (the bandwidth ceiling). `widths`: label, shape and impl columns."""
    w_label, w_shape, w_impl = widths
    copy_ms = ms.get("copy")
    shape_text = "(" + ",".join(str(s) for s in shape) + ")"
    for name in order:
        if name not in ms:
            continue
        if ms[name] is None:
            print(f"{label:{w_label}} {shape_text:>{w_shape}} {name:>{w_impl}} {'failed':>10}")
            continue
        gbs = nbytes / (ms[name] * 1e-3) / 1e9
        frac = f"{100 * copy_ms / ms[name]:6.1f}%" if copy_ms else "   n/a"
        print(f"{label:{w_label}} {shape_text:>{w_shape}} {name:>{w_impl}} {ms[name]:10.4f} {gbs:9.1f} {frac:>7}")


def write_json(path: str, device: str, extra_meta: Optional[Dict] = None, **payload) -> None:
    """Write `{"meta": {device, torch and triton versions, **extra_meta}, **payload}` to `path`.

    The file is replaced whole (a temporary file, then a rename), so a run stopped part-way never
    leaves half a JSON behind, and a script may call it again as results accumulate.
    """
    import triton

    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, **(extra_meta or {})}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, **payload}, indent=2))
    tmp.replace(path)
