"""Mamba-2's scan (SSD) alone: our Triton kernel (`kernels/ssd.py`) against mamba_ssm's Triton SSD
(`mamba_chunk_scan_combined`, what its Mamba-2 runs), on mamba2-2.7b's scan shapes.

    python benchmarks/ssd.py [--shapes 1,2048 8,2048] [--json PATH] [--commit SHA]

Both read the same fp16 x, dt, B and C (as in_proj and the conv1d leave them in an fp16 model) and
the same fp32 A, D and dt_bias, with softplus on dt. Each row: CUDA-graph replay medians (ms) and
each output's error against the fp32 PyTorch reference (`ssd_reference`) on the same inputs,
max |diff| / max |reference|. Needs a CUDA device; mamba_ssm from `.anchors/` (see
../shared/anchors/README.md), else ours alone.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from gpu_timing import graphed, require_gpu, time_ms, write_json

# mamba2-2.7b: d_model 2560, 80 heads of 64 channels, one B/C group, state 128, chunk 256.
HEADS, HEAD_DIM, GROUPS, STATE, CHUNK = 80, 64, 1, 128, 256


def make_inputs(batch: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).half()

    return dict(
        x=randn(batch, length, HEADS, HEAD_DIM), dt=randn(batch, length, HEADS, scale=0.5),
        A=-torch.rand(HEADS, generator=g, device="cuda") * 8 - 1, B=randn(batch, length, GROUPS, STATE),
        C=randn(batch, length, GROUPS, STATE), D=torch.randn(HEADS, generator=g, device="cuda"),
        dt_bias=torch.rand(HEADS, generator=g, device="cuda") - 4.0,
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["1,2048", "8,2048"], metavar="B,L")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--commit", default="", help="recorded in the JSON")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in text.split(",")) for text in args.shapes]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        ap.error(f"--shapes takes B,L pairs of positive integers, got {args.shapes}")
    device = require_gpu("ssd.py")
    from quamba_fx.kernels import ssd
    from quamba_fx.ssd_reference import ssd_scan_reference

    try:
        import anchors

        anchors.enable()
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as exc:
        print(f"benchmarks/ssd.py: mamba_ssm not available ({exc}); timing ours alone", file=sys.stderr)
        mamba_chunk_scan_combined = None

    rows = []
    print(f"{device}: SSD scan, mamba2-2.7b heads ({HEADS} x {HEAD_DIM}, state {STATE}); ms per call, graph replay")
    for batch, length in shapes:
        kw = make_inputs(batch, length)
        positional = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["dt_bias"], True, 0.0, math.inf, CHUNK)
        reference, _ = ssd_scan_reference(*positional)
        row: dict = dict(batch=batch, L=length)

        def ours():
            return ssd.ssd_scan(*positional)

        row["ours_error"] = relative_error(ours(), reference)
        row["ours_ms"] = time_ms(graphed(ours))
        if mamba_chunk_scan_combined is not None:

            def theirs():
                return mamba_chunk_scan_combined(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], CHUNK, D=kw["D"],
                                                 dt_bias=kw["dt_bias"], dt_softplus=True)

            row["mamba_ssm_error"] = relative_error(theirs(), reference)
            row["mamba_ssm_ms"] = time_ms(graphed(theirs))
            row["ratio"] = row["mamba_ssm_ms"] / row["ours_ms"]
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        if args.json:
            write_json(args.json, device, {"commit": args.commit}, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
