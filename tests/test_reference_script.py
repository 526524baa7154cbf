"""benchmarks/reference.py: kernel names land in the right kind, and the CPU smoke run produces the
tables and a JSON with our side's rows (so the script cannot rot while CI has no GPU)."""

from __future__ import annotations

import json

import pytest

from .benchmark_scripts import load_benchmark

ref = load_benchmark("reference.py", "reference_benchmark")


@pytest.mark.parametrize("name, kind", [
    # mamba_ssm's kernels, as the profiler names them on an H200
    ("void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<32, 16, 1, true, true, true, "
     "false, c10::Half, float, c10::Half> >(SSMParamsBase)", "scan"),
    ("_selective_scan_update_kernel", "scan"),
    ("void causal_conv1d_fwd_kernel<Causal_conv1d_fwd_kernel_traits<128, 4, true, c10::Half, c10::Half> >"
     "(ConvParamsBase)", "conv"),
    ("void causal_conv1d_update_kernel<Causal_conv1d_update_kernel_traits<64, 4, c10::Half, c10::Half> >"
     "(ConvParamsBase)", "conv"),
    ("_layer_norm_fwd_1pass_kernel", "norm"),
    # ours
    ("_selective_scan_kernel", "scan"),
    ("_selective_state_update_kernel", "scan"),
    ("_causal_conv1d_silu_int8_kernel", "conv"),
    ("_add_rmsnorm_kernel", "norm"),
    ("_hadamard_kernel", "Hadamard"),
    ("_int8_gemm_jit", "GEMM"),
    ("_int8_gemm_skinny_jit", "GEMM"),
    ("_w4a8_skinny_kernel", "GEMM"), ("_w4a16_gemv_kernel", "GEMM"), ("_w4_gemm_kernel", "GEMM"),
    # Mamba-2's SSD: mamba_ssm's Triton kernels and ours
    ("_chunk_cumsum_fwd_kernel", "scan"), ("_bmm_chunk_fwd_kernel", "scan"), ("_chunk_state_fwd_kernel", "scan"),
    ("_state_passing_fwd_kernel", "scan"), ("_chunk_scan_fwd_kernel", "scan"),
    ("_chunk_dt_kernel", "scan"), ("_chunk_cb_kernel", "scan"), ("_chunk_state_kernel", "scan"),
    ("_state_passing_kernel", "scan"), ("_chunk_scan_kernel", "scan"), ("_state_update_kernel", "scan"),
    # cuBLAS and the rest
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
    ("void gemv2T_kernel_val<int, int, __half, __half, float, float, 128, 16, 4, 4, false, false>", "GEMM"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __half>", "GEMM"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half> >", "other"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::Half, long, unsigned int, 2, 2, -2, true>",
     "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    # CPU op names (the smoke run's profile)
    ("quamba::w8a8_linear", "GEMM"),
    ("quamba::hadamard_quantize", "Hadamard"),
    ("quamba::selective_scan_int8", "scan"),
    ("aten::addmm", "GEMM"),
    ("aten::mul", "other"),
])
def test_classify_puts_each_kernel_in_its_kind(name, kind):
    assert ref.classify(name) == kind


def test_limit_fraction_is_rate_over_batch_times_bandwidth_over_bytes():
    row = {"batch": 4, "tokens_per_s": {"w8a8": 100.0, "mamba_ssm": None}, "state_bytes": {"w8a8": 50}}
    # limit with the weights alone: 4 sequences x 1000 B/s / 200 B per step = 20 tok/s
    frac = ref.limit_fractions(row, {"w8a8": 200, "mamba_ssm": 400}, bandwidth=1000.0)
    assert frac == {"w8a8": {"weights": pytest.approx(100 / (4 * 1000 / 200)),
                             "weights+state": pytest.approx(100 / (4 * 1000 / 300))}}


def test_shape_argument_rejects_what_is_not_BxL():
    assert ref._shape("8x2048") == (8, 2048)
    with pytest.raises(Exception, match="BxL"):
        ref._shape("2048")


@pytest.mark.slow
@pytest.mark.parametrize("model, flags", [("mamba-tiny", []), ("mamba2-tiny", ["--no-hf-check"])])
def test_cpu_smoke_run_writes_tables_and_json(tmp_path, capsys, monkeypatch, model, flags):
    from quamba_fx.kernels import dispatch

    # The script's logic is under test, not the kernels (their own tests run them interpreted):
    # the kernels' PyTorch references keep this run at seconds even under TRITON_INTERPRET=1.
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    out = tmp_path / "ref.json"
    assert ref.main(["--smoke", "--models", model, "--json", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    for title in ("Prefill, ms per forward", "Decode, tokens/s", f"Kernel time by kind, {model}"):
        assert title in printed
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu (smoke run)" and data["copy_bandwidth_bytes_per_s"] > 0
    (result,) = data["results"]
    assert result["model"] == model
    assert [row["shape"] for row in result["prefill"]] == [[1, 8], [2, 16]]
    assert all(row["ms"]["w8a8"] > 0 and "mamba_ssm" not in row["ms"] for row in result["prefill"])
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    for row in result["decode"]:
        assert row["tokens_per_s"]["w8a8"] > 0
        # more bytes per step, a lower limit: the share of it can only grow
        assert 0 < row["limit_fraction"]["w8a8"]["weights"] <= row["limit_fraction"]["w8a8"]["weights+state"]
    assert set(result["breakdown"]) == {"1x16", "decode 1", "decode 2"}
    for entry in result["breakdown"].values():
        kinds = entry["w8a8"]
        assert set(kinds) == {*ref.KINDS, "total", "kernels"}
        assert kinds["total"] == pytest.approx(sum(kinds[k] for k in ref.KINDS)) and kinds["total"] > 0
        # the heaviest kernels by name, at most TOP_KERNELS, none heavier than the total
        assert 0 < len(kinds["kernels"]) <= ref.TOP_KERNELS
        assert max(kinds["kernels"].values()) <= kinds["total"] + 1e-9
    if flags:  # --no-hf-check: no logits compared
        assert result["check"] == {"shape": [1, 128]}
    else:
        assert result["check"]["w8a8 vs hf fp32"] < 0.5  # the same weights: W8A8 error, not garbage
