"""The persistent TMA GEMM's prefill candidates (kernels/gemm_tma.py) compiled for sm_90 offline:
registers, spills, tensor-core instructions and shared memory, int8 and e4m3.

    python benchmarks/gemm_tma_sm90.py [--promote 128 none]

No GPU needed (Triton's bundled ptxas, nvdisasm and cuobjdump). One row a candidate and build, at
2.8b's in_proj shape (N 10240, K 2560) with an int8 output (in_proj's requantized one): int8
operands, then e4m3 at each promotion interval (`gemm_fp8._PREFILL_PROMOTE_K`; none = the tensor cores'
own accumulation). Columns: the build, the tile (BLOCK_M x BLOCK_N x BLOCK_K / warps / stages /
programs an SM, split epilogue), registers a thread, local stores and loads (spills), the
kernel's `*GMMA` instructions (wgmma on Hopper's tensor cores), shared memory a program asks (the
larger of the launch's own estimate and the cubin's; `candidates` already keeps what the programs
sharing an SM ask within its shared memory), and whether those programs (`per_sm`) fit its
register file. tests/test_kernel_gemm_fp8.py checks them from this script's output: what the
interpreter cannot see.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N, K = 10240, 2560  # 2.8b's in_proj
REGISTERS_PER_SM = 65536
PROGRAMS = 132  # the H200's SMs: a constexpr of the persistent loop


def registers(cubin: bytes) -> int:
    """Registers a thread of the cubin's kernel, from cuobjdump's resource usage."""
    from sass_loop import run_cuda_tool

    return int(re.search(r"REG:(\d+)", run_cuda_tool("cuobjdump", cubin, "--dump-resource-usage")).group(1))


def build(config, fp8: bool, promote_k):
    """The compiled kernel for `config` with the flags `gemm_tma._call` would pass."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quamba_fx.kernels import gemm_tma

    operand = "fp8e4nv" if fp8 else "i8"
    block_n_out = config.block_n // 2 if config.split else config.block_n
    signature = {
        "x_desc": f"tensordesc<{operand}[{config.block_m}, {config.block_k}]>",
        "w_desc": f"tensordesc<{operand}[{config.block_n}, {config.block_k}]>",
        "out_desc": f"tensordesc<i8[{config.block_m}, {block_n_out}]>",
        **{name: "*fp32" for name in ("x_scale_ptr", "w_scale_ptr", "bias_ptr", "out_scale_ptr")},
        "M": "i32", "N": "i32", "K": "i32",
    }
    flags = dict(W_PER_CHANNEL=True, HAS_BIAS=False, OUT_MODE=0, OUT_PER_CHANNEL=False)
    if fp8:
        flags.update(gemm_tma.fp8_flags(promote_k))
    # Every constexpr named, defaults too: an offline build does not fill them in.
    constexprs = {
        "FP8": False, "PROMOTE_K": None, **gemm_tma.promotion_constexprs(flags, config.block_k),
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "GROUP_M": config.group_m,
        "NUM_PROGRAMS": PROGRAMS * config.per_sm, "FLATTEN": config.flatten, "SPLIT": config.split,
        "WARP_SPECIALIZE": config.warp_specialize, "USE_PDL": True,  # as it launches on Hopper
    }
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name in ("N", "K")}
    source = ASTSource(fn=gemm_tma._gemm_tma_jit, signature={**signature, **{c: "constexpr" for c in constexprs}},
                       constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.warps, "num_stages": config.stages, "enable_fp_fusion": False})


def rows(promotes: list) -> list[dict]:
    from sass_loop import disassemble, instructions, opcode

    from quamba_fx.kernels import gemm_tma

    builds = [("i8", False, None)] + [(f"fp8:p{p if p is not None else 'none'}", True, p) for p in promotes]
    out = []
    for name, fp8, promote_k in builds:
        for config in gemm_tma.candidates(N, K, 1, fp8, promote_k):
            compiled = build(config, fp8, promote_k)
            listing = instructions(disassemble(compiled))
            regs = registers(compiled.asm["cubin"])
            out.append(dict(
                build=name,
                tile=(f"{config.block_m}x{config.block_n}x{config.block_k}/w{config.warps}/s{config.stages}"
                      f"/sm{config.per_sm}" + ("/split" if config.split else "")),
                registers=regs,
                local_stores=sum(opcode(i) == "STL" for i in listing),
                local_loads=sum(opcode(i) == "LDL" for i in listing),
                gmma=sum(opcode(i).endswith("GMMA") for i in listing),
                shared=max(compiled.metadata.shared, gemm_tma._smem_bytes(config, 1)),
                regs_fit_sm=int(config.per_sm * config.warps * 32 * regs <= REGISTERS_PER_SM),
            ))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--promote", nargs="+", default=["128", "none"],
                        help="fp8 promotion intervals to build (products, or none)")
    args = parser.parse_args(argv)
    promotes = [None if p == "none" else int(p) for p in args.promote]
    print("build tile registers local_stores local_loads gmma shared regs_fit_sm")
    for row in rows(promotes):
        print(" ".join(str(v) for v in row.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
