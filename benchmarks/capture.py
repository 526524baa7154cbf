"""Capture + verify time on CPU: mamba-130m with real (random) weights, mamba-2.8b on the meta device.

    python benchmarks/capture.py [--repeats 5]

Prints one row per model: model build time (not part of capture), capture (trace + GraphModule +
fake-tensor shape propagation), verify, and the node count. Target: capture + verify of 130m < 5 s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import quamba_fx


def measure(name: str, device: str, repeats: int) -> dict:
    started = time.perf_counter()
    model = quamba_fx.load_model(name, device=device)
    build = time.perf_counter() - started
    captures, verifies = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        gm = quamba_fx.capture(model)
        captures.append(time.perf_counter() - started)
        started = time.perf_counter()
        quamba_fx.verify_topology(gm)
        verifies.append(time.perf_counter() - started)
    return {
        "model": name, "device": device, "build_s": build, "capture_s": statistics.median(captures),
        "verify_s": statistics.median(verifies), "nodes": len(gm.graph.nodes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'model':<11} {'device':<6} {'build s':>8} {'capture s':>10} {'verify s':>9} {'total s':>8} {'nodes':>6}")
    for name, device in (("mamba-130m", "cpu"), ("mamba-2.8b", "meta")):
        r = measure(name, device, args.repeats)
        total = r["capture_s"] + r["verify_s"]
        print(f"{r['model']:<11} {r['device']:<6} {r['build_s']:>8.2f} {r['capture_s']:>10.3f} "
              f"{r['verify_s']:>9.3f} {total:>8.3f} {r['nodes']:>6}")


if __name__ == "__main__":
    main()
