"""The fp8 GEMM (`kernels/gemm_fp8.py`): Triton kernel (under TRITON_INTERPRET=1) and the
torch._scaled_mm backend against the exact reference `fp8_linear`, and benchmarks/gemm_fp8.py --smoke."""

from __future__ import annotations

import json

import pytest
import torch

from quamba_fx.kernels import dispatch
from quamba_fx.kernels.gemm_fp8 import fp8_gemm, fp8_gemm_reference
from quamba_fx.quant.fp8 import E4M3_MAX, quantize_fp8, quantize_weight_per_channel_fp8

from .benchmark_scripts import BENCHMARKS, load_benchmark, run_without_interpreter

needs_interpreter = pytest.mark.skipif(not dispatch.INTERPRET, reason="runs the Triton kernel: set TRITON_INTERPRET=1")


def operands(m, n, k, seed=0, lead=()):
    torch.manual_seed(seed)
    x = torch.randn(*lead, m, k) * 3
    x_scale = torch.tensor(x.abs().max().item() / E4M3_MAX)
    w_q, w_scale = quantize_weight_per_channel_fp8(torch.randn(n, k))
    return quantize_fp8(x, x_scale), x_scale, w_q, w_scale, torch.randn(n)


def close(y: torch.Tensor, reference: torch.Tensor) -> bool:
    """Within fp32 summation error (the kernel adds in its own order) plus the output's rounding."""
    if y.dtype == torch.int8:
        return bool((y.int() - reference.int()).abs().max() <= 1)
    tol = 1e-5 * reference.abs().max() + 2.0 ** -10 * reference.abs()
    return bool(((y.float() - reference.float()).abs() <= tol).all())


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "scaled_mm"])
@pytest.mark.parametrize("m, n, k, lead", [(1, 40, 72, ()), (33, 130, 200, ()), (5, 24, 16, (2,))])
@pytest.mark.parametrize("out", ["fp16", "fp32", "int8", "int8_per_channel"])
def test_fp8_gemm_matches_the_reference(backend, m, n, k, lead, out):
    x_q, xs, w_q, ws, bias = operands(m, n, k, lead=lead)
    out_scale = {"int8": torch.tensor(0.2), "int8_per_channel": torch.rand(n) * 0.3 + 0.05}.get(out)
    out_dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(out)
    y = fp8_gemm(x_q, xs, w_q, ws, bias, out_scale, out_dtype, backend=backend)
    reference = fp8_gemm_reference(x_q, xs, w_q, ws, bias, out_scale, out_dtype)
    assert y.shape == reference.shape and y.dtype == reference.dtype
    assert close(y, reference)


@pytest.fixture
def tma_launches(monkeypatch):
    """Routes every TMA-addressable problem of 16 rows or more to gemm_tma's persistent kernel and
    records the configs it launches."""
    from quamba_fx.kernels import gemm_fp8, gemm_tma

    monkeypatch.setattr(gemm_fp8, "_TMA_MIN_M", 16)
    monkeypatch.setattr(gemm_tma, "_TUNED", {})
    launched = []
    real = gemm_tma.launch_config

    def spy(c, tensors, m, n, k, flags):
        launched.append((c, flags))
        return real(c, tensors, m, n, k, flags)

    monkeypatch.setattr(gemm_tma, "launch_config", spy)
    return launched


@needs_interpreter
@pytest.mark.parametrize("m, n, k, lead", [(61, 96, 80, ()), (17, 48, 32, (2,)), (40, 32, 16, ())])
@pytest.mark.parametrize("out", ["fp16", "bf16", "fp32", "int8", "int8_per_channel"])
def test_fp8_prefill_runs_the_persistent_tma_kernel(m, n, k, lead, out, tma_launches):
    """Ragged M and N tiles over 3 persistent programs, a K tail (80 = 2.5 steps of 32), K below one
    step; fp32 accumulation, by default without promoting the partial sums."""
    x_q, xs, w_q, ws, bias = operands(m, n, k, seed=m, lead=lead)
    out_scale = {"int8": torch.tensor(0.2), "int8_per_channel": torch.rand(n) * 0.3 + 0.05}.get(out)
    out_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(out)
    y = fp8_gemm(x_q, xs, w_q, ws, bias, out_scale, out_dtype, backend="triton")
    reference = fp8_gemm_reference(x_q, xs, w_q, ws, bias, out_scale, out_dtype)
    assert y.shape == reference.shape and y.dtype == reference.dtype
    assert close(y, reference)
    assert len(tma_launches) == 1, "the TMA kernel was not used"
    config, flags = tma_launches[0]
    assert flags["FP8"] and flags["PROMOTE_K"] is None


