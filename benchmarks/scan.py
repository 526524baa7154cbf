"""Time our selective scan kernel alone against mamba_ssm's CUDA `selective_scan_fn` (issue 13).

    PYTHONPATH=$PWD:/path/to/anchors python benchmarks/scan.py [--json PATH] [--chunk-lens 64 128 ...]
        [--shapes B,D,L ...] [--walks] [--commit HASH]

Needs a CUDA device and the mamba_ssm anchors (`anchors.py`'s folder on the path; without them the
mamba_ssm rows are left out). Shapes `(batch, d_inner, L)`: mamba-2.8b's 5120 channels at batch 1 and
8, mamba-130m's 1536 at batch 1; d_state 16.

Inputs as each stack runs them in its model: ours int8 in the graph's layout (u and delta `[B, L, D]`
viewed as `[B, D, L]`, z the second half of in_proj's `[B, L, 2D]`, B and C slices of x_proj's
`[B, L, R + 2N]`), y fp16; mamba_ssm the same values dequantized to fp16, contiguous `[B, D, L]`
(its native layout), y fp16. Both: D, delta_bias, softplus, z gate, A = -(1..16) as Mamba initialises
it, delta_bias from dt in [1e-3, 1e-1] as Mamba initialises it.

Timing: median of `triton.testing.do_bench` (L2 flushed between repetitions) over CUDA-graph replays
of one call, so the figures are kernel time (as the issue's torch.profiler figures are), without the
host's launch cost; the plain-call median is printed too, `ours_other_math_ms` times our kernels
with `scan.FAST_MATH` flipped (MUFU approximations against libdevice in the per-channel softplus and
gate), `ours_other_launch_ms` with `scan.ONE_LAUNCH` flipped (the chunked scan in one launch or
three), and with `--walks`, `ours_per_step_ms` and `ours_tiled_ms` autotune over one walk's
candidates alone (`scan.GPU_CONFIGS`, `scan.TILED_GPU_CONFIGS`; the default is both).
`dt_proj_gemm_ms`, `gemm_then_scan_ms` and `fused_dt_proj_ms` time dt_proj (mamba-2.8b's: rank
ceil(d_model / 16), int8 weights, per-channel scales, a bias) as its own int8 GEMM, that GEMM then
our scan, and our scan computing it itself (`DeltaProjection`): what folding dt_proj into the
prefill's scan would save. Correctness: ours and mamba_ssm's y against
`selective_scan_int8_reference` (fp32, on the GPU) on the same inputs: relative L2 error and the
largest error over the largest |y|.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Dict, List, Optional

import torch
from gpu_timing import graphed, require_gpu, time_ms, write_json

SHAPES = [(1, 5120, 2048), (8, 5120, 2048), (1, 1536, 2048)]
D_STATE = 16
TARGET_RATIO = 0.8  # ours / mamba_ssm, issue 13
DEVICE = "cuda"


def make_inputs(batch: int, d_inner: int, L: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Our int8 inputs in the graph's layout, with scales, A, D and delta_bias (see the docstring)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n = D_STATE
    rank = math.ceil(d_inner / 2 / 16)  # dt_rank = ceil(d_model / 16)

    def q(*shape):
        return torch.randint(-128, 128, shape, dtype=torch.int8, device=DEVICE, generator=g)

    u = q(batch, L, d_inner).transpose(1, 2)
    delta = q(batch, L, d_inner).transpose(1, 2)
    xz = q(batch, L, 2 * d_inner)
    xdbl = q(batch, L, rank + 2 * n)
    dt_init = torch.exp(torch.rand(d_inner, device=DEVICE, generator=g) * math.log(100) + math.log(1e-3))
    return dict(
        u=u, delta=delta, A=-torch.arange(1, n + 1, device=DEVICE, dtype=torch.float32).repeat(d_inner, 1),
        B=xdbl[:, :, rank:rank + n].transpose(1, 2), C=xdbl[:, :, rank + n:].transpose(1, 2),
        D=torch.rand(d_inner, device=DEVICE, generator=g) + 0.5, z=xz[:, :, d_inner:].transpose(1, 2),
        delta_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # softplus^-1(dt_init)
        delta_softplus=True,
        u_scale=torch.tensor(0.02, device=DEVICE), delta_scale=torch.tensor(0.01, device=DEVICE),
        B_scale=torch.tensor(0.03, device=DEVICE), C_scale=torch.tensor(0.03, device=DEVICE),
        z_scale=torch.tensor(0.02, device=DEVICE),
    )


def make_projection(batch: int, d_inner: int, L: int, seed: int = 1):
    """dt_proj as the lowered graph runs it: x the dt slice of x_proj's int8 `[B, L, R + 2N]`
    output, int8 weights with per-channel scales, an fp32 bias; delta at make_inputs' scale."""
    from quamba_fx.kernels.scan import DeltaProjection

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rank = math.ceil(d_inner / 2 / 16)
    xdbl = torch.randint(-128, 128, (batch, L, rank + 2 * D_STATE), dtype=torch.int8, device=DEVICE, generator=g)
    weight = torch.randint(-128, 128, (d_inner, rank), dtype=torch.int8, device=DEVICE, generator=g)
    # Scales that spread delta over most of the int8 range, a few percent saturating.
    w_scale = torch.full((d_inner,), 1.5 / (128 * 128 * 0.02 * math.sqrt(rank)), device=DEVICE)
    return DeltaProjection(x=xdbl[:, :, :rank], x_scale=torch.tensor(0.02, device=DEVICE), weight=weight,
                           weight_scale=w_scale * (torch.rand(d_inner, device=DEVICE, generator=g) + 0.5),
                           bias=torch.randn(d_inner, device=DEVICE, generator=g) * 0.1,
                           out_scale=torch.tensor(0.01, device=DEVICE))


