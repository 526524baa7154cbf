"""Mamba-2's kernels (the SSD scan's, kernels/ssd.py; the gated norm, kernels/gated_norm.py; and
the gated norm fused into out_proj's Hadamard quantize, kernels/hadamard.py) compiled for sm_90
offline: spills and wgmma.

    python benchmarks/mamba2_sm90.py [--builds fp16:fp16 i8:fp16 fp32:fp32]

No GPU needed (Triton's bundled ptxas and nvdisasm). A build is INPUTS:PRODUCTS, the dtype of x,
dt, B and C and the one the matrix products round their operands to (an fp16 model: fp16:fp16; a
W8A8 graph lowered to fp16, whose scan reads the int8 codes with their scales: i8:fp16; i8c:fp16 the
same with a scale per channel of x, as Quamba2's recipes quantize it). For each build and kernel,
at the tile sizes `ssd.tiles` picks for mamba2-2.7b (chunk 256, head_dim 64, state 128; the gated
norm's rows of d_inner 5120, int8 gate, fp16 out; the fused one in the decode graph's one-row
tiles, for 16-bit products only, as the lowering fuses it), one row: local stores and loads in its SASS
(spills), its wgmma instructions (`HGMMA`: products on Hopper's tensor cores) and the shared
memory a program asks (a launch fails above sm_90's 232448 bytes). With 16-bit products the three
product kernels should use wgmma; nothing should spill. The interpreter cannot see any of it;
tests/test_kernel_ssd.py checks them from this script's output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHUNK, HEAD_DIM, STATE, D_INNER = 256, 64, 128, 5120
# Integer arguments whose mamba2-2.7b values are multiples of 16 (2048 steps, 80 heads, ...): a
# launch specializes on that (pointers and strides too), and the vector width of every load
# follows from it. Without it the build shows scalar loads the GPU never runs.
MULTIPLES = ("L", "H", "P", "N", "chunk", "heads_per_group", "PN")
NORM_MULTIPLES = ("D", "G")  # the gated norm's row width and group width, 5120 each
HADAMARD_MULTIPLES = ()  # a decode step's rows and blocks: the batch, 1 at batch 1
SSD = "quamba_fx.kernels.ssd"


def _kinds(names: str, kind: str) -> dict[str, str]:
    return {name: kind for name in names.split()}


def _blocks(constexprs: dict, launch: dict) -> dict:
    """`constexprs` plus the BLOCK_* entries of one of `ssd.tiles`' launches."""
    return dict(constexprs, **{k: v for k, v in launch.items() if k.startswith("BLOCK_")})


def launch_options(name: str) -> tuple[int, int]:
    """(num_warps, num_stages) the kernel `name` launches with."""
    from quamba_fx.kernels import ssd

    if name == "_gated_rmsnorm_kernel":
        return 8, 2  # gated_norm's launch: 8 warps for 8192-wide rows
    if name == "_hadamard_packed_kernel":
        from quamba_fx.kernels import hadamard

        return hadamard.GATED_WARPS, 3  # hadamard._launch's for the gated tiles (the loop's own: STAGES=1)
    kernel = {"_chunk_cb_kernel": "cb", "_chunk_state_kernel": "state", "_chunk_scan_kernel": "scan"}.get(name)
    if kernel is None:
        return 4, 2
    return ssd.LAUNCH[kernel]["num_warps"], ssd.LAUNCH[kernel]["num_stages"]


