"""Cached generation with a lowered W8A8 graph: prefill once, then one token per step.

`Generator(lowered, batch_size)` derives two graphs from a `quamba_fx.lower` result (see
`passes.lower.cached_graph`): the prefill graph runs the prompt and leaves each block's last conv
inputs and final scan state in a `MambaCache`; the decode graph advances them by one token. On CUDA
the decode step is captured once as a CUDA graph and replayed, so batch-1 decode costs the kernels'
time, not one Python launch per kernel; greedy decoding (`Generator.greedy`, `generate`) captures
`steps_per_graph` steps, their argmax and the feeding of each token to the next step in one graph,
so that nothing runs on the host between them. Both graphs call the kernel ops' functions directly
(`direct_calls`), not through the dispatcher: plain calls spend less host time a launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from .arch import arch_of
from .errors import InputError
from .graph_info import fetch_attr
from .graph_meta import find_graph_meta
from .kernels.dispatch import op_function
from .passes.kernel_lowering import cached_graph, conv_state_dtype, ssm_state_dtype
from .recipe import block_paths

# Greedy decode steps a CUDA graph of `Generator.greedy` holds, unless the Generator is given its
# own. Between two replays the host launches the next, and the GPU idles for the gap; more steps
# a graph spread that gap over them, at the cost of one capture (and its memory) per Generator.
STEPS_PER_GRAPH = 1


@dataclass
class MambaCache:
    """Per-block decode state: `conv_states[i]` int8 `[B, D, W-1]`, `ssm_states[i]` `[B, D, N]`.

    The scan state's dtype is the one `quamba_fx.lower` chose (`state_dtype`: float16 for the
    default float16 lowering, as mamba_ssm keeps it; float32 for a float32 lowering and for graphs
    lowered before the choice was recorded). The scan computes in fp32 and rounds the state to
    nearest even when it stores it.
    """

    conv_states: list[torch.Tensor]
    ssm_states: list[torch.Tensor]

    @classmethod
    def allocate(cls, gm: torch.fx.GraphModule, batch_size: int, device: torch.device | str | None = None) -> "MambaCache":
        """Zeroed states shaped for the blocks of `gm`, on `device` (default: the graph's), the scan
        state in the dtype `gm` was lowered with, the conv state in its conv's input dtype."""
        if device is None:
            device = next(iter(gm.buffers())).device
        arch = arch_of(gm)
        state_dtype, conv_dtype = ssm_state_dtype(gm), conv_state_dtype(gm)
        conv, ssm = [], []
        for path in block_paths(gm):
            conv_shape, ssm_shape = arch.cache_shapes(gm, path, batch_size)
            conv.append(torch.zeros(conv_shape, dtype=conv_dtype, device=device))
            ssm.append(torch.zeros(ssm_shape, dtype=state_dtype, device=device))
        return cls(conv, ssm)

    def zero_(self) -> "MambaCache":
        for state in (*self.conv_states, *self.ssm_states):
            state.zero_()
        return self

    def copy_(self, other: "MambaCache") -> "MambaCache":
        for mine, theirs in zip((*self.conv_states, *self.ssm_states), (*other.conv_states, *other.ssm_states)):
            mine.copy_(theirs)
        return self

    def clone(self) -> "MambaCache":
        return MambaCache([s.clone() for s in self.conv_states], [s.clone() for s in self.ssm_states])

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in (*self.conv_states, *self.ssm_states))


