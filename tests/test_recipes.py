"""Recipes as data: exact dict round trips, the built-in recipes, the registry, and one-line errors
naming the field of a malformed recipe dict. Saving and reloading a quantized graph with a recipe
of one's own: test_checkpoint.py."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quamba_fx
from quamba_fx.catalog import RECIPE_NAMES
from quamba_fx.errors import InvalidArgumentError, QuambaError, RecipeError
from quamba_fx.graph_meta import graph_meta
from quamba_fx.quant import AbsMaxObserver, PercentileObserver
from quamba_fx.recipes import (
    CONV_OUT,
    OUT_PROJ_IN,
    TAP_SITES,
    W8A8_TAPS,
    QuantSpec,
    Recipe,
    Tap,
    as_recipe,
    make_recipe,
    recipe_names,
    register_recipe,
    registry,
)
from quamba_fx.recipes.spec import CHANNEL_ABS_MAX_INT8

from .conftest import make_model, tiny_config


def through_json(data):
    return json.loads(json.dumps(data))


# --- exact round trips ---------------------------------------------------------------------------

PERCENTILE_ARGS = st.fixed_dictionaries({}, optional={
    "percentile": st.one_of(st.floats(0.0, 100.0), st.integers(0, 100)),
    "bins": st.integers(2, 1 << 16),
})
SPECS = st.one_of(
    st.builds(QuantSpec, observer=st.just("abs_max")),
    st.builds(QuantSpec, observer=st.just("percentile"), observer_args=PERCENTILE_ARGS),
)
TAPS = st.one_of(
    st.sampled_from(W8A8_TAPS),
    st.builds(Tap, module=st.from_regex(r"[a-z_][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True),
              scale=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), at=st.sampled_from(TAP_SITES)),
)
RECIPES = st.builds(
    Recipe,
    name=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=20).filter(str.isprintable),
    hadamard=st.booleans(),
    specs=st.lists(st.tuples(TAPS, SPECS), min_size=1, max_size=8, unique_by=lambda pair: pair[0].key),
    head=st.one_of(st.none(), SPECS),
)


@settings(max_examples=100)
@given(recipe=RECIPES)
def test_any_recipe_round_trips_exactly_through_json(recipe):
    data = recipe.to_dict()
    again = Recipe.from_dict(through_json(data))
    assert again == recipe and hash(again) == hash(recipe)
    # Exactly: the same types and bits (an int percentile must not come back as a different float).
    assert json.dumps(again.to_dict()) == json.dumps(data)
    assert again.to_dict() == through_json(data)
    assert copy.deepcopy(recipe) == recipe


def test_observer_arguments_are_stored_complete_and_canonical():
    spec = QuantSpec(observer="percentile", observer_args={"percentile": 99})
    assert spec.observer_args == (("bins", 4096), ("percentile", 99.0))
    assert spec == QuantSpec(observer="percentile", observer_args=(("percentile", 99.0), ("bins", 4096)))
    assert spec.to_dict()["observer_args"] == {"bins": 4096, "percentile": 99.0}


# --- the built-in recipes --------------------------------------------------------------------------


def test_builtin_recipes_are_what_the_docs_say():
    quamba, naive = make_recipe("quamba"), make_recipe("naive")
    assert quamba.hadamard and not naive.hadamard
    assert quamba.taps == naive.taps == W8A8_TAPS
    assert all(naive.spec(tap) == QuantSpec() for tap in W8A8_TAPS)
    assert quamba.spec(CONV_OUT) == QuantSpec(observer="percentile", observer_args={"percentile": 99.999, "bins": 4096})
    assert all(quamba.spec(tap) == QuantSpec() for tap in W8A8_TAPS if tap != CONV_OUT)
    assert quamba.spec(CONV_OUT).qmin == -128 and quamba.spec(CONV_OUT).qmax == 127


def test_the_command_line_offers_the_builtin_recipes():
    """The CLI reads its choices from catalog.py (no torch import); they must be the registered ones."""
    assert set(RECIPE_NAMES) <= set(recipe_names())
    assert recipe_names()[:len(RECIPE_NAMES)] == RECIPE_NAMES


def test_make_recipe_percentile_replaces_only_percentile_observers():
    at = make_recipe("quamba", percentile=99.9)
    assert at.name == "quamba" and at.spec(CONV_OUT).observer_kwargs == {"percentile": 99.9, "bins": 4096}
    assert at.spec(OUT_PROJ_IN) == QuantSpec()
    assert make_recipe("naive", percentile=99.9) == make_recipe("naive")
    assert make_recipe("quamba", percentile=99.999) == make_recipe("quamba")


def test_observers_come_from_the_specs():
    recipe = make_recipe("quamba", percentile=90.0)
    conv = recipe.observer(CONV_OUT, "layers.0.conv")
    assert isinstance(conv, PercentileObserver) and conv.percentile == 90.0 and conv.name == "layers.0.conv"
    assert isinstance(recipe.observer(OUT_PROJ_IN, "x"), AbsMaxObserver)
    with pytest.raises(KeyError, match="does not quantize"):
        Recipe("one", False, {CONV_OUT: QuantSpec()}).observer(OUT_PROJ_IN, "x")


@pytest.mark.parametrize("name, error, message", [
    ("awq", InvalidArgumentError, "unknown recipe 'awq'; choose one of 'naive', 'naive-w4a8', 'naive-w4a16', 'quamba'"),
    (3, InvalidArgumentError, "unknown recipe 3"),
])
def test_unknown_recipe_names_are_rejected(name, error, message):
    with pytest.raises(error, match=message):
        make_recipe(name)


def test_as_recipe_takes_names_and_recipe_objects():
    mine = Recipe("mine", False, {CONV_OUT: QuantSpec()})
    assert as_recipe(mine) is mine and as_recipe("naive") == make_recipe("naive")
    with pytest.raises(InvalidArgumentError, match="recipe must be a recipe name or a quamba_fx.recipes.Recipe, got dict"):
        as_recipe(mine.to_dict())


def test_register_recipe(monkeypatch):
    monkeypatch.setattr(registry, "_RECIPES", dict(registry._RECIPES))
    mine = make_recipe("quamba", percentile=99.0)
    mine = Recipe("mine", mine.hadamard, mine.specs)
    assert register_recipe(mine) is mine and make_recipe("mine") is mine and "mine" in recipe_names()
    assert register_recipe(copy.deepcopy(mine)) == mine  # an equal recipe again (a module reloaded)
    other = Recipe("mine", False, mine.specs)
    with pytest.raises(RecipeError, match="a different recipe named 'mine' is already registered"):
        register_recipe(other)
    assert register_recipe(other, replace=True) is other and make_recipe("mine") is other
    with pytest.raises(InvalidArgumentError, match="register_recipe needs a quamba_fx.recipes.Recipe, got dict"):
        register_recipe(mine.to_dict())


def test_a_recipe_object_works_wherever_a_name_does():
    """quantize and calibrate take a Recipe as they take a name; a custom tap set is honoured."""
    model = make_model(tiny_config(num_hidden_layers=1))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    by_name = quamba_fx.quantize(model, [ids], recipe="quamba", progress=False)
    by_object = quamba_fx.quantize(model, [ids], recipe=make_recipe("quamba"), progress=False)
    assert torch.equal(by_name(ids), by_object(ids))
    mine = Recipe("clip-out-proj", True, {
        **{tap: QuantSpec() for tap in W8A8_TAPS},
        OUT_PROJ_IN: QuantSpec(observer="percentile", observer_args={"percentile": 99.0}),
    })
    qm = quamba_fx.quantize(model, [ids], recipe=mine, progress=False)
    assert graph_meta(qm).recipe == "clip-out-proj" and graph_meta(qm).recipe_spec == mine
    calibration = quamba_fx.calibrate(quamba_fx.capture(model), [ids], mine, progress=False)
    assert isinstance(calibration.observers["backbone.layers.0.mixer.out_proj.input_scale"], PercentileObserver)
    assert isinstance(calibration.observers["backbone.layers.0.mixer.conv1d.output_scale"], AbsMaxObserver)


# --- malformed recipes ----------------------------------------------------------------------------


def quamba_dict():
    return make_recipe("quamba").to_dict()


def edited(path, value):
    """The quamba recipe dict with the entry at `path` (keys and list indices) set to `value`, or
    removed when `value` is DELETE."""
    data = quamba_dict()
    *parents, last = path
    target = data
    for key in parents:
        target = target[key]
    if value is DELETE and isinstance(target, dict):
        target.pop(last, None)
    elif value is DELETE:
        del target[last]
    else:
        target[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize("path, value, field, message", [
    (("taps", 2, "spec", "observer"), "minmax", "taps[2].spec.observer",
     "unknown observer 'minmax'; use one of abs_max, channel_abs_max, percentile"),
    (("taps", 0, "spec", "dtype"), "int4", "taps[0].spec.dtype", "must be one of int8, float8_e4m3, got 'int4'"),
    (("taps", 0, "spec", "dtype"), 8, "taps[0].spec.dtype", "must be one of int8, float8_e4m3, got 8"),
    (("taps", 1, "spec", "qmin"), -127, "taps[1].spec.qmin", r"must be -128 \(the full int8 range\), got -127"),
    (("taps", 1, "spec", "qmax"), 127.0, "taps[1].spec.qmax", "must be 127"),
    (("taps", 1, "spec", "granularity"), "per_block", "taps[1].spec.granularity",
     "must be one of per_tensor, per_channel"),
    (("taps", 1, "spec", "granularity"), "per_channel", "taps[1].spec.observer",
     "must be 'channel_abs_max' for a per_channel spec and only then, got 'abs_max'"),
    (("taps", 2, "spec", "observer_args", "percentile"), 101, "taps[2].spec.observer_args",
     r"percentile must be in \[0, 100\], got 101"),
    (("taps", 2, "spec", "observer_args", "percentile"), [99], "taps[2].spec.observer_args.percentile",
     "must be a string, finite number, boolean or null"),
    (("taps", 2, "spec", "observer_args", "bin"), 8, "taps[2].spec.observer_args", "has no argument 'bin'"),
    (("taps", 2, "spec", "observer_args"), [], "taps[2].spec.observer_args", "must be an object"),
    (("taps", 2, "spec", "observer"), DELETE, "taps[2].spec.observer", "is missing"),
    (("taps", 2, "spec"), DELETE, "taps[2].spec", "is missing"),
    (("taps", 2, "spec"), "percentile", "taps[2].spec", "must be an object"),
    (("taps", 3, "at"), "before", "taps[3].at", "must be one of output, input, activation"),
    (("taps", 3, "module"), "mixer/x_proj", "taps[3].module", "must be a module path inside a block"),
    (("taps", 3, "scale"), "output.scale", "taps[3].scale", "must be a buffer name"),
    (("taps", 3, "where"), "x", "taps[3].where", "is not a recipe field; expected only module, scale, at, spec"),
    (("taps", 4), ["mixer.dt_proj"], "taps[4]", "must be an object"),
    (("taps",), [], "taps", "must be a non-empty list of taps"),
    (("taps",), {}, "taps", "must be a list"),
    (("hadamard",), DELETE, "hadamard", "is missing"),
    (("hadamard",), "yes", "hadamard", "must be a boolean"),
    (("name",), "", "name", "must be a printable string"),
    (("name",), "two\nlines", "name", "must be a printable string"),
    (("percentile",), 99.9, "percentile", "is not a recipe field; expected only name, hadamard, taps"),
    (("head",), "abs_max", "head", "must be an object or null, got 'abs_max'"),
    (("head", "observer"), "minmax", "head.observer", "unknown observer 'minmax'"),
    (("head", "granularity"), "per_channel", "head.observer", "must be 'channel_abs_max' for a per_channel spec"),
    (("head",), {"dtype": "float8_e4m3", "qmin": -448, "qmax": 448, "granularity": "per_tensor",
                 "observer": "abs_max", "observer_args": {}}, "head", "must be an int8 per_tensor spec"),
])
def test_malformed_recipe_dicts_raise_one_line_naming_the_field(path, value, field, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_dict(edited(path, value))
    assert info.value.field == field and str(info.value).startswith(f"recipe field {field}: ")
    assert "\n" not in str(info.value) and isinstance(info.value, QuambaError)


def test_a_tap_given_twice_is_rejected():
    data = quamba_dict()
    data["taps"].append(data["taps"][0])
    with pytest.raises(RecipeError, match="taps\\[6\\]: must be a tap whose scale buffer no other tap uses, got 'norm.output_scale'"):
        Recipe.from_dict(data)


def test_a_non_dict_is_rejected():
    with pytest.raises(RecipeError, match=r"recipe field \(top level\): must be an object, got 'quamba'"):
        Recipe.from_dict("quamba")


def test_recipes_built_in_code_are_checked_too():
    with pytest.raises(RecipeError, match="recipe field observer: unknown observer 'max'"):
        QuantSpec(observer="max")
    with pytest.raises(RecipeError, match="recipe field taps\\[0\\]: must be a \\(Tap, QuantSpec\\) pair"):
        Recipe("mine", False, {CONV_OUT: "abs_max"})
    with pytest.raises(RecipeError, match="recipe field observer_args.percentile: must be a string, finite number"):
        QuantSpec(observer="percentile", observer_args={"percentile": float("nan")})


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
              st.sampled_from(["int8", "abs_max", "percentile", "output", "per_tensor", "mixer.x_proj"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
PATHS = st.sampled_from([
    ("name",), ("hadamard",), ("taps",), ("taps", 0), ("taps", 5, "module"), ("taps", 2, "scale"), ("taps", 1, "at"),
    ("taps", 2, "spec"), ("taps", 2, "spec", "dtype"), ("taps", 0, "spec", "qmin"), ("taps", 3, "spec", "qmax"),
    ("taps", 4, "spec", "granularity"), ("taps", 2, "spec", "observer"), ("taps", 1, "spec", "observer"),
    ("taps", 2, "spec", "observer_args"), ("taps", 2, "spec", "observer_args", "percentile"),
    ("taps", 2, "spec", "observer_args", "bins"), ("taps", 0, "spec", "observer_args", "percentile"),
])


@settings(max_examples=300)
@given(path=PATHS, value=st.one_of(st.just(DELETE), JSON))
def test_any_edit_of_a_recipe_dict_reads_back_or_raises_one_recipe_error(path, value):
    try:
        recipe = Recipe.from_dict(edited(path, value))
    except RecipeError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"recipe field {path[0]}")
        return
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_the_package_exports_the_recipe_api():
    assert quamba_fx.Recipe is Recipe and quamba_fx.QuantSpec is QuantSpec
    assert quamba_fx.make_recipe is make_recipe and quamba_fx.register_recipe is register_recipe
    assert issubclass(quamba_fx.RecipeError, quamba_fx.InvalidArgumentError)
    assert quamba_fx.recipe.make_recipe is make_recipe  # the old module path keeps working


# --- per-channel specs (Quamba2's scales of Mamba-2's conv1d output) ----------------------------


@settings(max_examples=40)
@given(recipe=RECIPES, data=st.data())
def test_a_recipe_with_channel_specs_round_trips_exactly(recipe, data):
    chosen = data.draw(st.lists(st.sampled_from(recipe.taps), unique_by=lambda tap: tap.key, min_size=1))
    with_channels = Recipe(recipe.name, recipe.hadamard, recipe.specs, recipe.weights,
                           {tap: CHANNEL_ABS_MAX_INT8 for tap in chosen})
    again = Recipe.from_dict(through_json(with_channels.to_dict()))
    assert again == with_channels and again.channel_specs == with_channels.channel_specs
    assert "channel_taps" not in recipe.to_dict()  # a recipe without them writes what it always wrote


def test_channel_specs_apply_only_where_an_architecture_takes_them():
    recipe = make_recipe("quamba2-w8a8")
    assert recipe.specs == make_recipe("quamba").specs and recipe.channel_specs == ((CONV_OUT, CHANNEL_ABS_MAX_INT8),)
    assert recipe.with_channel_scales(()) == Recipe(recipe.name, True, recipe.specs, head=recipe.head)
    mamba2 = recipe.with_channel_scales({CONV_OUT.key})
    assert mamba2.spec(CONV_OUT) == CHANNEL_ABS_MAX_INT8 and mamba2.channel_specs == ()
    assert all(mamba2.spec(tap) == recipe.spec(tap) for tap in recipe.taps if tap != CONV_OUT)


@pytest.mark.parametrize("channel_specs, field, message", [
    ({CONV_OUT: QuantSpec()}, "channel_taps[0].spec.granularity", "must be per_channel"),
    ({Tap("mixer.conv1d", "other_scale", "activation"): CHANNEL_ABS_MAX_INT8}, "channel_taps[0]",
     "must be a tap of the recipe's taps, given once, got 'mixer.conv1d.other_scale'"),
    (((CONV_OUT, CHANNEL_ABS_MAX_INT8), (CONV_OUT, CHANNEL_ABS_MAX_INT8)), "channel_taps[1]",
     "must be a tap of the recipe's taps, given once, got 'mixer.conv1d.output_scale'"),
])
def test_bad_channel_specs_are_refused(channel_specs, field, message):
    with pytest.raises(RecipeError, match=re.escape(f"{field}: {message}")):
        Recipe("mine", True, make_recipe("quamba").specs, channel_specs=channel_specs)


@pytest.mark.parametrize("fields, field, message", [
    (dict(granularity="per_channel"), "observer", "must be 'channel_abs_max' for a per_channel spec"),
    (dict(observer="channel_abs_max"), "observer", "must be 'channel_abs_max' for a per_channel spec and only then"),
    (dict(dtype="float8_e4m3", qmin=-448, qmax=448, granularity="per_channel", observer="channel_abs_max"),
     "dtype", "must be int8 for a per_channel spec"),
])
def test_a_per_channel_spec_takes_the_channel_observer_and_int8(fields, field, message):
    with pytest.raises(RecipeError, match=re.escape(f"{field}: {message}")):
        QuantSpec(**fields)


def test_a_per_channel_spec_where_the_architecture_takes_one_scale_is_refused():
    per_channel_everywhere = Recipe("mine", True, {tap: CHANNEL_ABS_MAX_INT8 for tap in W8A8_TAPS})
    gm = quamba_fx.capture(make_model(tiny_config()))
    with pytest.raises(RecipeError, match="Mamba-1 takes one scale per channel only at none"):
        quamba_fx.quantize(gm, torch.randint(0, 64, (1, 8)), recipe=per_channel_everywhere, progress=False)
