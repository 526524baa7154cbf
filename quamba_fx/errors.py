"""Exceptions raised by quamba-fx. Every one derives from `QuambaError`, so callers can catch ours alone."""

from __future__ import annotations


class QuambaError(Exception):
    """Base class of every error quamba-fx raises on purpose."""


class UnsupportedModelError(QuambaError, TypeError):
    """The object handed to `capture` (or named on the command line) is not a supported Mamba model."""


class InvalidArgumentError(QuambaError, ValueError):
    """A public function or command got an argument it cannot use: an unknown block, recipe or format."""


class RecipeError(InvalidArgumentError):
    """A quantization recipe, or the dict it was read from, is malformed.

    `field` names the bad entry as a path into `Recipe.to_dict()` (`taps[2].spec.observer`),
    `problem` says what is wrong with it and what to do.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"recipe field {field}: {problem}")
        self.field = field
        self.problem = problem

    def within(self, prefix: str) -> "RecipeError":
        """The same error, its field seen from an enclosing entry (`taps[2].spec` + `.dtype`)."""
        return RecipeError(f"{prefix}.{self.field}", self.problem)


class CheckpointError(QuambaError, OSError):
    """A model directory is missing, incomplete, or its files cannot be read."""


class NonFiniteError(QuambaError, ValueError):
    """A model's weights hold NaN or infinite values, which would silently turn every output into NaN."""


class InputError(QuambaError, ValueError):
    """A captured graph was called with inputs it cannot run on (dtype, rank, empty sequence, ...)."""


class MetaDeviceError(QuambaError, RuntimeError):
    """A graph captured from a model on the meta device (shapes only) was asked to compute values."""


class TopologyError(QuambaError):
    """The graph breaks an invariant of the Mamba block dataflow (see `quamba_fx.verify_topology`)."""


class PassError(QuambaError):
    """A pass of a `Pipeline` raised, or left a graph that fails its checks.

    `pass_name` names the failing pass and `passes_before` those that ran successfully before it.
    """

    def __init__(self, message: str, pass_name: str, passes_before: list[str]):
        super().__init__(message)
        self.pass_name = pass_name
        self.passes_before = passes_before


class MissingDependencyError(QuambaError, ImportError):
    """An optional dependency (pydot, Graphviz) is needed for what was asked and is not installed."""
