"""benchmarks/decode_timeline.py: the interval arithmetic behind its busy / idle / overlap figures,
and its CPU smoke run."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .benchmark_scripts import load_benchmark

timeline = load_benchmark("decode_timeline.py", "decode_timeline_benchmark")
Interval = timeline.Interval


def test_busy_time_and_gaps_of_a_hand_made_timeline():
    # a [0, 4) and b [2, 5) overlap; c starts after a 3 us gap; d sits inside c
    spans = [Interval(0, 4, "a"), Interval(2, 5, "b"), Interval(8, 12, "c"), Interval(9, 10, "d")]
    assert timeline.busy_time(spans) == 9
    assert timeline.gaps(spans) == [(3, "b", "c")]
    s = timeline.summarize(spans, steps=1, top=5, kind_of=lambda name: "x" if name in "ab" else "y")
    assert (s["wall_us"], s["summed_us"], s["busy_us"], s["idle_us"], s["overlap_us"]) == (12, 12, 9, 3, 3)
    assert s["kinds"]["y"] == {"launches": 2, "summed_us": 5, "share_us": 4, "idle_before_us": 3}
    assert s["kinds"]["x"]["idle_before_us"] == 0 and s["kinds"]["x"]["share_us"] == 5  # a 4, b the 1 after it
    assert timeline.step_share(spans) == [(4, "a"), (1, "b"), (2, "d"), (2, "c")]
    assert s["gaps"] == [{"before": "b", "after": "c", "us_per_step": 3, "count_per_step": 1}]


def test_a_chain_of_early_launched_kernels_shares_the_step_by_what_each_adds():
    # PDL: each kernel starts while the one ahead runs and waits for it; durations overlap, shares don't
    chain = [Interval(0, 10, "norm"), Interval(1, 30, "gemv"), Interval(25, 33, "scan")]
    assert timeline.step_share(chain) == [(10, "norm"), (20, "gemv"), (3, "scan")]


def test_block_shares_average_each_position_over_blocks_of_the_common_length():
    shares = [(9, "head"), (1, "norm"), (4, "gemv"), (2, "scan"), (3, "norm"), (6, "gemv"), (4, "scan"),
              (1, "norm"), (5, "gemv")]  # a head before the first block; the last block is cut short
    got = timeline.block_shares(shares, lambda name: name == "norm")
    assert got == {"blocks": 2, "positions": [{"kernel": "norm", "share_us": 2}, {"kernel": "gemv", "share_us": 5},
                                              {"kernel": "scan", "share_us": 3}]}
    assert timeline.block_shares(shares, lambda name: False) == {"blocks": 0, "positions": []}


def test_a_step_with_no_kernels_is_an_error():
    with pytest.raises(ValueError, match="no kernel intervals"):
        timeline.summarize([], steps=1, top=3, kind_of=str)


spans = st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50), st.sampled_from("abc")), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(spans)
def test_busy_idle_and_overlap_add_up(raw):
    intervals = [Interval(float(s), float(s + d), n) for s, d, n in raw]
    summary = timeline.summarize(intervals, steps=2, top=100, kind_of=lambda n: n)
    wall = max(i.end for i in intervals) - min(i.start for i in intervals)
    assert summary["busy_us"] * 2 == pytest.approx(timeline.busy_time(intervals))
    assert summary["busy_us"] + summary["idle_us"] == pytest.approx(wall / 2)
    assert summary["overlap_us"] >= -1e-9 and summary["idle_us"] >= -1e-9
    # the idle time is the gaps', and it is all attributed to the kinds that ended a gap
    assert sum(g["us_per_step"] for g in summary["gaps"]) == pytest.approx(summary["idle_us"])
    assert sum(k["idle_before_us"] for k in summary["kinds"].values()) == pytest.approx(summary["idle_us"])
    # the shares split the busy time among the kernels, none negative
    assert sum(k["share_us"] for k in summary["kinds"].values()) == pytest.approx(summary["busy_us"])
    assert min(share for share, _ in timeline.step_share(intervals)) >= 0
    assert sum(k["launches"] for k in summary["kinds"].values()) == pytest.approx(len(intervals) / 2)


@pytest.mark.slow
def test_cpu_smoke_run_prints_and_writes_json(tmp_path, capsys, monkeypatch):
    from quamba_fx.kernels import dispatch

    monkeypatch.setattr(dispatch, "INTERPRET", False)  # the script's logic, not the kernels, is under test
    out = tmp_path / "timeline.json"
    assert timeline.main(["--smoke", "--steps", "2", "--batches", "1", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "w8a8: per step" in printed and "| gap before | gap after |" in printed and "| position |" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["model"] == "mamba-tiny" and sorted(data["results"]) == ["1", "2"]
    for at_batch in data["results"].values():
        summary = at_batch["w8a8"]
        assert summary["kernels"] > 0 and summary["busy_us"] <= summary["wall_us"] + 1e-6


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        timeline.main(["--smoke", "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