@needs_interpreter
@pytest.mark.parametrize("promote_k, passed", [(None, None), (32, 32), (16, 16), (96, 32)])
def test_fp8_prefill_promotes_within_each_dot_at_most_once_a_k_step(promote_k, passed, tma_launches, monkeypatch):
    """The interpreter's tiles take 32 K a step: a longer interval is capped at one step."""
    from quamba_fx.kernels import gemm_fp8, gemm_tma

    monkeypatch.setattr(gemm_fp8, "_PREFILL_PROMOTE_K", promote_k)
    x_q, xs, w_q, ws, bias = operands(61, 96, 80, seed=5)
    y = fp8_gemm(x_q, xs, w_q, ws, bias, out_dtype=torch.float32, backend="triton")
    assert close(y, fp8_gemm_reference(x_q, xs, w_q, ws, bias, out_dtype=torch.float32))
    config, flags = tma_launches[0]
    args, kwargs, _ = gemm_tma._call(config, (x_q, w_q, xs, ws, bias, xs, y), 61, 96, 80, flags)
    assert kwargs["PROMOTE_K"] == passed


@needs_interpreter
def test_fp8_prefill_below_the_tma_rows_or_unaligned_keeps_the_pointer_kernel(tma_launches):
    x_q, xs, w_q, ws, bias = operands(8, 32, 32)  # 8 rows: below the (lowered) threshold
    assert close(fp8_gemm(x_q, xs, w_q, ws, bias), fp8_gemm_reference(x_q, xs, w_q, ws, bias))
    x_q, xs, w_q, ws, bias = operands(20, 32, 24)  # K = 24: rows not 16-byte aligned
    assert close(fp8_gemm(x_q, xs, w_q, ws, bias), fp8_gemm_reference(x_q, xs, w_q, ws, bias))
    assert tma_launches == []


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_scaled_mm_backend_fuses_the_scales_without_bias_or_falls_back(per_channel, out_dtype, monkeypatch):
    from quamba_fx.kernels import gemm_fp8

    monkeypatch.setattr(gemm_fp8, "use_triton", lambda t: True)  # the backends' dispatch, also on CPU
    monkeypatch.setattr(gemm_fp8, "_FUSED_SCALES_WORK", {})
    x_q, xs, w_q, ws, _ = operands(24, 40, 64, seed=2)
    if not per_channel:
        ws = torch.tensor(0.004)
    y = fp8_gemm(x_q, xs, w_q, ws, out_dtype=out_dtype, backend="scaled_mm")
    assert y.dtype == out_dtype and close(y, fp8_gemm_reference(x_q, xs, w_q, ws, out_dtype=out_dtype))
    assert list(gemm_fp8._FUSED_SCALES_WORK) == [("cpu", out_dtype, per_channel)]

    def refuse(*args, **kwargs):
        raise RuntimeError("Only bf16 high precision output types are supported for row-wise scaling.")

    real = torch._scaled_mm
    monkeypatch.setattr(gemm_fp8, "_FUSED_SCALES_WORK", {})
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(k) or
                        (refuse() if k["scale_a"].numel() > 1 or k["scale_a"].item() != 1.0 else real(*a, **k)))
    for _ in range(2):
        y = fp8_gemm(x_q, xs, w_q, ws, out_dtype=out_dtype, backend="scaled_mm")
        assert close(y, fp8_gemm_reference(x_q, xs, w_q, ws, out_dtype=out_dtype))
    assert gemm_fp8._FUSED_SCALES_WORK == {("cpu", out_dtype, per_channel): False}
    assert len(calls) == 3  # one refused fused call, then unit scales twice: the refusal is remembered


@needs_interpreter
def test_fp8_gemm_per_tensor_weight_scale_and_no_bias():
    x_q, xs, w_q, _, _ = operands(4, 24, 32)
    ws = torch.tensor(0.003)
    assert close(fp8_gemm(x_q, xs, w_q, ws), fp8_gemm_reference(x_q, xs, w_q, ws))


@needs_interpreter
def test_fp8_gemm_reads_scales_at_run_time():
    x_q, xs, w_q, ws, bias = operands(3, 16, 32)
    first = fp8_gemm(x_q, xs, w_q, ws, bias, out_dtype=torch.float32)
    ws.mul_(2)
    second = fp8_gemm(x_q, xs, w_q, ws, bias, out_dtype=torch.float32)
    assert close(second - bias, 2 * (first - bias))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) or dispatch.INTERPRET,
                    reason="Hopper's fp8 tensor cores (sm_90+)")
