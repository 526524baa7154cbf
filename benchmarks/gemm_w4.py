"""Benchmark the 4-bit-weight GEMM kernels (kernels/gemm_w4.py) against cuBLAS fp16 and our int8 GEMM.

    python benchmarks/gemm_w4.py [--json PATH] [--m 1 16 64 2048] [--group 128] [--sweep]
        [--layers in_proj out_proj lm_head]

Needs a CUDA device. For each Linear of mamba-2.8b (K -> N) and each M (1, 16, 64: decode batches;
2048: a prefill), graph-replayed median times (triton.testing.do_bench, L2 flushed) of:

* w4a16  -- `w4a16_gemm`: fp16 activations, packed int4 weights, fp16 group scales, fp16 out
            (at M = 1 its GEMV kernel);
* w4a8   -- `w4a8_gemm`: int8 activations, int4 weights, fp16 out (the kernel its rule picks);
* w4a8s  -- the same on gemm_w4_skinny.py's kernel with its rule's config (M <= 64);
* w8a8   -- our int8 GEMM (`w8a8_linear`), per-channel int8 weights, fp16 out;
* fp16   -- `F.linear` in fp16 (cuBLAS), what mamba_ssm runs.

Speedups are fp16 time / ours. wTB/s is the weight bytes each streams per second (what bounds
decode), against the copy bandwidth measured in the same run (`copy`: a 1 GiB device-to-device copy,
read + write). Every row's result is checked against the op's reference. `--sweep` also times
a small grid of launch configs (W4A16 at M = 1, W4A8 at M = 64, the skinny W4A8 kernel's
`candidates` at M = 16 and 64; `gemv_w4.default_config`, `gemm_w4.default_config` and
`gemm_w4_skinny.gpu_config` are the rules' picks) and prints the fastest.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from gpu_timing import graphed, require_gpu, time_ms, write_json

SHAPES_2_8B = {"in_proj": (2560, 10240), "x_proj": (5120, 192), "dt_proj": (160, 5120), "out_proj": (5120, 2560)}
# The LM head (vocabulary 50280), 4-bit in Quamba2's recipes since session 54: timed when named.
HEAD_2_8B = {"lm_head": (2560, 50280)}
TIMEABLE = {**SHAPES_2_8B, **HEAD_2_8B}


def sweep(gemm_w4, gemv_w4, x, x_q, x_scale, packed, scale, group: int, m: int) -> dict:
    """{kernel: (ms, config)} of the fastest config of a grid for this problem: W4A16 at one row
    (its target is batch-1 decode), W4A8 at 64 (batch-64 decode), the skinny W4A8 kernel at 16 and 64."""
    from quamba_fx.kernels import gemm_w4_skinny
    from quamba_fx.kernels.dispatch import sm_count

    kernels = [kernel for kernel, rows in (("w4a16", 1), ("w4a8", 64)) if rows == m]
    block_m = 16 if m <= 16 else 64
    grid = [(block_m, bn, bk, warps, 3) for bn in (16, 32, 64, 128) for bk in (64, 128) for warps in (4, 8)
            if group % bk == 0]
    best = {}
    if m == 1:
        n, k = packed.shape[0], x.shape[-1]
        rule = gemv_w4.default_config(n, k)
        for config in [(bn, bk, warps, splits) for bn in (16, 32, 64) for bk in (256, 512, 1024) for warps in (4, 8)
                       for splits in sorted({1, rule[3], 2 * rule[3]})]:
            t = time_ms(graphed(lambda: gemm_w4.w4a16_gemm(x, packed, scale, group, gemv=config)), rep=50)
            if "w4a16 gemv" not in best or t < best["w4a16 gemv"][0]:
                best["w4a16 gemv"] = (t, config)
    for kernel in kernels:
        for config in grid:
            if kernel == "w4a16":
                fn = lambda: gemm_w4.w4a16_gemm(x, packed, scale, group, config=config)  # noqa: E731
            else:
                fn = lambda: gemm_w4.w4a8_gemm(x_q, x_scale, packed, scale, group, None, None, torch.float16,  # noqa: E731
                                               config)
            try:
                t = time_ms(graphed(fn), rep=50)
            except Exception:  # noqa: BLE001 - a config that does not compile (shared memory) is skipped
                continue
            if kernel not in best or t < best[kernel][0]:
                best[kernel] = (t, config)
    if m in (16, 64) and gemm_w4_skinny.supported(group):
        n, k = packed.shape[0], x_q.shape[-1]
        for config in gemm_w4_skinny.candidates(m, n, k, group, sm_count()):
            fn = lambda: gemm_w4.w4a8_gemm(x_q, x_scale, packed, scale, group, None, None, torch.float16,  # noqa: E731
                                           skinny=config)
            try:
                t = time_ms(graphed(fn), rep=50)
            except Exception:  # noqa: BLE001 - a config that does not compile (shared memory) is skipped
                continue
            if "w4a8 skinny" not in best or t < best["w4a8 skinny"][0]:
                best["w4a8 skinny"] = (t, config)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 2048])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--json")
    parser.add_argument("--sweep", action="store_true", help="time a grid of launch configs per row")
    parser.add_argument("--layers", nargs="+", choices=sorted(TIMEABLE), default=list(SHAPES_2_8B),
                        help="the Linears timed (e.g. the ones a profiler run looks at; lm_head only when named)")
    args = parser.parse_args()
    device = require_gpu("gemm_w4.py")
    from quamba_fx.kernels import gemm  # noqa: F401  (registers w8a8_linear)
    from quamba_fx.kernels import gemm_w4, gemm_w4_skinny, gemv_w4
    from quamba_fx.kernels.dispatch import sm_count
    from quamba_fx.quant.int4 import quantize_weight_int4
    from quamba_fx.quant.qops import quantize_weight_per_channel

    big = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    copy_ms = time_ms(graphed(big.clone))
    copy_tbs = 2 * big.numel() * 2 / (copy_ms * 1e-3) / 1e12
    print(f"{device}; copy {copy_tbs:.2f} TB/s (read + write)")
    del big
    rows = []
    print(f"{'layer':9} {'M':>5} {'fp16 ms':>8} {'w8a8':>8} {'w4a16':>8} {'w4a8':>8} {'w4a8s':>8} {'w4a16 x':>8} "
          f"{'w4a8 x':>8} {'w4a8s x':>8} {'w4 wTB/s':>9}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in args.layers:
        k, n = TIMEABLE[name]
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        packed, scale = quantize_weight_int4(w, args.group)
        w8, s8 = quantize_weight_per_channel(w)
        w16 = w.half()
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=g).half()
            x_q = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
            x_scale = torch.tensor(0.01, device="cuda")
            calls = {
                "fp16": lambda: F.linear(x, w16),
                "w8a8": lambda: torch.ops.quamba.w8a8_linear(x_q, x_scale, w8, s8, None, None, torch.float16),
                "w4a16": lambda: gemm_w4.w4a16_gemm(x, packed, scale, args.group),
                "w4a8": lambda: gemm_w4.w4a8_gemm(x_q, x_scale, packed, scale, args.group, None, None, torch.float16),
            }
            skinny = (gemm_w4_skinny.gpu_config(m, n, k, args.group, sm_count())
                      if m <= gemm_w4_skinny.MAX_M and gemm_w4_skinny.supported(args.group) else None)
            if skinny:
                calls["w4a8s"] = lambda: gemm_w4.w4a8_gemm(x_q, x_scale, packed, scale, args.group, None, None,
                                                           torch.float16, skinny=skinny)
            ms = {key: time_ms(graphed(fn)) for key, fn in calls.items()}
            check16 = (calls["w4a16"]().float() - torch.ops.quamba.w4a16_linear(x, packed, scale, args.group).float())
            check8 = (calls["w4a8"]().float() - torch.ops.quamba.w4a8_linear(x_q, x_scale, packed, scale, args.group,
                                                                               None, None, torch.float16).float())
            assert float(check16.abs().max()) < 0.05 and float(check8.abs().max()) < 0.05, (name, m)
            if skinny:
                check8s = calls["w4a8s"]().float() - calls["w4a8"]().float()
                assert float(check8s.abs().max()) < 0.05, (name, m, "skinny")
            w4_tbs = packed.numel() / (ms["w4a16"] * 1e-3) / 1e12
            s_ms, s_x = (f"{ms['w4a8s']:8.4f}", f"{ms['fp16'] / ms['w4a8s']:7.2f}x") if skinny else ("-", "-")
            print(f"{name:9} {m:5d} {ms['fp16']:8.4f} {ms['w8a8']:8.4f} {ms['w4a16']:8.4f} {ms['w4a8']:8.4f} "
                  f"{s_ms:>8} {ms['fp16'] / ms['w4a16']:7.2f}x {ms['fp16'] / ms['w4a8']:7.2f}x {s_x:>8} {w4_tbs:9.2f}")
            row = {"layer": name, "k": k, "n": n, "m": m, "ms": ms, "default": gemm_w4.default_config(m, n, args.group),
                   "skinny_default": skinny}
            if args.sweep:
                row["sweep"] = sweep(gemm_w4, gemv_w4, x, x_q, x_scale, packed, scale, args.group, m)
                for kernel, (best_ms, best) in row["sweep"].items():
                    print(f"    {kernel}: best {best_ms:.4f} ms with {best} (default {ms[kernel.split()[0]]:.4f})")
            rows.append(row)
    if args.json:
        write_json(args.json, device, {"copy_tbs": copy_tbs, "group": args.group}, rows=rows)


if __name__ == "__main__":
    main()
