"""Calibration observers: abs-max, histogram percentile and per-channel abs-max against exact statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quamba_fx.quant import MIN_SCALE, AbsMaxObserver, Observer, PercentileObserver, observer_from_state_dict
from quamba_fx.quant.observers import OBSERVERS, ChannelAbsMaxObserver, make_observer, register_observer

PERCENTILES = [0.0, 10.0, 50.0, 90.0, 99.0, 99.9, 99.999, 100.0]


def _exact(values: list[torch.Tensor], percentile: float) -> float:
    allv = torch.cat([v.reshape(-1).float().abs().double() for v in values])
    return torch.quantile(allv, percentile / 100.0).item()


def _assert_within_bound(obs: PercentileObserver, values: list[torch.Tensor]) -> None:
    width = obs.upper / obs.bins
    max_abs = max(v.float().abs().max().item() for v in values if v.numel())
    # The documented bound: one bin width, and a bin width is below 2 * max / bins.
    assert width <= 2 * max_abs / obs.bins + 1e-30
    slack = 1e-9 * max_abs  # floating rounding of the bin index and the interpolation
    for p in PERCENTILES:
        obs.percentile = p
        exact = _exact(values, p)
        got = obs.value()
        assert abs(got - exact) <= width + slack, (p, got, exact, width)


# --------------------------------------------------------------------------------------------------
# AbsMaxObserver
# --------------------------------------------------------------------------------------------------


def test_absmax_over_batches():
    obs = AbsMaxObserver()
    obs.observe(torch.tensor([1.0, -3.0]))
    obs.observe(torch.tensor([[2.5, -0.5, 0.0]], dtype=torch.float16))
    obs.observe(torch.tensor([7, -9], dtype=torch.int32))
    obs.observe(torch.empty(0, 4))
    assert obs.value() == 9.0
    assert obs.count == 7 and obs.batches == 4
    assert obs.scale() == pytest.approx(9.0 / 127)
    assert obs.scale(qmax=7) == pytest.approx(9.0 / 7)


def test_scale_is_never_zero():
    for obs in (AbsMaxObserver(), PercentileObserver()):
        obs.observe(torch.zeros(16))
        assert obs.value() == 0.0
        assert obs.scale() == MIN_SCALE > 0


def test_value_before_observing_raises():
    for obs in (AbsMaxObserver(name="blk0.conv"), PercentileObserver(name="blk0.conv")):
        with pytest.raises(RuntimeError, match="before any value"):
            obs.value()
        obs.observe(torch.empty(0))
        with pytest.raises(RuntimeError, match="blk0.conv"):
            obs.scale()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cls", [AbsMaxObserver, PercentileObserver])
def test_non_finite_input_is_rejected_and_state_kept(cls, bad):
    obs = cls(name="layers.3.mixer.conv1d")
    obs.observe(torch.tensor([1.0, 2.0]))
    before = obs.state_dict()
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*layers\.3\.mixer\.conv1d.*(NaN|Inf)"):
        obs.observe(torch.tensor([0.5, bad, 1.0], dtype=torch.bfloat16))
    assert obs.state_dict() == before


def test_nan_and_inf_are_counted_in_the_message():
    obs = AbsMaxObserver()
    with pytest.raises(ValueError, match="2 NaN and 1 Inf"):
        obs.observe(torch.tensor([float("nan"), float("inf"), float("nan"), 0.0]))


def test_float64_beyond_fp32_range_counts_as_inf():
    with pytest.raises(ValueError, match="Inf"):
        AbsMaxObserver().observe(torch.tensor([1e300], dtype=torch.float64))


def test_observe_requires_a_tensor():
    with pytest.raises(TypeError):
        AbsMaxObserver().observe([1.0, 2.0])


# --------------------------------------------------------------------------------------------------
# PercentileObserver against torch.quantile
# --------------------------------------------------------------------------------------------------


def _batches(kind: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = [1.0, 0.01, 30.0, 2.0, 500.0, 0.5]  # growth by several doublings, and shrinking batches
    sizes = [5000, 1200, 3000, 7, 2500, 4000]
    out = []
    for scale, size in zip(scales, sizes):
        if kind == "normal":
            x = torch.randn(size, generator=g)
        elif kind == "student_t":
            x = torch.distributions.StudentT(2.0).sample((size,))  # heavy tails
        elif kind == "outliers":
            x = torch.randn(size, generator=g)
            idx = torch.randint(0, size, (max(1, size // 500),), generator=g)
            x[idx] = 1000.0 * torch.sign(torch.randn(idx.numel(), generator=g))
        elif kind == "laplace_fp16":
            x = torch.distributions.Laplace(0.0, 1.0).sample((size,)).half()
        else:
            raise AssertionError(kind)
        out.append(x * scale)
    return out


@pytest.mark.parametrize("kind", ["normal", "student_t", "outliers", "laplace_fp16"])
def test_percentile_matches_quantile_on_concatenated_data(kind):
    torch.manual_seed(0)
    values = _batches(kind, seed=1)
    obs = PercentileObserver()
    for v in values:
        obs.observe(v)
    assert obs.count == sum(v.numel() for v in values)
    assert obs.counts.numel() == obs.bins  # bounded memory
    _assert_within_bound(obs, values)


@pytest.mark.parametrize("bins", [2, 3, 17, 256])
def test_bound_holds_for_coarse_histograms(bins):
    torch.manual_seed(1)
    values = _batches("student_t", seed=2)
    obs = PercentileObserver(bins=bins)
    for v in values:
        obs.observe(v)
    _assert_within_bound(obs, values)


def test_all_zero_and_single_value():
    zeros = PercentileObserver(percentile=99.999)
    for _ in range(3):
        zeros.observe(torch.zeros(100, 3))
    assert zeros.value() == 0.0

    const = PercentileObserver(percentile=99.0)
    values = [torch.full((1000,), -2.5), torch.full((10,), 2.5)]
    for v in values:
        const.observe(v)
    assert const.value() == pytest.approx(2.5, abs=2.5 / const.bins)
    _assert_within_bound(const, values)

    single = PercentileObserver()
    single.observe(torch.tensor([-4.0]))
    assert single.value() == 4.0


def test_zeros_first_then_values():
    values = [torch.zeros(5000), torch.randn(3000), torch.zeros(10)]
    obs = PercentileObserver(percentile=50.0)
    for v in values:
        obs.observe(v)
    _assert_within_bound(obs, values)


def test_percentile_100_is_the_exact_max():
    obs = PercentileObserver(percentile=100.0)
    obs.observe(torch.randn(1000))
    obs.observe(torch.tensor([123.456]))
    assert obs.value() == pytest.approx(123.456, rel=1e-7)


def test_percentile_clips_outliers_unlike_absmax():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3))
    x[::50_000] = 1e4
    p, m = PercentileObserver(percentile=99.9), AbsMaxObserver()
    p.observe(x)
    m.observe(x)
    assert m.value() == 1e4 and p.value() < 5.0


@pytest.mark.parametrize("percentile,bins", [(-1.0, 4096), (100.5, 4096), (99.0, 1), (99.0, 2.5)])
def test_invalid_configuration(percentile, bins):
    with pytest.raises(ValueError):
        PercentileObserver(percentile=percentile, bins=bins)


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=0, max_size=40),
        min_size=1, max_size=5,
    ),
    percentile=st.floats(0.0, 100.0),
    bins=st.sampled_from([2, 5, 64, 2048]),
)
def test_percentile_bound_property(batches, percentile, bins):
    values = [torch.tensor(b, dtype=torch.float32) for b in batches]
    obs = PercentileObserver(percentile=percentile, bins=bins)
    for v in values:
        obs.observe(v)
    if obs.count == 0:
        with pytest.raises(RuntimeError):
            obs.value()
        return
    width = obs.upper / obs.bins
    max_abs = max(v.abs().max().item() for v in values if v.numel())
    assert obs.max == max_abs
    exact = _exact(values, percentile)
    assert abs(obs.value() - exact) <= width + 1e-9 * max_abs


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scales=st.lists(st.floats(-6, 6), min_size=1, max_size=6),
    percentile=st.sampled_from([50.0, 99.0, 99.99, 99.999]),
)
def test_percentile_bound_property_multiscale(seed, log_scales, percentile):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g) * 10.0**s for s in log_scales]
    obs = PercentileObserver(percentile=percentile)
    for v in values:
        obs.observe(v)
    width = obs.upper / obs.bins
    max_abs = max(v.abs().max().item() for v in values)
    assert abs(obs.value() - _exact(values, percentile)) <= width + 1e-9 * max_abs


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: AbsMaxObserver(name="a"), lambda: PercentileObserver(99.9, bins=512, name="b")]
)
def test_state_dict_json_round_trip_and_resume(make):
    g = torch.Generator().manual_seed(4)
    first = [torch.randn(300, generator=g) * 3, torch.randn(10, generator=g)]
    later = [torch.randn(100, generator=g) * 40]  # grows the histogram range after the restore
    reference = make()
    for v in first + later:
        reference.observe(v)

    obs = make()
    for v in first:
        obs.observe(v)
    restored = Observer.from_state_dict(json.loads(json.dumps(obs.state_dict())))
    assert type(restored) is type(obs) and restored.name == obs.name
    assert restored.value() == obs.value() and restored.count == obs.count and restored.batches == obs.batches
    for v in later:
        restored.observe(v)
    assert restored.state_dict() == reference.state_dict()
    assert restored.value() == reference.value()


def test_state_dict_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    obs = PercentileObserver(percentile=99.99, bins=1024)
    obs.observe(torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 7)
    state = obs.state_dict()
    # Python floats as fp64 tensors: an fp32 percentile (99.99 -> 99.98999786) moves the rank, and
    # with it the value, by up to 3e-5 relative
    tensors = {k: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None)
               for k, v in state.items() if k not in ("type", "name")}
    path = tmp_path / "obs.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    loaded = safetensors_torch.load_file(str(path))
    restored = observer_from_state_dict({"type": state["type"], "name": None, **loaded})
    assert isinstance(restored, PercentileObserver)
    assert restored.state_dict() == state
    assert restored.value() == obs.value()


def test_state_dict_errors():
    with pytest.raises(ValueError, match="unknown observer type"):
        observer_from_state_dict({"type": "MinMaxObserver"})
    state = AbsMaxObserver().state_dict()
    with pytest.raises(ValueError, match="AbsMaxObserver"):
        PercentileObserver.from_state_dict(state)
    p = PercentileObserver(bins=8)
    p.observe(torch.ones(3))
    bad = p.state_dict()
    bad["counts"] = bad["counts"][:4]
    with pytest.raises(ValueError, match="bins"):
        observer_from_state_dict(bad)
    bad = p.state_dict()
    bad["count"] = 99
    with pytest.raises(ValueError, match="count"):
        observer_from_state_dict(bad)


def test_state_dict_is_plain_python():
    p = PercentileObserver(bins=16)
    p.observe(torch.randn(40))
    state = p.state_dict()
    assert all(isinstance(v, (str, int, float, list, type(None))) for v in state.values())
    assert all(isinstance(c, int) for c in state["counts"])
    assert math.isclose(sum(state["counts"]), 40)


# --------------------------------------------------------------------------------------------------
# Registry: recipes name their observers
# --------------------------------------------------------------------------------------------------


def test_registry_builds_observers_by_name_with_defaults_filled_in():
    assert OBSERVERS["abs_max"] is AbsMaxObserver and OBSERVERS["percentile"] is PercentileObserver
    obs = make_observer("percentile", {"percentile": 99}, label="x")
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.0 and obs.bins == 4096 and obs.name == "x"
    assert isinstance(make_observer("abs_max"), AbsMaxObserver)
    checked = PercentileObserver.check_arguments({"percentile": 99, "bins": 8.0})
    assert checked == {"percentile": 99.0, "bins": 8} and type(checked["percentile"]) is float
    assert type(checked["bins"]) is int
    assert AbsMaxObserver.check_arguments({}) == {}


@pytest.mark.parametrize("name, arguments, message", [
    ("minmax", {}, "unknown observer 'minmax'; use one of abs_max, channel_abs_max, percentile"),
    (None, {}, "unknown observer None"),
    ("abs_max", {"percentile": 9.0}, "AbsMaxObserver has no argument 'percentile' \\(its arguments: none\\)"),
    ("percentile", {"bin": 8}, "PercentileObserver has no argument 'bin' \\(its arguments: percentile, bins\\)"),
    ("percentile", {"percentile": True}, "percentile must be in \\[0, 100\\], got True"),
    ("percentile", {"percentile": "99"}, "percentile must be in \\[0, 100\\], got '99'"),
    ("percentile", {"bins": float("inf")}, "bins must be an int >= 2, got inf"),
])
def test_registry_rejects_unknown_names_and_bad_arguments(name, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_observer(name, arguments)


def test_register_observer_refuses_a_taken_name_or_kind():
    class Twin(AbsMaxObserver):
        pass

    with pytest.raises(ValueError, match="observer name 'abs_max' is already taken by AbsMaxObserver"):
        register_observer("abs_max")(Twin)
    with pytest.raises(ValueError, match="observer kind 'AbsMaxObserver' is already registered"):
        register_observer("twin")(Twin)
    assert register_observer("abs_max")(AbsMaxObserver) is AbsMaxObserver  # the same class again: allowed
    assert "twin" not in OBSERVERS


# --- the per-channel observer (Quamba2's Mamba-2 conv output scales) ----------------------------


def _channel_observer() -> ChannelAbsMaxObserver:
    # 10 channels along axis 1: 0-3 alone, then two runs of 2 groups of 3 (like B's and C's groups).
    return ChannelAbsMaxObserver(name="conv", axis=1, groups=[(4, 7, 3), (7, 10, 3)])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batches=st.integers(1, 4))
def test_channel_abs_max_is_the_max_of_each_channel_then_of_each_group(seed, batches):
    g = torch.Generator().manual_seed(seed)
    obs = _channel_observer()
    values = [torch.randn(2, 10, 5, generator=g) * (4 ** torch.rand(1, 10, 1, generator=g)) for _ in range(batches)]
    for v in values:
        obs.observe(v)
    per_channel = torch.stack([v.abs().amax(dim=(0, 2)) for v in values]).amax(dim=0)
    want = per_channel.clone()
    for start in (4, 7):
        want[start:start + 3] = per_channel[start:start + 3].max()
    assert obs.value() == want.tolist()
    assert obs.scale() == (want / 127).clamp_min(MIN_SCALE).tolist()
    assert obs.count == sum(v.numel() for v in values) and obs.batches == batches


def test_channel_observer_state_round_trips_through_json_and_resumes():
    obs = _channel_observer()
    obs.observe(torch.arange(30.0).reshape(1, 10, 3))
    again = observer_from_state_dict(json.loads(json.dumps(obs.state_dict())))
    assert isinstance(again, ChannelAbsMaxObserver) and again.value() == obs.value()
    assert (again.axis, again.groups) == (1, ((4, 7, 3), (7, 10, 3)))
    for o in (obs, again):
        o.observe(torch.full((1, 10, 1), 100.0))
    assert again.value() == obs.value() == [100.0] * 10


def test_channel_observer_refuses_bad_layouts_and_changing_widths():
    with pytest.raises(ValueError, match="disjoint runs"):
        ChannelAbsMaxObserver(groups=[(0, 4, 3)])  # 4 channels are no whole number of groups of 3
    with pytest.raises(ValueError, match="disjoint runs"):
        ChannelAbsMaxObserver(groups=[(0, 4, 2), (2, 6, 2)])
    obs = _channel_observer()
    with pytest.raises(ValueError, match="channel groups reach channel 10, but the tensor has 8"):
        obs.observe(torch.ones(1, 8, 2))
    obs.observe(torch.ones(1, 10, 2))
    with pytest.raises(ValueError, match="observed 12 channels after 10"):
        obs.observe(torch.ones(1, 12, 2))
    with pytest.raises(ValueError, match="10 NaN"):
        obs.observe(torch.tensor([[[float("nan")]] * 10]).reshape(1, 10, 1))
    with pytest.raises(RuntimeError, match="before any value"):
        ChannelAbsMaxObserver().value()
