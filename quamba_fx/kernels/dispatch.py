"""Where a kernel call runs: the Triton kernel on CUDA, or on CPU under the Triton interpreter.

`INTERPRET` is read once at import, like `triton.jit` does at decoration time: it decides whether
the kernels are interpreted, so a later change of the variable would not affect them anyway. Every
kernel module asks `use_triton` and otherwise runs its PyTorch reference.

Tuned launch configs: each kernel module keeps the config it chose per problem key in a cache made
by `tuned_configs`, filled through `chosen_config` (a config chosen by rule or by timing) or
`launch_tuned` (a Triton autotuner's first launch, then the bare JIT function with its choice);
`clear_tuned_configs` empties them all.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, MutableMapping, Optional, Sequence, Tuple, TypeVar

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under the interpreter, GEMMs with at least this many output columns (wider than any property
# test's, as wide as a model's projections) take one wide tile: the interpreter's cost is per
# operation, not per element, and the slow model tests run hundreds of such GEMMs.
INTERPRETER_WIDE_N = 256

if INTERPRET:
    from . import interpreter_compat

    interpreter_compat.install()  # known interpreter faults of some Triton / NumPy pairs, see there


K = TypeVar("K")
T = TypeVar("T")

# Every cache `tuned_configs` made, by kernel name: what `clear_tuned_configs` empties. The kernel
# modules import this module, never the reverse, so the caches register themselves here.
_TUNED_CACHES: Dict[str, Dict[Any, Any]] = {}


def tuned_configs(kernel_name: str) -> Dict[Any, Any]:
    """A new cache of chosen launch configs (problem key -> config) for `kernel_name`, registered
    for `clear_tuned_configs` and `tuned_config_counts`.

    A name already registered returns that same cache instead of an error or a second cache: a
    module executed again (`importlib.reload`, IPython's autoreload) then imports cleanly and
    `clear_tuned_configs` still reaches the one cache it uses. Names must therefore be unique
    per kernel (the module's name is the convention).
    """
    return _TUNED_CACHES.setdefault(kernel_name, {})


def chosen_config(cache: MutableMapping[K, T], key: K, choose: Callable[..., T], *args: Any) -> T:
    """The config `cache` holds for `key`, or, on the key's first call, `choose(*args)` recorded
    there.

    `cache` is an argument, not a name to look up: tests swap a module's cache for a plain dict
    or a dict-like that answers `get` alone (a pinned config), and this must read whichever the
    module holds at call time. A missing config is `None`, so `choose` must not return `None`.
    Positional `args` rather than a closure keep a decode launch's lookup free of a per-call
    allocation, as in `launch_tuned`.
    """
    config = cache.get(key)
    if config is None:
        config = cache[key] = choose(*args)
    return config


def launch_tuned(cache: MutableMapping[K, T], key: K, autotune: Callable[..., Optional[T]],
                 launch: Callable[..., None], *args: Any) -> None:
    """Launch one kernel call, tuned per `key`: without a config for `key` in `cache`,
    `autotune(*args)` launches the call through the Triton autotuner and returns the config it
    chose, which is recorded (`None`: nothing to record, the next call autotunes again); with one,
    `launch(config, *args)` launches the bare JIT function with it.

    The split exists for host time: the autotuner's per-call Python (argument dictionaries, key
    building, heuristics) costs tens of microseconds that a decode step's launches cannot hide.
    Positional `args` rather than closures keep the fast path free of per-call allocations.
    """
    config = cache.get(key)
    if config is not None:
        launch(config, *args)
        return
    config = autotune(*args)
    if config is not None:
        cache[key] = config


def clear_tuned_configs() -> None:
    """Forget every chosen launch config, so that each problem's next call chooses again: for
    tests, after switching devices, or to re-tune. Triton's autotuners keep their own choice per
    autotune key, which this leaves alone: a re-autotuned key may get the same config back."""
    for cache in _TUNED_CACHES.values():
        cache.clear()


def tuned_config_counts() -> Dict[str, int]:
    """How many configs each registered cache holds, by kernel name (a snapshot)."""
    return {name: len(cache) for name, cache in _TUNED_CACHES.items()}


def _no_timing(kernel_call: Any, quantiles: Sequence[float]) -> List[float]:
    # Under the interpreter the kernels' early_config_prune leaves one config per shape, so there
    # is nothing to time. Triton 3.8's autotuner then skips timing; Triton 3.6's still "times"
    # the one config through the GPU driver, which a CPU machine lacks ("0 active drivers").
    return [0.0 for _ in quantiles]


# `do_bench=` for every triton.autotune here: None (Triton's own timing) unless interpreted.
AUTOTUNE_DO_BENCH = _no_timing if INTERPRET else None


def cdiv(a: int, b: int) -> int:
    """`ceil(a / b)` for positive b. Plain Python on purpose, as `next_pow2`: triton.cdiv and
    next_power_of_2 are ConstexprFunction objects in recent Triton, whose call costs microseconds
    on every launch."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


_SM_COUNTS: Dict[torch.device, int] = {}


def sm_count(device: Any = None) -> int:
    """Streaming multiprocessors of the CUDA `device` (default: the current one). Without one
    (CPU, the interpreter) the H100 / H200's 132, so that tuning rules can be checked anywhere."""
    dev = torch.device("cuda") if device is None else torch.device(device)
    count = _SM_COUNTS.get(dev)  # first: decode launches ask per call, and the checks below cost microseconds
    if count is not None:
        return count
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 132
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    count = _SM_COUNTS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return count


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on `t` runs the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


# Autotuners compile their candidate configs one after another, ~1-3 s each for a Hopper kernel;
# a model's first call meets dozens of new (kernel, shape) keys. Compiling the candidates on a
# thread pool first overlaps their ptxas runs and the parts of MLIR that drop the GIL.
PARALLEL_COMPILE = os.environ.get("QUAMBA_FX_PARALLEL_COMPILE", "1") != "0"
_pool: Optional[ThreadPoolExecutor] = None


def fp_fusion(enabled: bool = True) -> Dict[str, bool]:
    """`enable_fp_fusion` for a kernel launch, always spelled out. Triton up to 3.9 contracts
    `a * b + c` into an FMA unless told otherwise; 3.9 warns on every process whose launches leave
    it unset, and 3.10 turns the default off, which would make our kernels slower (the scan's state
    update, the conv taps and norms are FMA chains) and change their roundings. `enabled=False`
    where a contract needs two roundings (the GEMM epilogues' `a * s + bias`)."""
    return {"enable_fp_fusion": enabled}


def precompile(jit_fn: Any, args: Sequence[Any], variants: Iterable[Dict[str, Any]]) -> None:
    """Compile `jit_fn` for every keyword set in `variants` (config meta-parameters and flags,
    exactly as the autotuner will pass them), in parallel, without launching anything.

    Best effort: needs Triton's `AsyncCompileMode` (Triton >= 3.4); where it is missing, disabled
    (`QUAMBA_FX_PARALLEL_COMPILE=0`), interpreted, or a compile fails, the autotuner compiles
    whatever is not cached yet itself, as it would without this call.
    """
    precompile_calls(jit_fn, [(args, kwargs) for kwargs in variants])


def precompile_calls(jit_fn: Any, calls: Sequence[Tuple[Sequence[Any], Dict[str, Any]]]) -> None:
    """`precompile` where each variant has its own positional arguments too (`(args, kwargs)`
    pairs): e.g. TMA descriptors, whose block shape is part of the compiled signature."""
    if INTERPRET or not PARALLEL_COMPILE or len(calls) < 2:
        return
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1),
                                   thread_name_prefix="quamba-fx-compile")
    try:
        with AsyncCompileMode(_pool):
            for args, kwargs in calls:
                jit_fn.warmup(*args, grid=(1,), **kwargs)
    except Exception as exc:  # noqa: BLE001 - the sequential compile below reports real errors
        warnings.warn(f"quamba_fx: parallel precompile of {getattr(jit_fn, '__name__', jit_fn)} failed "
                      f"({type(exc).__name__}: {exc}); the autotuner compiles its configs one by one",
                      RuntimeWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------
# Graph ops and their direct calls
# ---------------------------------------------------------------------------------------------

# The function behind each op `graph_op` made, by op name ("quamba::w8a8_linear").
_OP_FUNCTIONS: Dict[str, Callable[..., Any]] = {}


def graph_op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable[..., Any]], Any]:
    """`torch.library.custom_op(name, mutates_args=...)` for a kernel op that runs the same
    function on every device, keeping that function for `op_function`.

    Each kernel module defines its ops at its end with this, so that a graph holds a kernel call
    as one traceable node. The function runs the Triton kernel on CUDA (and on CPU under
    TRITON_INTERPRET=1), else the module's PyTorch reference, so a lowered graph also runs,
    slowly, on a plain CPU. Every op's fake must promise the exact layout the real op returns:
    compilers trust the fake's strides. The `*_cached` ops carry a decode cache: `decode=False`
    runs a whole prompt and writes the final state into the cache tensor; `decode=True` runs one
    token from the cached state and advances it.

    A graph calls the op through the dispatcher, which is what tracing, torch.compile and the
    dumps need; a runtime graph that only ever runs (runtime.Generator's) may call the function
    itself instead, sparing the custom-op machinery's host time on every launch.
    """

    def register(fn: Callable[..., Any]) -> Any:
        # The function takes the op's own name ("w8a8_linear"), whatever its module calls the op
        # (`w8a8_linear_op`, beside the kernel's entry points): a runtime graph's node that calls it
        # is then still named, dumped and classified (`graph_info.op_name`) as that op.
        fn.__name__ = fn.__qualname__ = name.split("::", 1)[1]
        _OP_FUNCTIONS[name] = fn
        return torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)

    return register


def as_scalar(scale: torch.Tensor) -> torch.Tensor:
    """An op's scale argument (any one-element tensor) as the 0-d fp32 tensor the kernels take."""
    return scale.float().reshape(())


def op_function(target: Any) -> Optional[Callable[..., Any]]:
    """The function a `graph_op` op runs, for its OpOverload `target`; None for any other target."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return _OP_FUNCTIONS.get(target.name())
