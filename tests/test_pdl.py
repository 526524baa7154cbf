"""The L2 weight prefetch of the decode GEMMs (kernels/pdl.py): which launches ask for it, that the
chunks of the asking programs cover exactly the window, that the compiled sm_90 kernels issue it
before they wait on the kernel ahead; that the decode state update with dt_proj inside loads the
weight before it waits; and that the prefill's conv and scan kernels read nothing before it."""

from __future__ import annotations

import textwrap

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import pdl
from quamba_fx.kernels.dispatch import INTERPRET

from .benchmark_scripts import BENCHMARKS, run_without_interpreter

_OFF = {"PF_BYTES": 0, "PF_PROGRAMS": 1, "PREFETCH": False}


@pytest.fixture
def pdl_device(monkeypatch):
    """Pretend the tensors' device launches with PDL, as an H100 / H200 does."""
    monkeypatch.setattr(pdl, "use_pdl", lambda device: True)
    monkeypatch.setattr(pdl, "L2_PREFETCH", True)


@pytest.mark.parametrize("prefill", [False, True])
def test_the_prefills_own_kernels_launch_with_pdl_only_when_asked(pdl_device, monkeypatch, prefill):
    monkeypatch.setattr(pdl, "PREFILL", prefill)
    assert pdl.launch_options("cuda")["USE_PDL"] is True and pdl.launch_options("cuda", pdl=False)["USE_PDL"] is False
    options = pdl.prefill_launch_options("cuda", fuse_fp=False)
    assert options["USE_PDL"] is prefill and options.get("launch_pdl", False) is prefill
    assert options["enable_fp_fusion"] is False


def test_no_prefetch_without_pdl():
    assert not pdl.use_pdl(torch.device("cpu"))
    assert pdl.prefetch_options(torch.zeros(64, 64, dtype=torch.int8), 8) == _OFF