# (rows, promotion interval, bound): the pointer kernel and gemm_tma's persistent one, promoted
# every 128 products (the persistent kernel does so only when asked: gemm_fp8._PREFILL_PROMOTE_K).
@pytest.mark.parametrize("m, promote_k, bound", [(64, 128, 5e-4), (256, 128, 5e-4)])
def test_fp8_gemm_promotes_partial_sums_at_model_depth(m, promote_k, bound, monkeypatch):
    """At a 2.8b out_proj's K (5120) the tensor cores' own fp8 accumulation, never promoted, was
    4e-3 off the exact sum (relative to its largest value); promoted every 128 products it must be
    as close as fp32 addition keeps it."""
    from quamba_fx.kernels import gemm_fp8, gemm_tma

    monkeypatch.setattr(gemm_fp8, "_PROMOTE_K", promote_k)
    monkeypatch.setattr(gemm_fp8, "_PREFILL_PROMOTE_K", promote_k)
    monkeypatch.setattr(gemm_tma, "_TUNED", {})
    x_q, xs, w_q, ws, bias = (t.cuda() for t in operands(m, 512, 5120, seed=3))
    y = fp8_gemm(x_q, xs, w_q, ws, bias, out_dtype=torch.float32, backend="triton")
    reference = fp8_gemm_reference(x_q.cpu(), xs.cpu(), w_q.cpu(), ws.cpu(), bias.cpu(), out_dtype=torch.float32)
    error = (y.cpu() - reference).abs().max() / reference.abs().max()
    assert error < bound, f"relative error {error:.2e}"


def test_fp8_gemm_rejects_bad_arguments(monkeypatch):
    x_q, xs, w_q, ws, bias = operands(2, 8, 16)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(x_q.float(), xs, w_q, ws)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        fp8_gemm(x_q, 0.5, w_q, ws)
    with pytest.raises(ValueError, match="backend is 'cutlass'"):
        fp8_gemm(x_q, xs, w_q, ws, backend="cutlass")
    monkeypatch.setenv("QUAMBA_FX_FP8_GEMM", "fast")
    with pytest.raises(ValueError, match=r"\$QUAMBA_FX_FP8_GEMM is 'fast'"):
        fp8_gemm(x_q, xs, w_q, ws)


def test_fp8_gemm_op_has_the_reference_shape_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x_q, xs, w_q, ws, bias = operands(6, 8, 16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.quamba.fp8_gemm(x_q, xs, w_q, ws, bias, torch.tensor(0.1), None)
    assert out.shape == (6, 8) and out.dtype == torch.int8


@needs_interpreter
def test_benchmark_smoke_runs_on_cpu_and_writes_checked_rows(tmp_path, capsys):
    bench = load_benchmark("gemm_fp8.py", "gemm_fp8_benchmark")
    assert bench.main(["--smoke", "--json", str(tmp_path / "fp8.json")]) == 0
    data = json.loads((tmp_path / "fp8.json").read_text())
    assert data["meta"]["smoke"] is True
    rows = {(r["shape"], r["m"]) for r in data["results"]}
    assert rows == {(s, m) for s in bench.SHAPES for m in bench.SMOKE_M}
    assert all(e is not None and e < 2e-3 for r in data["results"] for e in r["rel_error"].values())
    assert "2.8b in_proj" in capsys.readouterr().out


@pytest.mark.parametrize("promote_k", [None, 128])
def test_fp8_tma_candidates_fit_shared_memory_and_promoted_ones_keep_to_128_columns(promote_k, monkeypatch):
    """On the GPU the fp8 candidates for 2.8b's projections, with int8 or fp16 outputs: each
    program within the block limit, the programs sharing an SM within its shared memory; promoted,
    no 128 x 256 tile (two accumulators: it spills in the sm_90 build)."""
    from quamba_fx.kernels import gemm_tma

    monkeypatch.setattr(gemm_tma, "INTERPRET", False)
    for n, k in ((10240, 2560), (2560, 5120)):
        for out_bytes in (1, 2):
            got = gemm_tma.candidates(n, k, out_bytes, fp8=True, promote_k=promote_k)
            assert got, (n, k, out_bytes)
            assert any(c.block_n == 256 for c in got) == (promote_k is None)
            for c in got:
                smem = gemm_tma._smem_bytes(c, out_bytes)
                assert smem <= gemm_tma._SMEM_LIMIT
                assert c.per_sm * (smem + gemm_tma._SMEM_PER_PROGRAM_EXTRA) <= gemm_tma._SMEM_PER_SM


@pytest.mark.slow  # 25-45 s on 2 cores: 27 offline builds
def test_tma_candidates_compile_for_sm90_without_spills_on_the_tensor_cores():
    """What the interpreter cannot show: every int8 and e4m3 candidate of the persistent kernel,
    at each promotion interval, compiles for sm_90 without spilling, multiplies with wgmma, asks
    no more shared memory than a program may, and the programs meant to share an SM fit its
    register file."""
    output = run_without_interpreter([str(BENCHMARKS / "gemm_tma_sm90.py")])
    rows = [line.split() for line in output.splitlines()[1:]]
    builds = {build for build, *_ in rows}
    assert builds == {"i8", "fp8:p128", "fp8:pnone"}
    for build, tile, regs, stores, loads, gmma, shared, regs_fit_sm in rows:
        assert int(stores) == int(loads) == 0, (build, tile)
        assert int(gmma) > 0 and int(regs) <= 255, (build, tile)
        assert int(shared) <= 232448 and regs_fit_sm == "1", (build, tile)