def direct_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with every kernel op node (`kernels.dispatch.graph_op`) calling the op's function
    itself rather than `torch.ops.quamba.*`, and every weight or scale it reads held by `gm`
    itself (`_flatten_constants`), recompiled in place; returns `gm`.

    Same computation, minus the dispatcher and custom-op wrapper on every launch: on the H200's
    host that was 42.2 -> 19.2 ms for a plain mamba-130m decode step, and 77.9 -> 62.4 ms for a
    plain mamba-2.8b 1 x 128 prefill of the lowered graph retargeted the same way, which is what
    the prefill graph runs (docs/benchmarks.md, run 9). Only for graphs that just run: the result
    can no longer be traced, compiled or dumped as kernel ops, and it keeps the tensors it held
    when called, so it does not follow a later `.to()` of the modules it came from.
    """
    for node in gm.graph.nodes:
        function = op_function(node.target) if node.op == "call_function" else None
        if function is not None:
            node.target = function
    _flatten_constants(gm)
    gm.recompile()
    return gm


def _flatten_constants(gm: torch.fx.GraphModule) -> None:
    """Point each `get_attr` node at a plain attribute of `gm` holding the same tensor.

    FX reads `backbone.layers.0.mixer.in_proj.weight` as five `nn.Module.__getattr__` calls, each a
    Python-level miss of the instance dict: 507 reads, 2915 calls, in a mamba-130m decode step.
    Found in the instance dict instead, the step's host time fell by a fifth on the CPU machine
    with the kernels' launches stubbed out (`benchmarks/host_cpu.py --compare-flatten`). Modules
    and attributes of `gm` stay as they were (its state dict, `named_modules`); only the graph's
    reads move."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        flat = "_const_" + node.target.replace(".", "_")
        if flat not in gm.__dict__:
            value = fetch_attr(gm, node.target)
            if value is None:
                continue  # a read of nothing stays as it was, to fail where FX always made it fail
            # Not setattr: nn.Module's would register a Parameter a second time under the new name.
            gm.__dict__[flat] = value
        node.target = flat


