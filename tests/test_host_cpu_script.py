"""benchmarks/host_cpu.py: runs on the CPU, checks its variants' logits agree, times each call kind,
and leaves the Triton interpreter launching kernels again."""

from __future__ import annotations

import json

import pytest
import torch
from triton.runtime import interpreter

from .benchmark_scripts import load_benchmark

script = load_benchmark("host_cpu.py", "host_cpu_benchmark")


@pytest.mark.slow  # a benchmark's smoke run (7 s): CI's slow run keeps it
def test_tiny_run_times_both_variants_and_puts_the_launcher_back(tmp_path, capsys):
    launch = interpreter.InterpretedFunction.run
    out = tmp_path / "host.json"
    assert script.main(["--model", "mamba-tiny", "--rounds", "1", "--calls", "1", "--compare-flatten",
                        "--json", str(out)]) == 0
    assert interpreter.InterpretedFunction.run is launch
    times = json.loads(out.read_text())["times_ms"]
    assert set(times) == {"decode step, default", "prefill 1x8, default", "decode step, not flattened",
                          "prefill 1x8, not flattened"}
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())
    assert "| decode step, default |" in capsys.readouterr().out


def test_the_stub_is_undone_when_the_timing_fails():
    launch = interpreter.InterpretedFunction.run
    try:
        with script.stubbed_kernels([]):
            assert interpreter.InterpretedFunction.run is not launch
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert interpreter.InterpretedFunction.run is launch
    assert torch.equal(script._identity_head(torch.ones(2)), torch.ones(2))