def time_dt_proj(scan, kw: Dict[str, torch.Tensor], batch: int, d_inner: int, L: int) -> Dict[str, float]:
    """dt_proj's GEMM alone, the GEMM then our scan, and our scan computing dt_proj itself."""
    proj = make_projection(batch, d_inner, L)
    rest = {k: v for k, v in kw.items() if k not in ("delta", "delta_scale")}

    def gemm_then_scan():
        return scan.selective_scan(**rest, delta=proj.delta().transpose(1, 2), delta_scale=proj.out_scale)

    def fused():
        return scan.selective_scan(**rest, delta=None, delta_proj=proj)

    want = gemm_then_scan()
    return dict(dt_proj_gemm_ms=time_ms(graphed(proj.delta)), gemm_then_scan_ms=time_ms(graphed(gemm_then_scan)),
                fused_dt_proj_ms=time_ms(graphed(fused)), fused_dt_proj_rel_l2=errors(fused(), want)[0])


def time_walk(scan, call, ref: torch.Tensor, label: str, candidates: List[tuple]) -> Dict[str, object]:
    """Our scan again with only `candidates` (one walk's configs) as the autotuner's: its time, error
    and picks, as `ours_<label>_*`; the autotuner's full list and choices are put back after."""
    kernel = scan._selective_scan_kernel
    saved = (kernel.configs, dict(scan._TUNED), set(scan._PRECOMPILED))
    kernel.configs = [scan._config(*c) for c in candidates]
    kernel.cache.clear()
    scan._TUNED.clear()
    scan._PRECOMPILED.clear()
    try:
        got = call()
        return {f"ours_{label}_rel_l2": errors(got, ref)[0], f"ours_{label}_ms": time_ms(graphed(call)),
                f"ours_{label}_tuned": {f"pass{key[-1]}": dict(c) for key, c in scan._TUNED.items()}}
    finally:
        kernel.configs = saved[0]
        kernel.cache.clear()
        scan._TUNED.clear()
        scan._TUNED.update(saved[1])
        scan._PRECOMPILED.clear()
        scan._PRECOMPILED.update(saved[2])


