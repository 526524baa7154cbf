"""The data a quantization recipe is: where it quantizes (`Tap`), how (`QuantSpec`), and the
`Recipe` that pairs them, plus whether out_proj's input is Hadamard-rotated.

Everything here is frozen and validated on construction, and `Recipe.to_dict()` is plain JSON
(str, int, float, bool, lists, objects) that `Recipe.from_dict` turns back into an equal recipe:
a checkpoint stores that dict, so any recipe, registered or not, reloads exactly. Observers are
named (`abs_max`, `percentile`: the registry in `quant/observers.py`), never held as callables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..arch.spec import TAP_SITES, Tap  # re-exported: where a tap sits is an architecture fact
from ..errors import RecipeError
from ..quant.observers import Observer, make_observer, observer_class
from ..quant.fp8 import E4M3_MAX
from ..quant.qops import QMAX, QMIN

__all__ = ["ABS_MAX_INT8", "ACTIVATION_DTYPES", "CHANNEL_ABS_MAX_INT8", "GRANULARITIES", "LINEAR_MODULES", "TAP_SITES",
           "WEIGHT_METHODS", "QuantSpec", "Recipe", "Tap", "WeightSpec"]

# Activation dtypes a spec may name, with the range of their values (integer codes for int8, the
# largest finite e4m3 magnitude for fp8). The quantize ops implement exactly these ranges, so a
# spec must use a dtype's full range; the scale is `statistic / qmax`.
ACTIVATION_DTYPES: dict[str, tuple[int, int]] = {"int8": (QMIN, QMAX), "float8_e4m3": (-int(E4M3_MAX), int(E4M3_MAX))}
# One scale a tensor (a 0-dim buffer), or one a channel (a `[C]` buffer) where the architecture's
# kernels take it (`ArchSpec.channel_taps`; Mamba-2's conv1d output: x by channel, B and C by
# state group), always from the abs-max of each channel (or group): `channel_abs_max`.
GRANULARITIES = ("per_tensor", "per_channel")
CHANNEL_OBSERVER = "channel_abs_max"
_MAX_NAME_LENGTH = 200


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int in Python, and True is no range bound


def _is_json_scalar(value: Any) -> bool:
    if type(value) is float:
        return math.isfinite(value)  # JSON has no NaN or infinity
    return value is None or type(value) in (str, int, bool)


def _expect(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        text = repr(value)
        raise RecipeError(where, f"must be {expected}, got {text if len(text) <= 60 else text[:57] + '...'}")


@dataclass(frozen=True)
class QuantSpec:
    """How one activation is quantized: its `dtype` (`int8`, or `float8_e4m3` whose values span
    +-448) and range `qmin..qmax` (the dtype's full range), the `granularity` of its scale, and
    the observer (by registered name, with its keyword arguments) whose statistic sets the scale
    (`statistic / qmax`).

    `observer_args` may be given as a mapping; it is stored as sorted `(name, value)` pairs with
    every default filled in, so the spec stays hashable and two spellings of one configuration
    compare equal. Values must be JSON scalars. `granularity` `per_channel` (with the observer
    `channel_abs_max`) gives one scale per channel, or per group of channels where the
    architecture's kernels need one (see `Recipe.channel_specs`). Raises `RecipeError` naming the
    bad field.
    """

    dtype: str = "int8"
    qmin: int = -128
    qmax: int = 127
    granularity: str = "per_tensor"
    observer: str = "abs_max"
    observer_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _expect(isinstance(self.dtype, str) and self.dtype in ACTIVATION_DTYPES, "dtype",
                f"one of {', '.join(ACTIVATION_DTYPES)}", self.dtype)
        low, high = ACTIVATION_DTYPES[self.dtype]
        _expect(_is_int(self.qmin) and self.qmin == low, "qmin", f"{low} (the full {self.dtype} range)", self.qmin)
        _expect(_is_int(self.qmax) and self.qmax == high, "qmax", f"{high} (the full {self.dtype} range)", self.qmax)
        _expect(self.granularity in GRANULARITIES, "granularity", f"one of {', '.join(GRANULARITIES)}",
                self.granularity)
        per_channel = self.granularity == "per_channel"
        _expect(per_channel == (self.observer == CHANNEL_OBSERVER), "observer",
                f"{CHANNEL_OBSERVER!r} for a per_channel spec and only then", self.observer)
        _expect(not per_channel or self.dtype == "int8", "dtype", "int8 for a per_channel spec", self.dtype)
        try:
            cls = observer_class(self.observer)
        except ValueError as exc:
            raise RecipeError("observer", str(exc)) from None
        arguments = self.observer_args
        if not isinstance(arguments, Mapping):
            _expect(isinstance(arguments, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2
                                                                for p in arguments),
                    "observer_args", "a mapping of argument names to values", arguments)
            arguments = dict(arguments)
        for name, value in arguments.items():
            _expect(isinstance(name, str), "observer_args", "a mapping with string keys", name)
            _expect(_is_json_scalar(value), f"observer_args.{name}", "a string, finite number, boolean or null", value)
        try:
            checked = cls.check_arguments(arguments)
        except ValueError as exc:
            raise RecipeError("observer_args", str(exc)) from None
        object.__setattr__(self, "observer_args", tuple(sorted(checked.items())))

    @property
    def observer_kwargs(self) -> dict[str, Any]:
        """The observer's keyword arguments as a dict."""
        return dict(self.observer_args)

    def to_dict(self) -> dict[str, Any]:
        """This spec as JSON-ready data."""
        return {"dtype": self.dtype, "qmin": self.qmin, "qmax": self.qmax, "granularity": self.granularity,
                "observer": self.observer, "observer_args": self.observer_kwargs}

    @classmethod
    def from_dict(cls, data: Any) -> "QuantSpec":
        """The spec `to_dict` wrote. Raises `RecipeError` naming a missing, unknown or bad field."""
        _check_keys(data, ("dtype", "qmin", "qmax", "granularity", "observer", "observer_args"), None)
        _expect(isinstance(data["observer_args"], dict), "observer_args", "an object", data["observer_args"])
        return cls(**data)


# The plainest activation spec (int8, full range, one scale a tensor, abs-max), which most taps
# of every built-in recipe use.
ABS_MAX_INT8 = QuantSpec(dtype="int8", qmin=-128, qmax=127, granularity="per_tensor", observer="abs_max")
# Its per-channel form (Quamba2's scales of Mamba-2's conv1d output).
CHANNEL_ABS_MAX_INT8 = QuantSpec(dtype="int8", qmin=-128, qmax=127, granularity="per_channel",
                                 observer=CHANNEL_OBSERVER)


# Every Linear of a block (block-relative paths, Mamba-1's four; a Mamba-2 block has in_proj and out_proj).
LINEAR_MODULES = ("mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj")
WEIGHT_METHODS = ("rtn", "gptq")
WEIGHT_BITS = (8, 4)


@dataclass(frozen=True)
class WeightSpec:
    """How a recipe stores Linear weights.

    `bits=8` (the default, the W8A8 recipes): per-output-channel weights in the dtype of the Linear's
    input tap (int8, or e4m3 behind a `float8_e4m3` tap), rounded to nearest; `group_size` must be
    None and `method` "rtn". `bits=4` (Quamba2): int4 codes packed two a byte with one fp16 scale
    per `group_size` input columns of a row, rounded to nearest (`rtn`) or with GPTQ (`gptq`, which
    needs calibration data). 4-bit weights go to the Linears in `modules` (block-relative paths):
    one whose input a tap quantizes to int8 becomes a `W4A8Linear`, any other a weight-only
    `W4A16Linear`. `embedding_and_head` (4-bit only) stores the token embedding (rounded to
    nearest) and the LM head (by `method`) in the same groups too, as Quamba2 does; a tied pair
    rounded to nearest keeps one packed tensor. Raises `RecipeError` naming the bad field.
    """

    bits: int = 8
    group_size: int | None = None
    method: str = "rtn"
    modules: tuple[str, ...] = LINEAR_MODULES
    embedding_and_head: bool = False

    def __post_init__(self) -> None:
        _expect(_is_int(self.bits) and self.bits in WEIGHT_BITS, "weights.bits", "8 or 4", self.bits)
        _expect(self.method in WEIGHT_METHODS, "weights.method", f"one of {', '.join(WEIGHT_METHODS)}", self.method)
        if self.bits == 8:
            _expect(self.group_size is None, "weights.group_size", "null for 8-bit weights (one scale a row)",
                    self.group_size)
            _expect(self.method == "rtn", "weights.method", "rtn for 8-bit weights", self.method)
        else:
            _expect(_is_int(self.group_size) and self.group_size >= 2 and self.group_size % 2 == 0,
                    "weights.group_size", "an even integer >= 2 (Quamba2 uses 128)", self.group_size)
        _expect(isinstance(self.embedding_and_head, bool) and (self.bits == 4 or not self.embedding_and_head),
                "weights.embedding_and_head", "true or false, and true only with 4-bit weights", self.embedding_and_head)
        modules = self.modules
        _expect(isinstance(modules, (tuple, list)) and all(isinstance(m, str) and m for m in modules)
                and len(set(modules)) == len(modules), "weights.modules", "a list of distinct module paths", modules)
        object.__setattr__(self, "modules", tuple(modules))

    def int4_linears(self, blocks: list[str]) -> list[str]:
        """Module paths of the Linears this spec gives 4-bit weights in the blocks at `blocks`
        (`backbone.layers.0.mixer.in_proj`, ...); none for 8-bit weights."""
        return [f"{block}.{module}" for block in blocks for module in self.modules] if self.bits == 4 else []

    def to_dict(self) -> dict[str, Any]:
        """This spec as JSON-ready data."""
        data = {"bits": self.bits, "group_size": self.group_size, "method": self.method, "modules": list(self.modules)}
        if self.embedding_and_head:  # absent otherwise: earlier recipes' dicts stay as they were
            data["embedding_and_head"] = True
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "WeightSpec":
        """The spec `to_dict` wrote. Raises `RecipeError` naming a missing, unknown or bad field.
        `embedding_and_head` may be absent (false): specs saved before it existed had float ones."""
        if isinstance(data, dict) and "embedding_and_head" not in data:
            data = {**data, "embedding_and_head": False}
        _check_keys(data, ("bits", "group_size", "method", "modules", "embedding_and_head"), "weights")
        return cls(**data)


# W8A8's weights: 8-bit, one scale per output channel.
PER_CHANNEL_8BIT = WeightSpec()


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe: a `name`, whether out_proj's input is Hadamard-rotated (`hadamard`),
    a `QuantSpec` for each tapped activation (`specs`, in the order the taps are quantized), and how
    Linear weights are stored (`weights`, by default 8-bit per channel).

    `specs` may be given as a mapping from `Tap` to `QuantSpec`; it is stored as `(tap, spec)`
    pairs. Only a 4-bit weight recipe may have no taps (weight-only, W4A16). `channel_specs`
    (likewise) are `per_channel` specs that replace a tap's spec in the architectures whose kernels
    take a scale per channel there (`ArchSpec.channel_taps`: Mamba-2's conv1d output, which feeds
    the scan; Mamba-1's feeds x_proj's GEMM, which needs one scale); `quantize` applies them
    (`with_channel_scales`). Raises `RecipeError` naming the bad field for an invalid name, no
    taps, a tap given twice, or a channel spec that is not per channel or has no tap in `specs`.
    `head`, when given, quantizes the language-model head as Quamba does: its input (the final
    norm's output) by this per-tensor int8 spec, its weight to int8 per output channel, so a
    decode step streams half the head's bytes; None keeps the head float (or 4-bit weight-only,
    with `weights.embedding_and_head`). Its scale is the head's `input_scale` buffer.
    Build one and pass it as `recipe=` to `quantize` or `calibrate`, or register it
    (`quamba_fx.recipes.register_recipe`) to use it by name.
    """

    name: str
    hadamard: bool
    specs: tuple[tuple[Tap, QuantSpec], ...] = field(default=())
    weights: WeightSpec = PER_CHANNEL_8BIT
    channel_specs: tuple[tuple[Tap, QuantSpec], ...] = field(default=())
    head: QuantSpec | None = None

    def __post_init__(self) -> None:
        _expect(isinstance(self.name, str) and 0 < len(self.name) <= _MAX_NAME_LENGTH and self.name.isprintable(),
                "name", f"a printable string of 1 to {_MAX_NAME_LENGTH} characters", self.name)
        _expect(type(self.hadamard) is bool, "hadamard", "a boolean", self.hadamard)
        _expect(isinstance(self.weights, WeightSpec), "weights", "a WeightSpec", self.weights)
        pairs = tuple(self.specs.items()) if isinstance(self.specs, Mapping) else self.specs
        _expect(isinstance(pairs, (tuple, list)), "taps", "a list of taps", pairs)
        _expect(len(pairs) > 0 or self.weights.bits < 8, "taps",
                "a non-empty list of taps (only a 4-bit weight-only recipe quantizes no activation)", pairs)
        seen: set[str] = set()
        for i, pair in enumerate(pairs):
            _expect(isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], Tap)
                    and isinstance(pair[1], QuantSpec), f"taps[{i}]", "a (Tap, QuantSpec) pair", pair)
            _expect(pair[0].key not in seen, f"taps[{i}]", "a tap whose scale buffer no other tap uses", pair[0].key)
            seen.add(pair[0].key)
        object.__setattr__(self, "specs", tuple((tap, spec) for tap, spec in pairs))
        channel = tuple(self.channel_specs.items()) if isinstance(self.channel_specs, Mapping) else self.channel_specs
        _expect(isinstance(channel, (tuple, list)), "channel_taps", "a list of taps", channel)
        overridden: set[str] = set()
        for i, pair in enumerate(channel):
            where = f"channel_taps[{i}]"
            _expect(isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], Tap)
                    and isinstance(pair[1], QuantSpec), where, "a (Tap, QuantSpec) pair", pair)
            _expect(pair[0].key in seen and pair[0].key not in overridden, where,
                    "a tap of the recipe's taps, given once", pair[0].key)
            _expect(pair[1].granularity == "per_channel", f"{where}.spec.granularity", "per_channel",
                    pair[1].granularity)
            overridden.add(pair[0].key)
        object.__setattr__(self, "channel_specs", tuple((tap, spec) for tap, spec in channel))
        if self.head is not None:
            _expect(isinstance(self.head, QuantSpec), "head", "a QuantSpec or None", self.head)
            _expect(self.head.dtype == "int8" and self.head.granularity == "per_tensor", "head",
                    "an int8 per_tensor spec (the head's GEMM takes one int8 input scale)", self.head)
            _expect(self.weights.bits == 8, "head",
                    "None with 4-bit weights (weights.embedding_and_head quantizes their head)", self.head)

    @property
    def taps(self) -> tuple[Tap, ...]:
        """The tapped activations, in order."""
        return tuple(tap for tap, _ in self.specs)

    def restricted_to(self, modules: set[str] | frozenset[str]) -> "Recipe":
        """This recipe without the taps and weight modules outside `modules` (block-relative
        paths): what it quantizes in an architecture whose blocks have only those (Mamba-2 has no
        x_proj or dt_proj). Itself when everything is kept; `RecipeError` when it would quantize
        nothing."""
        kept = tuple((tap, spec) for tap, spec in self.specs if tap.module in modules)
        channel = tuple((tap, spec) for tap, spec in self.channel_specs if tap.module in modules)
        weights = replace(self.weights, modules=tuple(m for m in self.weights.modules if m in modules))
        if not kept and (self.specs or not weights.modules):
            raise RecipeError("taps", f"recipe {self.name!r} quantizes none of the modules {sorted(modules)}")
        if len(kept) == len(self.specs) and len(channel) == len(self.channel_specs) and weights == self.weights:
            return self
        return replace(self, specs=kept, weights=weights, channel_specs=channel)

    def with_channel_scales(self, keys: set[str] | frozenset[str] | tuple[str, ...]) -> "Recipe":
        """This recipe with each channel spec whose tap key is in `keys` (the taps where an
        architecture takes per-channel scales) in place of the tap's spec, and no channel specs
        left: the recipe a graph of that architecture is quantized with. Itself without any."""
        if not self.channel_specs:
            return self
        chosen = {tap.key: spec for tap, spec in self.channel_specs if tap.key in keys}
        return replace(self, specs=tuple((tap, chosen.get(tap.key, spec)) for tap, spec in self.specs),
                       channel_specs=())

    def spec(self, tap: Tap) -> QuantSpec:
        """The spec of `tap`; `KeyError` if this recipe does not quantize it."""
        for candidate, spec in self.specs:
            if candidate == tap:
                return spec
        raise KeyError(f"recipe {self.name!r} does not quantize {tap.key}")

    def observer(self, tap: Tap, name: str) -> Observer:
        """A fresh observer for `tap`, as its spec says; `name` labels it in error messages."""
        spec = self.spec(tap)
        return make_observer(spec.observer, spec.observer_kwargs, label=name)

    def with_observer_args(self, observer: str, **arguments: Any) -> "Recipe":
        """A copy in which every tap observed by `observer` takes `arguments` (e.g. the quamba recipe
        at another percentile: `recipe.with_observer_args("percentile", percentile=99.9)`)."""
        specs = tuple((tap, replace(spec, observer_args={**spec.observer_kwargs, **arguments})
                       if spec.observer == observer else spec) for tap, spec in self.specs)
        return replace(self, specs=specs)

    def to_dict(self) -> dict[str, Any]:
        """This recipe as JSON-ready data; `Recipe.from_dict(recipe.to_dict()) == recipe`."""
        data = {
            "name": self.name,
            "hadamard": self.hadamard,
            "taps": _taps_to_list(self.specs),
            "weights": self.weights.to_dict(),
        }
        if self.channel_specs:  # absent otherwise: earlier recipes' dicts stay as they were
            data["channel_taps"] = _taps_to_list(self.channel_specs)
        if self.head is not None:  # likewise
            data["head"] = self.head.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """The recipe `to_dict` wrote. Raises `RecipeError` naming the first missing, unknown or
        malformed field (`taps[2].spec.observer`). `weights`, `channel_taps` and `head` may be
        absent: recipes saved before `weights` existed had 8-bit per-channel weights, its default,
        and `to_dict` leaves out an empty `channel_taps` and a float head."""
        if isinstance(data, dict):
            data = {"weights": PER_CHANNEL_8BIT.to_dict(), "channel_taps": [], "head": None, **data}
        _check_keys(data, ("name", "hadamard", "taps", "weights", "channel_taps", "head"), None)
        head = data["head"]
        if head is not None:
            _expect(isinstance(head, dict), "head", "an object or null", head)
            try:
                head = QuantSpec.from_dict(head)
            except RecipeError as exc:
                raise exc.within("head") from None
        return cls(data["name"], data["hadamard"], _taps_from_list(data["taps"], "taps"),
                   WeightSpec.from_dict(data["weights"]), _taps_from_list(data["channel_taps"], "channel_taps"), head)


def _taps_to_list(specs: tuple[tuple[Tap, QuantSpec], ...]) -> list[dict[str, Any]]:
    return [{"module": tap.module, "scale": tap.scale, "at": tap.at, "spec": spec.to_dict()} for tap, spec in specs]


def _taps_from_list(entries: Any, field_name: str) -> tuple[tuple[Tap, QuantSpec], ...]:
    """The `(tap, spec)` pairs `_taps_to_list` wrote; `RecipeError` naming the bad entry."""
    _expect(isinstance(entries, list), field_name, "a list", entries)
    specs = []
    for i, entry in enumerate(entries):
        where = f"{field_name}[{i}]"
        _check_keys(entry, ("module", "scale", "at", "spec"), where)
        try:
            tap = Tap(entry["module"], entry["scale"], entry["at"])
        except RecipeError as exc:
            raise exc.within(where) from None
        _expect(isinstance(entry["spec"], dict), f"{where}.spec", "an object", entry["spec"])
        try:
            spec = QuantSpec.from_dict(entry["spec"])
        except RecipeError as exc:
            raise exc.within(f"{where}.spec") from None
        specs.append((tap, spec))
    return tuple(specs)


def _check_keys(data: Any, keys: tuple[str, ...], where: str | None) -> None:
    """`data` is a dict with exactly `keys`: a misspelt key must not silently become a default."""
    _expect(isinstance(data, dict), where or "(top level)", "an object", data)
    missing = [key for key in keys if key not in data]
    if missing:
        name = f"{where}.{missing[0]}" if where else missing[0]
        raise RecipeError(name, "is missing; a recipe dict names every field (see Recipe.to_dict)")
    unknown = sorted(str(key) for key in data if key not in keys)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RecipeError(name, f"is not a recipe field; expected only {', '.join(keys)}")