class Generator:
    """Prefill + cached decode of a lowered graph for a fixed batch size.

    `prefill(input_ids [B, L])` returns logits `[B, L, V]` and fills the cache; `decode(tokens [B])`
    returns the next logits `[B, V]`; `greedy(tokens [B], n)` runs n greedy steps and returns the
    tokens they pick; `generate(input_ids, n)` is prefill then greedy decoding. `cuda_graph`
    (default: on for CUDA models) replays the decode step from a CUDA graph captured on first use,
    and `greedy` replays `steps_per_graph` steps (default `STEPS_PER_GRAPH`) from one graph.
    """

    def __init__(self, lowered: torch.fx.GraphModule, batch_size: int, cuda_graph: bool | None = None,
                 steps_per_graph: int | None = None):
        meta = find_graph_meta(lowered)
        if meta is None or not meta.lowered:
            raise InputError("Generator needs a lowered graph: quamba_fx.lower(quamba_fx.quantize(...))")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        steps_per_graph = STEPS_PER_GRAPH if steps_per_graph is None else steps_per_graph
        if not isinstance(steps_per_graph, int) or steps_per_graph < 1:
            raise InputError(f"steps_per_graph must be an integer >= 1, got {steps_per_graph!r}")
        self.batch_size = batch_size
        self.steps_per_graph = steps_per_graph
        self.prefill_graph = direct_calls(cached_graph(lowered, decode=False))
        self.decode_graph = direct_calls(cached_graph(lowered, decode=True))
        self.device = next(iter(lowered.buffers())).device
        self.cache = MambaCache.allocate(lowered, batch_size, self.device)
        self.use_cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_cuda_graph and self.device.type != "cuda":
            raise InputError("cuda_graph=True needs the model on a CUDA device")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_ids: torch.Tensor | None = None
        self._static_logits: torch.Tensor | None = None
        self._greedy_graph: torch.cuda.CUDAGraph | None = None
        self._greedy_ids: torch.Tensor | None = None
        self._greedy_tokens: torch.Tensor | None = None

    def _check_ids(self, input_ids: torch.Tensor, length: int | None = None) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise InputError(f"expected token ids of shape [{self.batch_size}, L], got {tuple(input_ids.shape)}")
        if length is not None and input_ids.shape[1] != length:
            raise InputError(f"expected {length} token(s) per row, got {input_ids.shape[1]}")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt from an empty cache; returns logits `[B, L, V]` and fills the cache."""
        self._check_ids(input_ids)
        self.cache.zero_()
        return self.prefill_graph(input_ids.to(self.device), self.cache.conv_states, self.cache.ssm_states)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step: `tokens [B]` (the last tokens) -> logits `[B, V]`; advances the cache."""
        ids = tokens.reshape(self.batch_size, 1).to(self.device)
        if not self.use_cuda_graph:
            return self.decode_graph(ids, self.cache.conv_states, self.cache.ssm_states)[:, -1]
        if self._graph is None:
            self._capture(ids)
        self._static_ids.copy_(ids)
        self._graph.replay()
        # A copy: the graph's output buffer is overwritten by the next replay.
        return self._static_logits[:, -1].clone()

    def _capture(self, ids: torch.Tensor) -> None:
        self._static_ids = ids.clone()
        self._graph, self._static_logits = self._captured(
            lambda: self.decode_graph(self._static_ids, self.cache.conv_states, self.cache.ssm_states))

    def _captured(self, step):
        """`(graph, out)`: a CUDA graph of `step()` and the output the capture returned (the buffer
        each replay writes), after two warm-up runs on a side stream for Triton's autotuning and
        compilation. The warm-up changes the cache, so it is restored; capture records without
        running, so the cache is left as it was."""
        saved = self.cache.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, out

    def _greedy_steps(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """`out.shape[1]` greedy steps from the tokens in `ids [B, 1]`: step i's argmax goes to
        `out[:, i]` and into `ids` for the next step. What a greedy CUDA graph holds."""
        for i in range(out.shape[1]):
            logits = self.decode_graph(ids, self.cache.conv_states, self.cache.ssm_states)
            picked = logits[:, -1].argmax(dim=-1)
            out[:, i].copy_(picked)
            ids.copy_(picked[:, None])

    @torch.no_grad()
    def greedy(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """`steps` greedy decode steps from the last tokens `tokens [B]`: returns the tokens they
        pick, `[B, steps]` int64, and advances the cache by `steps`.

        With CUDA graphs, whole groups of `steps_per_graph` steps replay from one graph (captured on
        first use), each step's token fed to the next on the GPU; the steps left over replay the
        one-step graph of `decode`. The tokens are those of `decode` then argmax, step by step."""
        if not isinstance(steps, int) or steps < 0:
            raise InputError(f"steps must be an integer >= 0, got {steps!r}")
        if tokens.numel() != self.batch_size:
            raise InputError(f"expected {self.batch_size} token(s), one a sequence, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InputError(f"tokens must be integer ids, got {tokens.dtype}")
        ids = tokens.reshape(self.batch_size, 1).to(self.device, torch.long)
        if not self.use_cuda_graph:
            out = torch.empty((self.batch_size, steps), dtype=torch.long, device=self.device)
            self._greedy_steps(ids.clone(), out)
            return out
        chunks = []
        per_graph = self.steps_per_graph
        for _ in range(steps // per_graph if per_graph > 1 else 0):
            if self._greedy_graph is None:
                self._greedy_ids = ids.clone()
                self._greedy_tokens = torch.empty((self.batch_size, per_graph), dtype=torch.long, device=self.device)
                self._greedy_graph, _ = self._captured(
                    lambda: self._greedy_steps(self._greedy_ids, self._greedy_tokens))
            self._greedy_ids.copy_(ids)
            self._greedy_graph.replay()
            chunks.append(self._greedy_tokens.clone())  # overwritten by the next replay
            ids = chunks[-1][:, -1:]
        for _ in range(steps - per_graph * len(chunks)):
            picked = self.decode(ids).argmax(dim=-1)
            chunks.append(picked[:, None])
            ids = picked
        return torch.cat(chunks, dim=1) if chunks else torch.empty((self.batch_size, 0), dtype=torch.long,
                                                                    device=self.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: returns `[B, L + max_new_tokens]` token ids (prompt included)."""
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        input_ids = input_ids.to(self.device)
        last_logits = self.prefill(input_ids)[:, -1]
        if max_new_tokens == 0:
            return input_ids.clone()
        first = last_logits.argmax(dim=-1)
        rest = self.greedy(first, max_new_tokens - 1)
        return torch.cat([input_ids, first[:, None].to(input_ids.dtype), rest.to(input_ids.dtype)], dim=1)