def builds(dtype: str, products: str) -> dict[str, tuple[str, dict, dict]]:
    """Kernel name -> (module, signature, constexprs) for inputs (x, dt, B, C) of `dtype` ("fp16",
    "fp32", "i8": the int8 codes with per-tensor scales, or "i8c": x's scale per channel) and
    products in `products` ("fp16" or "fp32"); the gated norm reads y as the scan writes it and an
    int8 gate."""
    import triton.language as tl

    from quamba_fx.kernels import ssd

    ieee = products == "fp32"
    t = ssd.tiles(CHUNK, HEAD_DIM, STATE, ieee=ieee)
    scaled = dtype in ("i8", "i8c")
    dot = dict(DOT=getattr(tl, {"fp16": "float16", "fp32": "float32"}[products]), IEEE=ieee, SCALED=scaled)
    per_channel = dict(PER_CHANNEL_X=dtype == "i8c")
    inputs = "*i8" if scaled else f"*{dtype}"
    f32 = "*fp32"
    entering = f32 if ieee else f"*{products}"  # the states entering each chunk, as ssd_scan keeps them
    out = f32 if ieee else f"*{products}"  # y as a graph lowered to the products' dtype asks for it
    return {
        "_chunk_dt_kernel": (
            SSD,
            {"dt_ptr": inputs, **_kinds("A_ptr dt_bias_ptr dt_out_ptr cum_ptr scales_ptr", f32),
             **_kinds("L H chunk n_chunks", "i32"), **_kinds("dt_min dt_max", "fp32"),
             **_kinds("stride_dtb stride_dtl", "i32")},
            dict(HAS_DT_BIAS=True, SOFTPLUS=True, CLAMP_MAX=False, SCALED=dot["SCALED"], BLOCK_H=16, BLOCK_Q=CHUNK)),
        "_chunk_cb_kernel": (
            SSD,
            {**_kinds("B_ptr C_ptr", inputs), **_kinds("cb_ptr scales_ptr", f32),
             **_kinds("L G N chunk n_chunks stride_bb stride_bl stride_bg stride_cb stride_cl stride_cg", "i32")},
            _blocks(dot, t["cb"])),
        "_chunk_state_kernel": (
            SSD,
            {**_kinds("x_ptr B_ptr", inputs), **_kinds("dt_ptr cum_ptr states_ptr scales_ptr", f32),
             **_kinds("L H P N chunk n_chunks heads_per_group stride_xb stride_xl stride_xh stride_bb stride_bl "
                      "stride_bg", "i32")},
            _blocks(dict(dot, **per_channel), t["state"])),
        "_state_passing_kernel": (
            SSD,
            {**_kinds("states_ptr cum_ptr state_in_ptr", f32), "entering_ptr": entering,
             "state_out_ptr": f32, **_kinds("H PN chunk n_chunks", "i32")},
            dict(HAS_STATE_IN=False, HAS_STATE_OUT=True, BLOCK=1024)),
        "_chunk_scan_kernel": (
            SSD,
            {**_kinds("x_ptr C_ptr", inputs), **_kinds("cb_ptr dt_ptr cum_ptr", f32), "entering_ptr": entering,
             **_kinds("D_ptr scales_ptr", f32), "y_ptr": out,
             **_kinds("L H P N G chunk n_chunks heads_per_group stride_xb stride_xl stride_xh stride_cb stride_cl "
                      "stride_cg stride_yb stride_yl stride_yh", "i32")},
            _blocks(dict(dot, HAS_D=True, **per_channel), t["scan"])),
        "_state_update_kernel": (
            SSD,
            {"state_ptr": "*fp16", **_kinds("x_ptr dt_ptr", inputs), "A_ptr": f32, **_kinds("B_ptr C_ptr", inputs),
             **_kinds("D_ptr dt_bias_ptr y_ptr scales_ptr", f32), **_kinds("L H P N heads_per_group", "i32"),
             **_kinds("dt_min dt_max", "fp32"),
             **_kinds("stride_xb stride_xl stride_xh stride_dtb stride_dtl stride_bb stride_bl stride_bg stride_cb "
                      "stride_cl stride_cg stride_yb stride_yl stride_yh", "i32")},
            dict(HAS_D=True, HAS_DT_BIAS=True, SOFTPLUS=True, CLAMP_MAX=False, SCALED=scaled, **per_channel,
                 BLOCK_P=2048 // STATE, BLOCK_N=STATE)),
        "_gated_rmsnorm_kernel": (
            "quamba_fx.kernels.gated_norm",
            {"y_ptr": out, "z_ptr": "*i8", **_kinds("z_scale_ptr w_ptr", f32), "out_ptr": "*fp16",
             **_kinds("D G groups stride_y stride_z", "i32"), "eps": "fp32"},
            dict(Z_INT8=True, BLOCK=8192, SINGLE=True)),
    } | (_gated_hadamard(out) if products == "fp16" else {})


def _gated_hadamard(y: str) -> dict[str, tuple[str, dict, dict]]:
    """The fused gated norm + Hadamard quantize at d_inner 5120 as a decode step runs it (20 x 256,
    one row a 32-row tile), reading y as `y` and an int8 gate at in_proj's row stride."""
    import math

    return {"_hadamard_packed_kernel": (
        "quamba_fx.kernels.hadamard",
        {"x_ptr": y, "d_ptr": "*fp16", "scale_ptr": "*fp32", "out_ptr": "*i8",
         **_kinds("rows n_blocks D1 stride_0 stride_1", "i32"), "z_ptr": "*i8", **_kinds("z_scale_ptr w_ptr", "*fp32"),
         **_kinds("stride_z0 stride_z1", "i32"), "eps": "fp32"},
        dict(INV_SQRT_N=1 / math.sqrt(D_INNER), M=20, R=1, MP=32, P=256, LOG_P=8, QUANT=1, EMULATE_DOT=False,
             STAGES=1, USE_PDL=True, GATED=True, Z_INT8=True, GROUP_ROWS=20))}


def main(argv: list[str] | None = None) -> int:
    from sass_loop import compile_sm90, disassemble, instructions, opcode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = ["fp16:fp16", "i8:fp16", "i8c:fp16", "fp32:fp16", "fp32:fp32", "i8:fp32", "i8c:fp32"]
    parser.add_argument("--builds", nargs="+", default=["fp16:fp16", "i8:fp16", "i8c:fp16", "fp32:fp32"],
                        choices=choices,
                        metavar="INPUTS:PRODUCTS")
    args = parser.parse_args(argv)
    print("build kernel local_stores local_loads wgmma shared_bytes")
    for build in args.builds:
        for name, (module, signature, constexprs) in builds(*build.split(":")).items():
            multiples = {"_gated_rmsnorm_kernel": NORM_MULTIPLES,
                         "_hadamard_packed_kernel": HADAMARD_MULTIPLES}.get(name, MULTIPLES)
            compiled = compile_sm90(module, name, signature, constexprs, multiples, *launch_options(name))
            ops = [opcode(i) for i in instructions(disassemble(compiled))]
            counts = [ops.count(op) for op in ("STL", "LDL", "HGMMA")]
            print(build, name, *counts, compiled.metadata.shared, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
