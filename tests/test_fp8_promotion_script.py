"""benchmarks/fp8_promotion.py: each variant's settings are in force while its rows run and are put
back afterwards, and the CPU smoke run writes every row (so the script cannot rot while CI has no
GPU)."""

from __future__ import annotations

import json
import os

import pytest

from .benchmark_scripts import load_benchmark

script = load_benchmark("fp8_promotion.py", "fp8_promotion_benchmark")


@pytest.mark.slow  # a benchmark's smoke run (23 s on CI): CI's slow run keeps it
def test_cpu_smoke_run_times_each_variant_under_its_settings(tmp_path, capsys, monkeypatch):
    from quamba_fx.kernels import dispatch, gemm_fp8

    # The script's logic is under test, not the kernels (their own tests run them interpreted).
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    reference = script.R
    monkeypatch.setattr(reference, "DEVICE", reference.DEVICE)  # the smoke run switches them
    monkeypatch.setattr(reference, "BUDGET_S", reference.BUDGET_S)
    monkeypatch.delenv("QUAMBA_FX_FP8_GEMM", raising=False)
    seen = []
    timed = reference.time_ms

    def recording(fn, budget_s=1.0, max_reps=20):
        seen.append((gemm_fp8._PREFILL_PROMOTE_K, os.environ.get("QUAMBA_FX_FP8_GEMM")))
        return timed(fn, budget_s, max_reps)

    monkeypatch.setattr(reference, "time_ms", recording)
    before = gemm_fp8._PREFILL_PROMOTE_K
    out = tmp_path / "promotion.json"
    assert script.main(["--smoke", "--json", str(out)]) == 0
    # int8 first (its setting is whatever the last variant left), then each fp8 variant's own.
    assert seen[1:] == [(None, "triton"), (128, "triton"), (None, "scaled_mm")]
    assert gemm_fp8._PREFILL_PROMOTE_K == before and "QUAMBA_FX_FP8_GEMM" not in os.environ
    data = json.loads(out.read_text())
    assert set(data["bytes_model"]) == {"fp32", "fp8 cpu reference", *script.VARIANTS}
    assert all(1.0 < bpb < 8.0 for bpb in data["bytes_model"].values())
    rows = data["model_rows"]
    assert set(rows["ms"]) == set(rows["logits_error"]) == {"int8 (quamba)", *script.VARIANTS}
    assert all(len(times) == 1 and times[0] > 0 for times in rows["ms"].values())
    assert "mamba-bytes-wt2, bits per byte" in capsys.readouterr().out
