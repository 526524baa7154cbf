"""Calibration observers: statistics of |x| with bounded memory.

An observer sees every calibration batch of one tensor (`observe`), and afterwards reports one
number (`value`) and the int8 scale derived from it (`scale`), or with `channel_abs_max` one a
channel. Their state does not grow with the number of batches (the percentile observer keeps a
fixed-size histogram, the channel observer one number a channel).

State round-trips through `state_dict()` / `from_state_dict()` as plain Python values (str, int,
float, list of int): JSON-serialisable as is; `from_state_dict` also accepts tensors in place of
numbers and lists (as after a round-trip through safetensors; store the floats as fp64 tensors
there: an fp32 percentile moved the value by up to 3e-5 relative in a test of 300 draws).

Recipes name their observers instead of holding factories, so that a recipe is plain data: the
registry maps `abs_max`, `percentile` and `channel_abs_max` to their classes (`make_observer`,
`register_observer`), and each class declares the keyword arguments a recipe may set, with their
defaults (`defaults`) and their check (`check_arguments`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .qops import MIN_SCALE, QMAX

__all__ = [
    "OBSERVERS",
    "AbsMaxObserver",
    "ChannelAbsMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
    "observer_class",
    "observer_from_state_dict",
    "register_observer",
]


def _as_float(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _as_int(v: Any) -> int:
    return int(v.item()) if isinstance(v, Tensor) else int(v)


def _is_real(v: Any) -> bool:
    """A real number (a 0-dim tensor counts), never a bool: `True` is no percentile."""
    if isinstance(v, Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class Observer:
    """Base class: input checking, counters, scale and (de)serialisation shared by all observers.

    `count` is the number of values observed, `batches` the number of `observe` calls (empty
    tensors count as batches but add no values). `name` only appears in error messages.
    """

    kind: ClassVar[str] = "Observer"
    # The keyword arguments a recipe may set, with their defaults.
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = name
        self.count = 0
        self.batches = 0

    @classmethod
    def check_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """`arguments` with every default filled in and each value in its canonical type (so two
        spellings of one configuration compare equal). Raises `ValueError` naming the first unknown
        or invalid argument."""
        unknown = sorted(set(arguments) - set(cls.defaults))
        if unknown:
            takes = ", ".join(cls.defaults) or "none"
            raise ValueError(f"{cls.kind} has no argument {unknown[0]!r} (its arguments: {takes})")
        return cls._check_arguments({**cls.defaults, **arguments})

    @classmethod
    def _check_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        return arguments

    # -- subclass hooks -------------------------------------------------------------------------

    def _update(self, absx: Tensor, batch_max: float) -> None:
        raise NotImplementedError

    def _value(self) -> float:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {}

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments this observer was built with, as `check_arguments` returns them."""
        return self._config()

    def label(self) -> str:
        """How error messages name this observer, e.g. `PercentileObserver(percentile=99.999) 'x'`."""
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{self.kind}({args})" + (f" {self.name!r}" if self.name else "")

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Record `x` (any shape, dtype, device; statistics computed on `|x|` in fp32).

        Raises `ValueError`, naming this observer, when `x` holds NaN or Inf (after conversion to
        fp32); the observer's state is then unchanged.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.label()}: observe() needs a torch.Tensor, got {type(x).__name__}")
        absx = x.detach().to(torch.float32).abs()
        if absx.numel() == 0:
            self.batches += 1
            return
        finite = torch.isfinite(absx)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(absx).sum())
            n_inf = absx.numel() - int(finite.sum()) - n_nan
            raise ValueError(
                f"{self.label()}: observed a tensor of shape {tuple(x.shape)} ({x.dtype}) with {n_nan} NaN "
                f"and {n_inf} Inf values (after conversion to float32); calibration statistics need finite values"
            )
        self._observe(absx)
        self.count += absx.numel()
        self.batches += 1

    def _observe(self, absx: Tensor) -> None:
        """Record the finite `|x|` of one batch, in its shape (per-tensor observers flatten it)."""
        absx = absx.reshape(-1)
        self._update(absx, float(absx.max()))

    def value(self) -> float:
        """The observed statistic (abs-max or percentile of |x|). Raises `RuntimeError` before any value was seen."""
        if self.count == 0:
            raise RuntimeError(f"{self.label()}: value() called before any value was observed")
        return self._value()

    def scale(self, qmax: int = QMAX) -> float:
        """Symmetric quantization scale `value() / qmax`, floored at `MIN_SCALE` so it is never 0."""
        if qmax <= 0:
            raise ValueError(f"{self.label()}: qmax must be positive, got {qmax}")
        return max(self.value() / qmax, MIN_SCALE)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: `type`, `name`, configuration, counters and statistics."""
        return {"type": self.kind, "name": self.name, **self._config(), "count": self.count,
                "batches": self.batches, **self._state()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "Observer":
        """Rebuild an observer from `state_dict()` output (numbers may also be 0-dim tensors)."""
        kind = state.get("type", cls.kind)
        if cls is Observer:
            return observer_from_state_dict(state)
        if kind != cls.kind:
            raise ValueError(f"{cls.kind}.from_state_dict: state is for a {kind!r}")
        obs = cls._from_config(state)
        obs.count = _as_int(state["count"])
        obs.batches = _as_int(state["batches"])
        obs._load_state(state)
        return obs

    @classmethod
    def _from_config(cls, state: Mapping[str, Any]) -> "Observer":
        return cls(name=state.get("name"))

    def __repr__(self) -> str:
        return f"<{self.label()} count={self.count} batches={self.batches}>"


class AbsMaxObserver(Observer):
    """Running maximum of `|x|` over everything observed."""

    kind = "AbsMaxObserver"

    def __init__(self, name: Optional[str] = None) -> None:
        super().__init__(name)
        self.max = 0.0

    def _update(self, absx: Tensor, batch_max: float) -> None:
        self.max = max(self.max, batch_max)

    def _value(self) -> float:
        return self.max

    def _state(self) -> dict[str, Any]:
        return {"max": self.max}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.max = _as_float(state["max"])


class PercentileObserver(Observer):
    """Percentile of `|x|` over all values of all batches, from a fixed-size histogram.

    The histogram has `bins` equal bins over `[0, upper]`. The first batch with a nonzero value sets
    `upper` to its max; when a later batch exceeds `upper`, `upper` doubles (as often as needed) and
    each group of old bins is merged into one new bin. Because the new bin edges are a subset of the
    old ones, re-binning moves no count out of the range that holds its value, so every observed
    value `v` always sits in a bin `[i*w, (i+1)*w]` (`w = upper / bins`) that contains it.

    `value()` uses the same definition as `torch.quantile(..., interpolation="linear")` on the
    concatenation of all observed `|x|`: with `N` values and `r = percentile/100 * (N - 1)`, it
    interpolates linearly between the order statistics `r` rounds down and up to. Each order
    statistic is estimated inside its bin (its counts spread evenly over the bin), the largest one
    is the exact max, and the result is clamped to `[0, max]`.

    Error bound: `|value() - exact| <= w = upper / bins`, and `upper < 2 * max|x|`, so the error is
    at most `2 / bins` of the observed abs-max (about 0.05% for the default 4096 bins), up to fp
    rounding of the bin index. It is 0 when all values are 0 and when `percentile == 100`.

    Memory: `bins` int64 counters. Each `observe` moves one `bins`-sized histogram to the CPU.
    """

    kind = "PercentileObserver"
    defaults = {"percentile": 99.999, "bins": 4096}

    def __init__(self, percentile: float = 99.999, bins: int = 4096, name: Optional[str] = None) -> None:
        super().__init__(name)
        checked = self._check_arguments({"percentile": percentile, "bins": bins})
        self.percentile = checked["percentile"]
        self.bins = checked["bins"]
        self.upper = 0.0  # 0 until a nonzero value arrives; then all counts live in [0, upper]
        self.max = 0.0
        self.counts = torch.zeros(self.bins, dtype=torch.int64)

    @classmethod
    def _check_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        percentile, bins = arguments["percentile"], arguments["bins"]
        if not (_is_real(percentile) and 0.0 <= float(percentile) <= 100.0):
            raise ValueError(f"PercentileObserver: percentile must be in [0, 100], got {percentile!r}")
        if not (_is_real(bins) and math.isfinite(bins) and int(bins) == bins and bins >= 2):
            raise ValueError(f"PercentileObserver: bins must be an int >= 2, got {bins!r}")
        return {"percentile": float(percentile), "bins": int(bins)}

    def _config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "bins": self.bins}

    @classmethod
    def _from_config(cls, state: Mapping[str, Any]) -> "PercentileObserver":
        return cls(percentile=_as_float(state["percentile"]), bins=_as_int(state["bins"]), name=state.get("name"))

    def _grow(self, new_max: float) -> None:
        """Widen the range to cover `new_max`: first set it, or double it and merge bin groups."""
        if self.upper == 0.0:
            # Everything seen so far is 0 and sits in bin 0, which stays [0, w] for any new w.
            self.upper = new_max
            return
        shift, upper = 0, self.upper
        while upper < new_max:
            upper *= 2.0
            shift += 1
        # Old bin i covers [i*w, (i+1)*w] and lies inside new bin i >> shift (width w * 2**shift).
        target = torch.arange(self.bins) >> min(shift, 62)
        self.counts = torch.zeros_like(self.counts).index_add_(0, target, self.counts)
        self.upper = upper

    def _update(self, absx: Tensor, batch_max: float) -> None:
        if batch_max > self.upper:
            self._grow(batch_max)
        if self.upper == 0.0:
            self.counts[0] += absx.numel()
        else:
            # float64 for the index so that only values within ~1e-16 of a bin edge can land one bin off.
            idx = (absx.to(torch.float64) * (self.bins / self.upper)).floor_().clamp_(0, self.bins - 1).long()
            self.counts += torch.bincount(idx, minlength=self.bins).cpu()
        self.max = max(self.max, batch_max)

    def _order_statistic(self, k: int, cum: Tensor) -> float:
        """Estimate of the k-th smallest observed value (0-based)."""
        if k >= self.count - 1:
            return self.max
        b = int(torch.searchsorted(cum, torch.tensor([k]), right=True))
        in_bin = int(self.counts[b])
        start = int(cum[b]) - in_bin
        width = self.upper / self.bins
        return (b + (k - start + 0.5) / in_bin) * width

    def _value(self) -> float:
        if self.upper == 0.0:
            return 0.0
        if self.percentile == 100.0:
            return self.max
        rank = self.percentile / 100.0 * (self.count - 1)
        lo = math.floor(rank)
        frac = rank - lo
        cum = torch.cumsum(self.counts, 0)
        v_lo = self._order_statistic(lo, cum)
        v = v_lo if frac == 0.0 else v_lo + frac * (self._order_statistic(lo + 1, cum) - v_lo)
        return min(max(v, 0.0), self.max)

    def _state(self) -> dict[str, Any]:
        return {"upper": self.upper, "max": self.max, "counts": self.counts.tolist()}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        counts = torch.as_tensor(state["counts"], dtype=torch.int64).reshape(-1)
        if counts.numel() != self.bins:
            raise ValueError(f"{self.label()}: state has {counts.numel()} histogram bins, expected {self.bins}")
        if int(counts.sum()) != self.count:
            raise ValueError(f"{self.label()}: histogram holds {int(counts.sum())} values but count is {self.count}")
        self.counts = counts.clone()
        self.upper = _as_float(state["upper"])
        self.max = _as_float(state["max"])


# Observer classes by the name a recipe gives them.
OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make the observer class available to recipes as `name`.

    Its `kind` must be unique too (it names the class in saved calibrations). Registering another
    class under a taken name raises `ValueError`; registering the same class again is allowed.
    """

    def register(cls: type[Observer]) -> type[Observer]:
        if not (isinstance(cls, type) and issubclass(cls, Observer)):
            raise TypeError(f"register_observer({name!r}) needs an Observer subclass, got {cls!r}")
        taken = OBSERVERS.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"observer name {name!r} is already taken by {taken.kind}; choose another name")
        same_kind = [other for other in OBSERVERS.values() if other.kind == cls.kind and other is not cls]
        if same_kind:
            raise ValueError(f"observer kind {cls.kind!r} is already registered; give {cls.__name__} its own kind")
        OBSERVERS[name] = cls
        return cls

    return register


