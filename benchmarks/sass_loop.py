"""Count the instructions of a Triton kernel's hottest loop in its sm_90 SASS, without a GPU.

    python benchmarks/sass_loop.py gemv_w4 [--set ROWS=2 THREAD_ROWS=8 CHUNKS=16 SPLITS=4] [--warps 4] [--maxnreg 32]
    python benchmarks/sass_loop.py gemv --set SPLIT_K=4
    python benchmarks/sass_loop.py gemm_w4 --set BLOCK_M=64 BLOCK_N=128 BLOCK_K=64 A8=1
    python benchmarks/sass_loop.py gemm_w4_skinny --set BLOCK_M=16 --warps 4 --stages 6
    python benchmarks/sass_loop.py scan --warps 4 --set PASS=1 [--sig B_ptr=*fp16 C_ptr=*fp16]

Triton compiles for a target it is told about, and its wheel ships `ptxas` and `nvdisasm`, so a
kernel's machine code for the H200 can be read on a CPU-only machine. What this prints: the
instruction count of the largest loop (a label with a backward branch to it), those instructions
per element of the loop's tile that a thread handles (e.g. weight bytes), the mix by
opcode, whether the loop goes through shared memory (STS / LDS / BAR: layout conversions), and
the registers a thread takes and whether any spill (STL / LDL anywhere in the kernel; `--maxnreg`
caps them as Triton's launch option does).
Memory-bound kernels are not timed by it; it says how many instructions each byte costs, which
decides whether a loop can keep up with memory at all (docs/benchmarks.md, session 27).

Each kernel below names its signature and default constexprs; `--set` overrides constexprs.
Pointers, strides and the sizes the model's shapes make multiples of 16 are declared so, as
Triton specialises them at run time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from typing import Optional

# The selective scan's arguments, its layouts in the model (u, delta, z, y [B, L, D] read as
# [B, D, L], so channel stride 1; B and C slices of x_proj's output, state stride 1; A and the
# states d_state-contiguous) and the W8A8 flags.
_SCAN_SIGNATURE = {
    **{name: "*i8" for name in ("u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr")},
    **{name: "*fp32" for name in ("A_ptr", "D_ptr", "bias_ptr", "u_scale_ptr", "dt_scale_ptr", "B_scale_ptr",
                                  "C_scale_ptr", "z_scale_ptr", "h0_ptr", "hT_ptr", "hc_ptr", "sc_ptr")},
    "sync_ptr": "*i32",
    "y_ptr": "*fp16",
    # dt_proj's input, weight and epilogue operands (read only with DT_PROJ).
    "px_ptr": "*i8", "pw_ptr": "*i8", **{name: "*fp32" for name in ("px_scale_ptr", "pw_scale_ptr", "pb_ptr")},
    **{name: "i32" for name in ("stride_pxb", "stride_pxl", "stride_pwd")},
    **{name: "i32" for name in ("batch_bucket", "d_inner", "d_state", "L", "chunk_len", "n_chunks",
                                "stride_ub", "stride_ul", "stride_tb", "stride_tl", "stride_zb", "stride_zl",
                                "stride_Bb", "stride_Bl", "stride_Cb", "stride_Cl", "stride_Ad", "stride_hb",
                                "stride_hd", "stride_yb", "stride_yl", "stride_fb", "stride_fd", "stride_cc",
                                "stride_cb")},
}
# Unit strides are constants to the compiled kernel (Triton specialises an integer argument of 1).
_SCAN_CONSTEXPRS = {
    **{name: 1 for name in ("stride_ud", "stride_td", "stride_zd", "stride_Bn", "stride_Cn", "stride_An",
                            "stride_hn", "stride_yd", "stride_fn")},
    **{flag: True for flag in ("U_Q", "DT_Q", "B_Q", "C_Q", "Z_Q", "HAS_D", "HAS_Z", "SOFTPLUS", "WRITE_FINAL",
                               "FAST_MATH")},
    "HAS_H0": False, "PASS": 3, "NS": 16, "USE_PDL": True, "DT_PROJ": False, "PW_PER_CHANNEL": True,
    "PW_HAS_BIAS": True, "R": 160,
}
# Multiples of 16 in the model: d_inner, d_state (16), and every row stride, B's and C's included
# (x_proj's output rows of R + 2 N = 192 bytes on mamba-2.8b), so their loads are vectorised there.
_SCAN_MULTIPLES = ("d_inner", "d_state", "stride_ul", "stride_tl", "stride_zl", "stride_yl", "stride_Bl", "stride_Cl",
                   "stride_pxl")

# kernel name -> (module, function, signature, default constexprs, the integer arguments the
# model's shapes make multiples of 16 (Triton specialises on that at run time, and the address
# arithmetic in the loop depends on it), elements a thread handles per loop step as a function of
# the constexprs and warps: what the "per element" count divides by).
KERNELS = {
    "gemv": (
        "quamba_fx.kernels.gemv", "_int8_gemv_jit",
        {"x_ptr": "*i32", "w_ptr": "*i32", **{name: "*fp32" for name in ("x_scale_ptr", "w_scale_ptr", "bias_ptr",
                                                                        "out_scale_ptr")},
         "out_ptr": "*i8", "partial_ptr": "*i32", "count_ptr": "*i32",
         # The conv step's state and output are int8 codes; its weight, bias and scale fp32.
         "cs_ptr": "*i8", "cw_ptr": "*fp32", "cb_ptr": "*fp32", "cu_scale_ptr": "*fp32", "u_ptr": "*i8",
         **{name: "i32" for name in ("N", "K", "stride_wn", "D_CONV", "CONV_START", "stride_csd", "stride_csk",
                                     "stride_cwd", "stride_cwk", "PF_BYTES", "PF_PROGRAMS")}},
        {"W_PER_CHANNEL": True, "HAS_BIAS": False, "OUT_MODE": 0, "OUT_PER_CHANNEL": False, "BLOCK_N": 16,
         "BLOCK_K": 128, "SPLIT_K": 1, "EVEN_K": True, "DP4A": True, "USE_PDL": True, "PREFETCH": True, "CONV": False,
         "CONV_W": 4, "CONV_HAS_BIAS": False, "CONV_PER_CHANNEL": False, "FAST_MATH": True},
        ("N", "K"),
        lambda c, warps: c["BLOCK_N"] * c["BLOCK_K"] * 4 / (32 * warps),  # weight bytes (K counts int32 words)
    ),
    "gemv_w4": (
        "quamba_fx.kernels.gemv_w4", "_w4a16_gemv_kernel",
        {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp16", "bias_ptr": "*fp32", "out_ptr": "*fp16",
         "partial_ptr": "*fp32", "count_ptr": "*i32", "cs_ptr": "*fp16", "cw_ptr": "*fp32", "cb_ptr": "*fp32",
         "u_ptr": "*fp16", **{name: "i32" for name in ("D_CONV", "CONV_START", "stride_csd", "stride_csk", "stride_cwd",
                                                       "stride_cwk", "N", "K_WORDS", "SPLIT_CHUNKS", "stride_wn",
                                                       "stride_sn")}},
        {"GROUP_CHUNKS": 4, "ROWS": 1, "THREAD_ROWS": 16, "CHUNKS": 16, "SPLITS": 1, "EVEN_K": True, "HAS_BIAS": False,
         "PTX": True, "USE_PDL": True, "CONV": False, "CONV_W": 4, "CONV_HAS_BIAS": False},
        ("N", "K_WORDS", "SPLIT_CHUNKS"),
        lambda c, warps: c["ROWS"] * c["THREAD_ROWS"] * c["CHUNKS"] * 16 / (32 * warps),  # weight bytes
    ),
    "gemm_w4": (
        "quamba_fx.kernels.gemm_w4", "_w4_gemm_kernel",
        {"x_ptr": "*i8", "w_ptr": "*u8", "s_ptr": "*fp16", "bias_ptr": "*fp32", "x_scale_ptr": "*fp32",
         "out_scale_ptr": "*fp32", "out_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
         "stride_wn": "i32", "stride_sn": "i32", "stride_om": "i32"},
        {"GROUP": 128, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "EVEN_K": True, "A8": True, "IEEE": False,
         "HAS_BIAS": False, "REQUANT": False, "PTX": True},
        ("N", "K"),
        lambda c, warps: c["BLOCK_N"] * c["BLOCK_K"] / (32 * warps),  # weight codes
    ),
    "gemm_w4_skinny": (
        "quamba_fx.kernels.gemm_w4_skinny", "_w4a8_skinny_kernel",
        {"x_ptr": "*i8", "w_ptr": "*u8", "s_ptr": "*fp16", "bias_ptr": "*fp32", "x_scale_ptr": "*fp32",
         "out_scale_ptr": "*fp32", "out_ptr": "*fp16", "partial_ptr": "*fp32", "count_ptr": "*i32",
         **{name: "i32" for name in ("M", "N", "K", "K_BYTES", "GROUPS", "stride_xm", "stride_wn", "stride_sn",
                                     "stride_om", "PF_BYTES", "PF_PROGRAMS")}},
        {"GROUP": 128, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "EVEN_K": True, "HAS_BIAS": False,
         "REQUANT": False, "PTX": True, "USE_PDL": True, "PREFETCH": True, "ONE_DOT": True},
        ("N", "K", "K_BYTES"),
        lambda c, warps: c["BLOCK_N"] * c["BLOCK_K"] / (32 * warps),  # weight codes
    ),
    "scan": (
        "quamba_fx.kernels.scan", "_selective_scan_kernel",
        _SCAN_SIGNATURE, {**_SCAN_CONSTEXPRS, "BLOCK_D": 128, "UNROLL": 2, "TILE_T": 0}, _SCAN_MULTIPLES,
        # channel-steps: UNROLL a loop iteration, or TILE_T for the tiled walk
        lambda c, warps: c["BLOCK_D"] * (c["TILE_T"] or c["UNROLL"]) / (32 * warps),
    ),
}


def compile_sm90(module: str, function: str, signature: dict, constexprs: dict, multiples: tuple, warps: int,
                 stages: int, maxnreg: Optional[int] = None):
    """Triton's compiled kernel for sm_90 (its `asm` holds the PTX and the cubin): `signature` maps
    the arguments to Triton types, `constexprs` gives the constexprs' values, and pointers, strides
    and the arguments named in `multiples` are declared multiples of 16; `maxnreg` caps the
    registers a thread."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), function)
    if not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # an autotuned kernel's JIT function
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    # Attributes are keyed by the argument's position in the kernel, not in `signature`.
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or name.startswith("stride") or name in multiples}
    source = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_sass(module: str, function: str, signature: dict, constexprs: dict, multiples: tuple, warps: int,
                 stages: int) -> str:
    """The kernel's SASS for sm_90 (see `compile_sm90`), disassembled with Triton's bundled nvdisasm."""
    return disassemble(compile_sm90(module, function, signature, constexprs, multiples, warps, stages))