def test_a_weight_past_the_window_prefetches_the_window(pdl_device):
    w = torch.zeros(pdl.L2_WINDOW_BYTES // 256 + 7, 256, dtype=torch.int8)
    assert pdl.prefetch_options(w, 132) == {"PF_BYTES": pdl.L2_WINDOW_BYTES, "PF_PROGRAMS": 132, "PREFETCH": True}


def test_at_most_one_program_an_sm_asks(pdl_device):
    w = torch.zeros(pdl.L2_WINDOW_BYTES // 256, 256, dtype=torch.int8)
    options = pdl.prefetch_options(w, 5 * pdl.sm_count(w.device))
    assert options["PF_PROGRAMS"] == pdl.sm_count(w.device) and options["PF_BYTES"] == pdl.L2_WINDOW_BYTES


def test_a_small_weight_prefetches_its_whole_16_byte_units(pdl_device):
    w = torch.zeros(3, 50, dtype=torch.int8)  # 150 bytes: the last 6 are no whole unit
    assert pdl.prefetch_options(w, 2) == {"PF_BYTES": 144, "PF_PROGRAMS": 2, "PREFETCH": True}
    w32 = torch.zeros(4, 8, dtype=torch.int32)  # counted in bytes, not elements
    assert pdl.prefetch_options(w32, 1)["PF_BYTES"] == 128


@pytest.mark.parametrize("case", ["switched off", "not contiguous", "misaligned", "no programs", "under 16 bytes"])
def test_no_prefetch_where_the_bulk_prefetch_cannot_take_the_weight(pdl_device, monkeypatch, case):
    w = torch.zeros(64, 128, dtype=torch.int8)
    programs = 4
    if case == "switched off":
        monkeypatch.setattr(pdl, "L2_PREFETCH", False)
    elif case == "not contiguous":
        w = w[:, :64]
    elif case == "misaligned":
        w = w.view(-1)[1:1 + 64 * 64].view(64, 64)
        assert w.data_ptr() % 16
    elif case == "no programs":
        programs = 0
    else:
        w = w[:1, :15].contiguous()
    assert pdl.prefetch_options(w, programs) == _OFF


@triton.jit
def _chunks_kernel(out_ptr, PF_BYTES, PF_PROGRAMS):
    pid = tl.program_id(0)
    start, end = pdl.prefetch_chunk(pid, PF_BYTES, PF_PROGRAMS)
    tl.store(out_ptr + 2 * pid, start)
    tl.store(out_ptr + 2 * pid + 1, end)


@settings(max_examples=25, deadline=None)
@given(units=st.integers(1, 5000), programs=st.integers(1, 40))
def test_the_asking_programs_chunks_cover_the_window_in_order(units, programs):
    nbytes = 16 * units
    # On the interpreter's CPU or, on a GPU machine, the GPU (a CPU tensor cannot go to a kernel).
    out = torch.full((programs, 2), -1, dtype=torch.int64, device="cpu" if INTERPRET else "cuda")
    _chunks_kernel[(programs,)](out, nbytes, programs)
    starts, ends = out[:, 0].tolist(), out[:, 1].tolist()
    assert starts[0] == 0 and ends[-1] == nbytes
    assert all(s <= e for s, e in zip(starts, ends))
    assert all(e == s for e, s in zip(ends, starts[1:]))  # no gap, no overlap
    assert all(s % 16 == 0 and e % 16 == 0 for s, e in zip(starts, ends))  # the instruction's units


# Compiled for sm_90 in a child process, by benchmarks/sass_loop.py's compile step: under
# TRITON_INTERPRET=1 (the test run's setting) the kernels are interpreted functions, which Triton
# cannot compile.
_COMPILE = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    from sass_loop import KERNELS, compile_sm90

    def ptx(module, function, signature, constexprs, warps):
        return compile_sm90(f"quamba_fx.kernels.{module}", function, signature, constexprs, (), warps, 3).asm["ptx"]

    def kinds(names, kind):
        return {name: kind for name in names.split()}

    module, function, signature, constexprs, multiples, _ = KERNELS["gemv"]
    print("gemv", compile_sm90(module, function, signature, constexprs, multiples, 8, 3).asm["ptx"].replace("\\n", " "))
    skinny_sig = {**kinds("x_ptr w_ptr", "*i8"), **kinds("x_scale_ptr w_scale_ptr bias_ptr out_scale_ptr", "*fp32"),
                  "out_ptr": "*i8", **kinds("partial_ptr count_ptr", "*i32"),
                  **kinds("M N K stride_xm stride_wn stride_om PF_BYTES PF_PROGRAMS", "i32")}
    epilogue = dict(W_PER_CHANNEL=True, HAS_BIAS=False, OUT_MODE=1, OUT_PER_CHANNEL=False, EVEN_K=True,
                    USE_PDL=True, PREFETCH=True)
    for early in (True, False):
        print("skinny", ptx("gemm_skinny", "_int8_gemm_skinny_jit", skinny_sig, dict(
            epilogue, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=1, EARLY=early), 4).replace("\\n", " "))
    module, function, signature, constexprs, multiples, _ = KERNELS["gemm_w4_skinny"]
    print("w4a8_skinny", compile_sm90(module, function, signature, constexprs, multiples, 4, 6).asm["ptx"].replace(
        "\\n", " "))
''')


def _run_compiled(script: str) -> list[str]:
    """The stdout lines of `script`, run without the interpreter, with benchmarks/ as its argument."""
    return run_without_interpreter(["-c", script, str(BENCHMARKS)]).splitlines()


def test_the_decode_gemms_prefetch_before_they_wait():
    kernels = _run_compiled(_COMPILE)
    assert [line.split()[0] for line in kernels] == ["gemv", "skinny", "skinny", "w4a8_skinny"]
    for line in kernels:
        prefetch, wait = line.find("cp.async.bulk.prefetch.L2.global"), line.find("griddepcontrol.wait")
        assert 0 <= prefetch < wait, line.split()[0]


# The decode state update with dt_proj inside (kernels/scan.py), int8 and 4-bit weights, compiled
# for sm_90 as above.
_COMPILE_UPDATE = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    from sass_loop import compile_sm90

    pointers = ("h_ptr u_ptr dt_ptr A_ptr B_ptr C_ptr D_ptr z_ptr bias_ptr u_scale_ptr dt_scale_ptr B_scale_ptr "
                "C_scale_ptr z_scale_ptr y_ptr px_ptr pw_ptr px_scale_ptr pw_scale_ptr pb_ptr").split()
    ints = ("R stride_pxb stride_pwd stride_pws d_inner d_state stride_hb stride_hd stride_hn stride_ub stride_ud "
            "stride_tb stride_td stride_zb stride_zd stride_Bb stride_Bn stride_Cb stride_Cn stride_Ad stride_An "
            "stride_yb stride_yd").split()
    flags = dict(U_Q=False, DT_Q=False, B_Q=False, C_Q=False, Z_Q=False, HAS_D=True, HAS_Z=True, SOFTPLUS=True,
                 FAST_MATH=True, NS=16, BLOCK_D=32, USE_PDL=True, DT_PROJ=True, PW_PER_CHANNEL=True, PW_HAS_BIAS=True,
                 BLOCK_R=256)
    for name, four_bit, weight in (("int8", False, "*i8"), ("w4", True, "*u8")):
        signature = {**{p: "*fp32" for p in pointers}, **{i: "i32" for i in ints}}
        signature.update(u_ptr="*fp16", z_ptr="*fp16", B_ptr="*fp16", C_ptr="*fp16", y_ptr="*fp16", h_ptr="*fp16",
                         px_ptr="*fp16" if four_bit else "*i8", pw_ptr=weight,
                         pw_scale_ptr="*fp16" if four_bit else "*fp32")
        kernel = compile_sm90("quamba_fx.kernels.scan", "_selective_state_update_kernel", signature,
                              dict(flags, PW_4BIT=four_bit, PW_GROUP=128 if four_bit else 1), (), 4, 1)
        print(name, kernel.asm["ptx"].replace("\\n", " "))
''')


@pytest.mark.slow  # two sm_90 compiles in a child process (~7 s on 2 cores)
def test_the_decode_state_update_loads_dt_projs_weight_before_it_waits():
    kernels = _run_compiled(_COMPILE_UPDATE)
    assert [line.split()[0] for line in kernels] == ["int8", "w4"]
    for line in kernels:
        wait = line.find("griddepcontrol.wait")
        assert 0 <= line.find("ld.global") < wait, line.split()[0]


# The prefill's conv and the three kernels of the chunked scan, compiled for sm_90 with PDL on.
_COMPILE_PREFILL = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    from sass_loop import KERNELS, compile_sm90

    def ptx(module, function, signature, constexprs, warps):
        return compile_sm90(f"quamba_fx.kernels.{module}", function, signature, constexprs, (), warps, 3).asm["ptx"]

    module, function, signature, constexprs, multiples, _ = KERNELS["scan"]
    for pass_ in (1, 3):
        print(f"scan_pass{pass_}", compile_sm90(module, function, signature, dict(constexprs, PASS=pass_),
                                                multiples, 4, 3).asm["ptx"].replace("\\n", " "))
    carry = {**{p: "*fp32" for p in ("A_ptr", "h0_ptr", "hc_ptr", "sc_ptr")},
             **{i: "i32" for i in ("d_inner", "d_state", "n_prev", "stride_Ad", "stride_An", "stride_hb",
                                   "stride_hd", "stride_hn", "stride_cc", "stride_cb")}}
    print("carry", ptx("scan", "_selective_scan_carry_kernel", carry,
                       dict(HAS_H0=True, NS=16, NCP=16, BLOCK_DN=256, USE_PDL=True), 4).replace("\\n", " "))
    conv = {**{p: "*i8" for p in ("x_ptr", "state_ptr", "out_ptr", "final_ptr")},
            **{p: "*fp32" for p in ("x_scale_ptr", "w_ptr", "bias_ptr", "out_scale_ptr")},
            **{i: "i32" for i in ("D", "L", "L_BUCKET", "stride_xb", "stride_xd", "stride_xl", "stride_wd",
                                  "stride_wk", "stride_sb", "stride_sd", "stride_sk", "stride_ob", "stride_od",
                                  "stride_ol")}}
    print("conv", ptx("conv1d", "_causal_conv1d_silu_int8_kernel", conv,
                      dict(W=4, HAS_BIAS=True, HAS_STATE=True, WRITE_FINAL=True, FAST_MATH=True,
                           PER_CHANNEL_OUT=False, BLOCK_D=64, BLOCK_L=16, USE_PDL=True, PREFETCH=4), 1
                      ).replace("\\n", " "))
''')


@pytest.mark.slow  # four sm_90 compiles in a child process (~20 s on 2 cores)
def test_the_prefill_conv_and_scan_read_nothing_before_they_wait():
    """Their every input may be the kernel ahead's output (in_proj's for the conv; dt_proj's delta,
    pass 1's chunk states), so under PDL only their launch may overlap it."""
    kernels = _run_compiled(_COMPILE_PREFILL)
    assert [line.split()[0] for line in kernels] == ["scan_pass1", "scan_pass3", "carry", "conv"]
    for line in kernels:
        wait = line.find("griddepcontrol.wait")
        assert 0 <= wait < line.find("ld.global"), line.split()[0]
        assert wait < line.find("griddepcontrol.launch_dependents"), line.split()[0]