class ChannelAbsMaxObserver(Observer):
    """Running maximum of `|x|` per channel (along `axis` of every observed tensor), with channel
    groups that share one scale: `groups` are `(start, stop, size)` runs of channels cut into
    groups of `size` (Mamba-2's conv output: B's and C's channels a state group at a time); a
    channel in no run is a group of its own. `value()` and `scale()` are lists, one number a
    channel (a group's channels repeat its maximum), what a `[C]` scale buffer holds.

    `axis` and `groups` describe the tapped tensor, not the recipe: `calibrate` sets them from the
    architecture (`set_layout`) before the first batch. Memory: one fp32 a channel.
    """

    kind = "ChannelAbsMaxObserver"

    def __init__(self, name: Optional[str] = None, axis: int = 1,
                 groups: Sequence[Sequence[int]] = ()) -> None:
        super().__init__(name)
        self.axis = axis
        self.groups: tuple[tuple[int, int, int], ...] = ()
        self.max: Optional[Tensor] = None
        self.set_layout(axis, groups)

    def set_layout(self, axis: int, groups: Sequence[Sequence[int]]) -> None:
        """Channels lie along `axis`; `groups` as the class says. `ValueError` for a run that is
        not a whole number of groups, or runs that overlap."""
        runs = tuple(sorted(tuple(int(v) for v in run) for run in groups))
        end = 0
        for start, stop, size in runs:
            if not (start >= end and stop > start and size >= 1 and (stop - start) % size == 0):
                raise ValueError(f"{self.label()}: channel groups {list(runs)} must be disjoint runs "
                                 "(start, stop, size) of whole groups")
            end = stop
        self.axis, self.groups = int(axis), runs

    def _observe(self, absx: Tensor) -> None:
        if absx.dim() <= self.axis:
            raise ValueError(f"{self.label()}: a tensor of shape {tuple(absx.shape)} has no channel dim {self.axis}")
        channels = absx.movedim(self.axis, -1).reshape(-1, absx.shape[self.axis]).amax(dim=0).cpu()
        if self.max is None:
            if self.groups and self.groups[-1][1] > channels.numel():
                raise ValueError(f"{self.label()}: channel groups reach channel {self.groups[-1][1]}, "
                                 f"but the tensor has {channels.numel()}")
            self.max = channels
        elif channels.numel() != self.max.numel():
            raise ValueError(f"{self.label()}: observed {channels.numel()} channels after {self.max.numel()}")
        else:
            self.max = torch.maximum(self.max, channels)

    def _grouped(self) -> Tensor:
        merged = self.max.clone()
        for start, stop, size in self.groups:
            run = merged[start:stop].view(-1, size)
            merged[start:stop] = run.amax(dim=1, keepdim=True).expand_as(run).reshape(-1)
        return merged

    def value(self) -> list[float]:  # type: ignore[override]
        """The abs-max of each channel's group, a number a channel."""
        if self.count == 0:
            raise RuntimeError(f"{self.label()}: value() called before any value was observed")
        return self._grouped().tolist()

    def scale(self, qmax: int = QMAX) -> list[float]:  # type: ignore[override]
        """`value() / qmax` a channel, each floored at `MIN_SCALE`."""
        if qmax <= 0:
            raise ValueError(f"{self.label()}: qmax must be positive, got {qmax}")
        return (torch.tensor(self.value()) / qmax).clamp_min(MIN_SCALE).tolist()

    def _state(self) -> dict[str, Any]:
        return {"axis": self.axis, "groups": [list(run) for run in self.groups],
                "max": None if self.max is None else self.max.tolist()}

    @classmethod
    def _from_config(cls, state: Mapping[str, Any]) -> "ChannelAbsMaxObserver":
        groups = [[_as_int(v) for v in run] for run in state.get("groups", [])]
        return cls(name=state.get("name"), axis=_as_int(state.get("axis", 1)), groups=groups)

    def _load_state(self, state: Mapping[str, Any]) -> None:
        values = state.get("max")
        self.max = None if values is None else torch.as_tensor(values, dtype=torch.float32).reshape(-1).clone()
        if (self.max is None) != (self.count == 0):
            raise ValueError(f"{self.label()}: state has {'no' if self.max is None else 'a'} per-channel maximum "
                             f"but count {self.count}")


register_observer("abs_max")(AbsMaxObserver)
register_observer("percentile")(PercentileObserver)
register_observer("channel_abs_max")(ChannelAbsMaxObserver)


def observer_class(name: str) -> type[Observer]:
    """The observer class registered as `name`; `ValueError` naming the known ones otherwise."""
    cls = OBSERVERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown observer {name!r}; use one of {', '.join(sorted(OBSERVERS))}")
    return cls


def make_observer(name: str, arguments: Mapping[str, Any] | None = None, label: Optional[str] = None) -> Observer:
    """A fresh observer of the class registered as `name`, built with `arguments` (checked by
    `check_arguments`); `label` names it in error messages."""
    cls = observer_class(name)
    return cls(**cls.check_arguments(arguments or {}), name=label)


def observer_from_state_dict(state: Mapping[str, Any]) -> Observer:
    """Rebuild whichever observer `state["type"]` names."""
    kind = state.get("type")
    by_kind = {cls.kind: cls for cls in OBSERVERS.values()}
    if kind not in by_kind:
        raise ValueError(f"unknown observer type {kind!r}; known: {sorted(by_kind)}")
    return by_kind[kind].from_state_dict(state)