def run_cuda_tool(tool: str, cubin: bytes, *args: str) -> str:
    """The stdout of Triton's bundled CUDA binary tool `tool` (nvdisasm, cuobjdump) run with `args`
    on `cubin`, written to a temporary file for it."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([path, *args, f.name], capture_output=True, text=True, check=True).stdout


def registers(compiled) -> int:
    """The registers a thread of a kernel `compile_sm90` returned takes (cuobjdump's REG)."""
    usage = run_cuda_tool("cuobjdump", compiled.asm["cubin"], "--dump-resource-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1))


def disassemble(compiled) -> str:
    """The SASS of a kernel `compile_sm90` returned, from Triton's bundled nvdisasm."""
    return run_cuda_tool("nvdisasm", compiled.asm["cubin"], "-c")


_INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")


def instructions(sass: str) -> list[str]:
    """Every instruction of nvdisasm's listing, in order, without addresses and encodings."""
    return [m.group(1) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]


def hottest_loop(sass: str) -> list[str]:
    """The instructions of the largest loop: from a label to the last backward branch to it."""
    labels, listing = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(listing)
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            listing.append(instruction.group(1))
    best: list[str] = []
    for end, text in enumerate(listing):
        target = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            body = listing[labels[target.group(1)]:end + 1]
            best = body if len(body) > len(best) else best
    return best


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override constexprs")
    parser.add_argument("--sig", nargs="*", default=[], metavar="NAME=TYPE", help="override argument types (*fp32, i32)")
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--maxnreg", type=int, help="cap the registers a thread (Triton's maxnreg)")
    args = parser.parse_args()
    module, function, signature, constexprs, multiples, per_thread = KERNELS[args.kernel]
    constexprs = dict(constexprs)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in constexprs:
            parser.error(f"{args.kernel} has no constexpr {name!r} (it has {', '.join(constexprs)})")
        constexprs[name] = int(value) if not isinstance(constexprs[name], bool) else value not in ("0", "False")
    signature = dict(signature)
    for item in args.sig:
        name, _, kind = item.partition("=")
        if name not in signature:
            parser.error(f"{args.kernel} has no argument {name!r}")
        signature[name] = kind
    compiled = compile_sm90(module, function, signature, constexprs, multiples, args.warps, args.stages, args.maxnreg)
    sass = disassemble(compiled)
    loop = hottest_loop(sass)
    if not loop:
        raise SystemExit(f"{args.kernel}: no loop found in the SASS")
    mix = collections.Counter(opcode(i) for i in loop)
    elements = per_thread(constexprs, args.warps)
    print(f"{args.kernel} {constexprs} warps={args.warps}")
    print(f"loop: {len(loop)} instructions, {len(loop) / elements:.2f} per element ({elements:g} a thread a step)")
    print("through shared memory:", {op: mix[op] for op in ("STS", "LDS", "LDSM", "BAR") if mix[op]} or "no")
    print("mix:", ", ".join(f"{op} {count}" for op, count in mix.most_common()))
    spills = sum(opcode(i) in ("STL", "LDL") for i in instructions(sass))
    print(f"registers a thread: {registers(compiled)}; spills (STL / LDL in the kernel): {spills or 'none'}")


if __name__ == "__main__":
    main()
