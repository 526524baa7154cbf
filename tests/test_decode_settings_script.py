"""benchmarks/decode_settings.py: each variant's setting is in force while its rows are timed and is
put back afterwards, bad settings fail before any model is built, and the CPU smoke run writes the
table and the JSON (so the script cannot rot while CI has no GPU)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from .benchmark_scripts import load_benchmark

script = load_benchmark("decode_settings.py", "decode_settings_benchmark")
SETTING = "quamba_fx.kernels.pdl.L2_WINDOW_BYTES"


@pytest.mark.parametrize("text, message", [
    ("quamba_fx.kernels.pdl.L2_WINDOW_BYTE=1,2", "has no attribute L2_WINDOW_BYTE"),
    ("quamba_fx.kernels.nowhere.X=1", "cannot import quamba_fx.kernels.nowhere"),
    (f"{SETTING}=4 MiB", "is not a Python literal"),
    (f"{SETTING}", "expected MODULE.NAME=V1,V2"),
])
def test_a_bad_setting_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        script.parse_setting(text)


def test_the_grid_is_every_combination_in_order():
    from quamba_fx.kernels import pdl

    grid = script.setting_grid([script.parse_setting(f"{SETTING}=0,16"),
                                script.parse_setting("quamba_fx.kernels.pdl.L2_PREFETCH=True,False")])
    assert [list(v.values()) for v in grid] == [[0, True], [0, False], [16, True], [16, False]]
    assert all(list(v) == [(pdl, "L2_WINDOW_BYTES"), (pdl, "L2_PREFETCH")] for v in grid)


@pytest.mark.slow
def test_cpu_smoke_run_times_each_variant_under_its_setting(tmp_path, capsys, monkeypatch):
    from quamba_fx.kernels import dispatch, pdl

    # The script's logic is under test, not the kernels (their own tests run them interpreted).
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    reference = script.R
    monkeypatch.setattr(reference, "DEVICE", reference.DEVICE)  # the smoke run switches it to cpu
    seen = []
    timed = reference._our_decode_rate
    # A tuned-config cache of its own (in a copy of the registry, put back afterwards): marked by
    # each timed row, emptied when the variant changes.
    monkeypatch.setattr(dispatch, "_TUNED_CACHES", dict(dispatch._TUNED_CACHES))
    marks = dispatch.tuned_configs("test_decode_settings_marks")

    def recording(lowered, prompt, steps, tokens=None):
        seen.append((pdl.L2_WINDOW_BYTES, prompt.shape[0], len(marks)))
        marks[prompt.shape[0]] = True
        return timed(lowered, prompt, steps, tokens)

    monkeypatch.setattr(reference, "_our_decode_rate", recording)
    before = pdl.L2_WINDOW_BYTES
    out = tmp_path / "ab.json"
    assert script.main(["--smoke", "--set", f"{SETTING}=0,16", "--batches", "1", "2", "--json", str(out)]) == 0
    # Two rounds, each variant's value in force, and each variant choosing its configs afresh.
    assert seen == [(0, 1, 0), (0, 2, 1), (16, 1, 0), (16, 2, 1)] * 2
    assert pdl.L2_WINDOW_BYTES == before
    assert "Decode tokens/s, mamba-tiny quamba" in capsys.readouterr().out
    result = json.loads(out.read_text())["result"]
    assert result["variants"] == ["L2_WINDOW_BYTES=0", "L2_WINDOW_BYTES=16"]
    assert len(result["rows"]) == 8 and all(row["tokens_per_s"] > 0 for row in result["rows"])
    # The L2 window changes no value: every greedy step gives the first variant's tokens.
    assert all(row["equal_steps"] == 3 for row in result["rows"])


def test_leading_equal_steps_counts_until_any_sequence_departs():
    import torch

    first = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    assert script.leading_equal_steps(first.clone(), first) == 4
    departed = first.clone()
    departed[2, 1] = 0
    assert script.leading_equal_steps(departed, first) == 2
    departed[0, 0] = 9
    assert script.leading_equal_steps(departed, first) == 0


@pytest.mark.slow
def test_cpu_smoke_run_times_greedy_steps_under_each_steps_per_graph(tmp_path, capsys, monkeypatch):
    from quamba_fx import runtime
    from quamba_fx.kernels import dispatch

    monkeypatch.setattr(dispatch, "INTERPRET", False)  # the script's logic, not the kernels
    reference = script.R
    monkeypatch.setattr(reference, "DEVICE", reference.DEVICE)
    seen = []
    timed = reference.our_greedy_rate

    def recording(lowered, prompt, steps):
        seen.append(runtime.STEPS_PER_GRAPH)
        return timed(lowered, prompt, steps)

    monkeypatch.setattr(reference, "our_greedy_rate", recording)
    out = tmp_path / "greedy.json"
    assert script.main(["--smoke", "--greedy", "--set", "quamba_fx.runtime.STEPS_PER_GRAPH=1,2", "--batches", "1",
                        "--rounds", "1", "--json", str(out)]) == 0
    assert seen == [1, 2] and runtime.STEPS_PER_GRAPH == 1
    assert "mamba-tiny quamba, Generator.greedy" in capsys.readouterr().out
    result = json.loads(out.read_text())["result"]
    assert result["greedy"] and all(row["tokens_per_s"] > 0 for row in result["rows"])


def test_mamba_ssm_is_timed_each_round_and_the_ratios_divide_by_its_mean(monkeypatch, capsys):
    # The script's bookkeeping, with both decoders replaced by canned rates (mamba_ssm needs a GPU).
    reference = script.R
    events = []
    monkeypatch.setattr(reference, "DEVICE", "cpu")
    monkeypatch.setattr(reference, "build", lambda model, with_ref, recipes, rtn: (
        {reference.recipe_label("quamba"): "ours"}, "mamba_ssm model", {}, 8))
    monkeypatch.setattr(reference, "RefDecoder", lambda ref, batch, length: SimpleNamespace(prefill=None, decode=None))
    ref_rates = iter([100.0, 300.0])
    monkeypatch.setattr(reference, "decode_rate",
                        lambda prefill, decode, prompt, steps: events.append("mamba_ssm") or next(ref_rates))

    def ours(lowered, prompt, steps, tokens):
        events.append("ours")
        tokens.append(torch.zeros(prompt.shape[0], dtype=torch.long))
        return 400.0, None

    monkeypatch.setattr(reference, "_our_decode_rate", ours)
    args = argparse.Namespace(model="mamba-tiny", ref=True, recipe="quamba", rtn_weights=False, batches=[1],
                              steps=1, rounds=2, greedy=False)
    result = script.run(args, [script.parse_setting(f"{SETTING}=0,16")])
    assert events == ["mamba_ssm", "ours", "ours"] * 2
    assert result["mamba_ssm_rounds"] == {"1": [100.0, 300.0]} and result["mamba_ssm"] == {"1": 200.0}
    script.print_table(result, [1])
    out = capsys.readouterr().out
    assert "| L2_WINDOW_BYTES=0 | 1 | 400 / 400 | 400 | 1.000x | 2.00x | 1 |" in out
    assert "| mamba_ssm | 1 | 100 / 300 | 200 |  | 1.00x |  |" in out