def dequantized_fp16(kw: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mamba_ssm's inputs: the same values in fp16, contiguous [B, D, L] / [B, N, L]."""
    out = {k: kw[k] for k in ("A", "D", "delta_bias")}
    for name in ("u", "delta", "B", "C", "z"):
        out[name] = (kw[name].float() * kw[f"{name}_scale"]).half().contiguous()
    return out


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple:
    g, w = got.float(), want.float()
    return (float((g - w).norm() / w.norm()), float((g - w).abs().max() / w.abs().max()))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--commit", default="", help="recorded in the JSON")
    ap.add_argument("--chunk-lens", type=int, nargs="*", default=[],
                    help="also time ours with the chunk length pinned to each of these")
    ap.add_argument("--shapes", nargs="*", default=None, metavar="B,D,L",
                    help="shapes instead of the issue's three, e.g. 8,1536,2048")
    ap.add_argument("--walks", action="store_true",
                    help="also time ours autotuned over each walk's configs alone (per-step, tiled)")
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in text.split(",")) for text in args.shapes]
        except ValueError:
            shapes = []
        if not shapes or any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
            ap.error(f"--shapes takes B,D,L triples of positive integers, got {args.shapes}")
    device = require_gpu("scan.py")
    from quamba_fx.kernels import scan
    try:
        import anchors
        anchors.enable()
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as exc:
        print(f"benchmarks/scan.py: mamba_ssm not available ({exc}); timing ours alone", file=sys.stderr)
        selective_scan_fn = None

    rows = []
    for batch, d_inner, L in shapes:
        kw = make_inputs(batch, d_inner, L)
        ref = scan.selective_scan_int8_reference(**kw, out_dtype=torch.float32)
        row: Dict[str, object] = dict(batch=batch, d_inner=d_inner, L=L,
                                      chunk_len=scan._chunk_len(batch, d_inner, L))
        before = set(scan._TUNED)
        ours = scan.selective_scan(**kw)
        # The configs the autotuner picked for this shape (pass 1 and pass 3).
        row["tuned"] = {f"pass{key[-1]}": dict(scan._TUNED[key]) for key in set(scan._TUNED) - before}
        row["ours_rel_l2"], row["ours_max_rel"] = errors(ours, ref)
        # partial, not a lambda: the call holds the inputs itself, so the loop's `del kw` is safe.
        ours_call = functools.partial(scan.selective_scan, **kw)
        row["ours_ms"] = time_ms(graphed(ours_call))
        row["ours_plain_ms"] = time_ms(ours_call)
        # Each setting flipped, in the same process: FAST_MATH (libdevice's exp / log and IEEE
        # divisions in the per-channel math instead of MUFU's) and ONE_LAUNCH (the chunked scan as
        # passes 1-3 in three launches instead of one).
        for setting, label in (("FAST_MATH", "other_math"), ("ONE_LAUNCH", "other_launch")):
            value = getattr(scan, setting)
            setattr(scan, setting, not value)
            try:
                row[f"ours_{label}_rel_l2"] = errors(ours_call(), ref)[0]
                row[f"ours_{label}_ms"] = time_ms(graphed(ours_call))
            finally:
                setattr(scan, setting, value)
        if args.walks:
            row.update(time_walk(scan, ours_call, ref, "per_step", scan.GPU_CONFIGS))
            row.update(time_walk(scan, ours_call, ref, "tiled", scan.TILED_GPU_CONFIGS))
        row.update(time_dt_proj(scan, kw, batch, d_inner, L))
        for chunk in args.chunk_lens:
            scan.CHUNK_LEN = chunk
            try:
                got = ours_call()
                row[f"ours_chunk{chunk}_rel_l2"] = errors(got, ref)[0]
                row[f"ours_chunk{chunk}_ms"] = time_ms(graphed(ours_call))
            finally:
                scan.CHUNK_LEN = None
        if selective_scan_fn is not None:
            m = dequantized_fp16(kw)

            def theirs():
                return selective_scan_fn(m["u"], m["delta"], m["A"], m["B"], m["C"], m["D"], m["z"],
                                         m["delta_bias"], delta_softplus=True)

            row["mamba_ssm_rel_l2"], row["mamba_ssm_max_rel"] = errors(theirs(), ref)
            row["mamba_ssm_ms"] = time_ms(graphed(theirs))
            row["ratio"] = row["ours_ms"] / row["mamba_ssm_ms"]
        rows.append(row)
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del kw, ref, ours, ours_call
        torch.cuda.empty_cache()

    print(f"\n{device}; ratio = ours / mamba_ssm (target <= {TARGET_RATIO}); ms per call, CUDA-graph replay")
    print("| B x D x L | chunk | ours ms | per-step walk ms | tiled walk ms | mamba_ssm ms | ratio | ours rel L2 | "
          "mamba_ssm rel L2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        walks = " | ".join(f"{r[f'ours_{w}_ms']:.4f}" if f"ours_{w}_ms" in r else "n/a" for w in ("per_step", "tiled"))
        theirs_ms = f"{r['mamba_ssm_ms']:.4f}" if "mamba_ssm_ms" in r else "n/a"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "n/a"
        their_err = f"{r['mamba_ssm_rel_l2']:.1e}" if "mamba_ssm_rel_l2" in r else "n/a"
        print(f"| {r['batch']} x {r['d_inner']} x {r['L']} | {r['chunk_len']} | {r['ours_ms']:.4f} | {walks} | "
              f"{theirs_ms} | {ratio} | {r['ours_rel_l2']:.1e} | {their_err} |")
    if args.json:
        write_json(args.json, device, {"commit": args.commit}, rows=rows)
    # Ours must compute the scan: fp16 output rounding is ~3e-4 relative.
    bad = [r for r in rows if not all(r.get(f"ours{w}_rel_l2", 0.0) < 2e-3 for w in ("", "_per_step", "_tiled"))]
    if bad:
        print(f"benchmarks/scan.py: ours is off the fp32 reference on {len(bad)} shapes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
