"""Text generation with captured and quantized graphs through Hugging Face's own `generate`.

`QuambaForCausalLM` wraps a GraphModule from `capture`, `quantize` or `from_pretrained` as a
`transformers` model, so `generate(...)` is `transformers.GenerationMixin.generate` itself: greedy,
sampling (temperature / top-k / top-p), beam search, logits processors, stopping criteria,
streamers and eos handling behave exactly as for `MambaForCausalLM`.

A lowered graph (`quamba_fx.lower`) generates with its SSM cache: the prompt runs once through the
prefill graph, then each new token costs one decode step (`quamba_fx.runtime.Generator`, with its
CUDA-graph replay on GPUs), for greedy decoding and sampling on unpadded batches. Transformers'
own cache machinery is not involved: the wrapper carries a `Generator` from step to step in its own
model keyword (`quamba_cache`), so the protocol does not depend on the transformers release.
Everything else (float or quantized graphs that are not lowered, beam search, assisted decoding, a
padded batch) reruns the graph over the whole sequence every step: N new tokens after a prompt of
P cost N forward passes of length P..P+N.

`generate_text` is the string-in, string-out convenience: UTF-8 bytes for byte-level models (vocab
256), the model's tokenizer otherwise (see `quamba_fx.text`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from transformers import GenerationMixin, MambaConfig, PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import ModelOutput

from .arch import arch_of
from .capture import capture
from .checkpoint import from_pretrained as load_checkpoint
from .checkpoint import is_quamba_checkpoint
from .checkpoint import save_pretrained as save_checkpoint
from .errors import InputError, MetaDeviceError, UnsupportedModelError
from .graph_meta import GraphMeta, find_graph_meta
from .models import load_model
from .runtime import Generator
from .text import as_codec, attach_tokenizer, check_fits, graph_codec

BYTE_VOCAB_SIZE = 256

# Keywords `forward` tolerates and ignores: generation bookkeeping some transformers releases pass
# along (the names moved between 5.x releases), none of which changes a full-sequence forward.
_IGNORED_FORWARD_KWARGS = frozenset(
    {"use_cache", "output_attentions", "output_hidden_states", "cache_position", "position_ids", "logits_to_keep"}
)
_CACHE_KWARGS = frozenset({"cache", "cache_params", "past_key_values"})
# Generation settings that leave `_sample` (greedy / multinomial decoding), the only loop the cache
# serves: each would need the cache reordered or rolled back, which Generator does not do.
_UNCACHED_MODES = {"num_beams": 1, "assistant_model": None, "prompt_lookup_num_tokens": None, "penalty_alpha": None}


@dataclass
class QuambaCausalLMOutput(CausalLMOutput):
    """`CausalLMOutput` plus the cache a cached generation step leaves for the next one."""

    quamba_cache: Generator | None = None


def _graph_meta(graph: torch.fx.GraphModule) -> GraphMeta:
    """The capture metadata of a graph that maps token ids to logits; errors say what is wrong."""
    if not isinstance(graph, torch.fx.GraphModule):
        raise UnsupportedModelError(
            f"QuambaForCausalLM wraps a GraphModule from quamba_fx.capture/quantize/from_pretrained, "
            f"got {type(graph).__name__}"
        )
    meta = find_graph_meta(graph)
    if meta is None or meta.hf_config is None:
        raise UnsupportedModelError("this GraphModule has no quamba capture metadata; make it with quamba_fx.capture")
    head_class = arch_of(graph).head_class.__name__
    if meta.source != head_class:
        raise UnsupportedModelError(
            f"generation needs a graph with a language-model head (captured from {head_class}); "
            f"this one was captured from {meta.source} and returns hidden states"
        )
    if meta.on_meta_device:
        raise MetaDeviceError("this graph was captured on the meta device: it has no weights to generate with")
    return meta


class QuambaForCausalLM(PreTrainedModel, GenerationMixin):
    """A captured (float or W8A8) Mamba graph as a `transformers` causal LM with the real `generate`.

    `QuambaForCausalLM(gm)` shares `gm`'s modules (nothing is copied or re-initialised); the graph
    is `self.model`. `forward(input_ids, attention_mask=None)` returns a `CausalLMOutput` whose
    fp32 `logits` are the graph's. Padding is handled by running each distinct mask pattern on its
    unpadded tokens (a left-padded batch gives every row the logits of its own prompt); logits at
    padded positions are 0. `generate` on a lowered graph uses the SSM cache (module docstring).
    """

    config_class = MambaConfig
    main_input_name = "input_ids"
    # Nothing of ours for transformers to tie, split across devices, or checkpoint.
    _tied_weights_keys = None
    _no_split_modules: list[str] = []
    supports_gradient_checkpointing = False

    def __init__(self, graph: torch.fx.GraphModule, config: MambaConfig | None = None):
        meta = _graph_meta(graph)
        if config is None:
            config = arch_of(graph).config_class.from_dict(meta.hf_config)
        super().__init__(config)
        # post_init runs transformers' weight initialisation over the submodules registered so far:
        # run it before the graph is attached, so no transformers release can re-initialise our
        # weights (`_init_weights` below is a no-op as a second line of defence).
        self.post_init()
        self.model = graph
        self._prefix = meta.prefix if meta.prefix is not None else "backbone."
        self._lowered = bool(meta.lowered)
        # One Generator (cache and CUDA graph) per batch size, made on first use and kept.
        self._generators: dict[int, Generator] = {}
        # Set by `generate` for the duration of a cached generation.
        self._caching = False
        self.generation_config.use_cache = self._lowered
        self.eval()

    def _init_weights(self, module: nn.Module) -> None:
        """No-op: the weights come from the captured graph and must never be re-initialised."""

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "QuambaForCausalLM":
        """Wrap a `save_pretrained` directory of quamba-fx, or capture anything `quamba_fx.capture`
        accepts (a built-in name such as "mamba-bytes-wt2", or a Hugging Face Mamba checkpoint dir).

        Unlike `transformers.PreTrainedModel.from_pretrained`, this never contacts the Hub.
        """
        if is_quamba_checkpoint(path):
            return cls(load_checkpoint(path, device=device))
        gm = capture(load_model(str(path), device=str(device)))
        attach_tokenizer(gm, path)  # a Hugging Face directory's own tokenizer
        return cls(gm)

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:
        """Write the wrapped graph with `quamba_fx.save_pretrained` (reload with `from_pretrained`)."""
        save_checkpoint(self.model, save_directory)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_submodule(f"{self._prefix}embeddings")

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_submodule("lm_head")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        quamba_cache: Generator | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput | tuple[torch.Tensor]:
        """Logits of the whole sequence `input_ids [B, L]` (one graph run per distinct mask row).

        Inside a cached `generate` (lowered graphs), the first call runs the prompt through the
        prefill graph and returns the filled cache as `quamba_cache`; later calls get it back with
        the newest token alone and return that token's logits `[B, 1, V]`.
        """
        if self._caching:
            return self._cached_step(input_ids, quamba_cache)
        if quamba_cache is not None:
            raise InputError("quamba_cache is generate's own: call forward without it")
        for key, value in kwargs.items():
            if key in _CACHE_KWARGS and value is not None:
                raise NotImplementedError(
                    "QuambaForCausalLM has no KV/SSM cache yet: pass the full sequence without a cache"
                )
            if key not in _IGNORED_FORWARD_KWARGS | _CACHE_KWARGS:
                raise TypeError(f"QuambaForCausalLM.forward got an unexpected argument {key!r}")
        if input_ids is None:
            raise InputError("QuambaForCausalLM.forward needs input_ids (the graph takes token ids, not embeddings)")
        logits = self._logits(input_ids.to(self.device), attention_mask)
        if return_dict is False:
            return (logits,)
        return CausalLMOutput(logits=logits)

    def _cached_step(self, input_ids: torch.Tensor | None, cache: Generator | None) -> QuambaCausalLMOutput:
        if input_ids is None:
            raise InputError("QuambaForCausalLM.forward needs input_ids (the graph takes token ids, not embeddings)")
        ids = input_ids.to(self.device)
        if cache is None:
            cache = self._generators.get(ids.shape[0])
            if cache is None:
                cache = self._generators[ids.shape[0]] = Generator(self.model, ids.shape[0])
            logits = cache.prefill(ids)
        else:
            logits = cache.decode(ids[:, -1])[:, None]
        return QuambaCausalLMOutput(logits=logits, quamba_cache=cache)

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return self.model(input_ids)
        keep = _check_mask(attention_mask, input_ids).to(input_ids.device)
        if bool(keep.all()):
            return self.model(input_ids)
        # The graph has no mask input. Mamba is causal, so a row's logits at its kept positions are
        # those of the row with the padding removed: run each distinct mask pattern once on its
        # kept columns (a left-padded batch has one pattern per prompt length).
        patterns, which = torch.unique(keep, dim=0, return_inverse=True)
        logits = None
        for index, pattern in enumerate(patterns):
            rows = (which == index).nonzero().squeeze(1)
            cols = pattern.nonzero().squeeze(1)
            out = self.model(input_ids[rows][:, cols])
            if logits is None:
                logits = out.new_zeros((*input_ids.shape, out.shape[-1]))
            logits[rows[:, None], cols[None, :]] = out
        return logits

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        quamba_cache: Generator | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole sequence so far, or, once a cached generation holds a cache, the last token.

        Whatever else `generate` passes (cache hints, `next_sequence_length`, `cache_position`,
        `use_cache`, depending on the transformers release) is deliberately dropped.
        """
        if self._caching:
            ids = input_ids if quamba_cache is None else input_ids[:, -1:]
            return {"input_ids": ids.to(self.device), "quamba_cache": quamba_cache}
        inputs: dict[str, Any] = {"input_ids": input_ids.to(self.device)}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(self.device)
        return inputs

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """Transformers' bookkeeping, plus the cache handed from this step to the next."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if self._caching:
            model_kwargs["quamba_cache"] = outputs.get("quamba_cache")
        return model_kwargs

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: Any = None,
        **kwargs: Any,
    ) -> Any:
        """`transformers` generate (all its arguments), after checking the prompt. Returns what HF
        returns: by default the prompt plus the new tokens, `[B, P + N]`.

        A lowered graph decodes from its SSM cache (`use_cache`, default True for them) when the
        decoding is greedy or sampled and the batch is unpadded; otherwise, and for graphs that are
        not lowered, each step reruns the whole sequence. Transformers never builds a cache of
        its own for this model.
        """
        if kwargs.get("inputs_embeds") is not None:
            raise InputError("QuambaForCausalLM.generate takes token ids (input_ids), not inputs_embeds")
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        attention_mask = kwargs.get("attention_mask")
        _check_prompt(prompt, attention_mask, self.config.vocab_size)
        settings = generation_config if generation_config is not None else self.generation_config
        asked = kwargs.pop("use_cache", None)
        use_cache = settings.use_cache if asked is None else asked
        # Only an explicit keyword earns the warning: a GenerationConfig has use_cache=True by default.
        if asked and not self._lowered:
            warnings.warn(
                "this graph is not lowered (quamba_fx.lower), so it has no SSM cache: use_cache=True is "
                "ignored and every step reruns the whole sequence",
                stacklevel=2,
            )
        if generation_config is not None:
            generation_config = copy.deepcopy(generation_config)
            generation_config.use_cache = False
        else:
            kwargs["use_cache"] = False
        cached = bool(use_cache) and self._lowered and _cacheable(settings, kwargs, attention_mask)
        self._caching = cached
        try:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        finally:
            self._caching = False


def _cacheable(settings: Any, kwargs: dict[str, Any], attention_mask: torch.Tensor | None) -> bool:
    """Whether this generation runs transformers' greedy/sampling loop on an unpadded batch."""
    for name, plain in _UNCACHED_MODES.items():
        value = kwargs.get(name, getattr(settings, name, plain))
        if value is not None and value != plain:
            return False
    # The prefill graph has no mask input: padding would enter the state.
    return attention_mask is None or bool((attention_mask != 0).all())


def _check_prompt(prompt: Any, attention_mask: Any, vocab_size: int) -> None:
    if prompt is None:
        raise InputError("generate needs a prompt: pass input_ids of shape [batch, prompt_len]")
    if not isinstance(prompt, torch.Tensor):
        raise InputError(f"input_ids must be a tensor of token ids, got {type(prompt).__name__}")
    if prompt.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be int64 or int32 token ids, got dtype {prompt.dtype}")
    if prompt.dim() != 2:
        hint = " (add a batch dimension: input_ids[None])" if prompt.dim() == 1 else ""
        raise InputError(f"input_ids must have shape [batch, prompt_len], got {tuple(prompt.shape)}{hint}")
    if prompt.numel() == 0:
        raise InputError(f"input_ids is empty (shape {tuple(prompt.shape)}): the prompt needs at least one token")
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= vocab_size:
        raise InputError(f"token ids must lie in [0, {vocab_size}); got values in [{low}, {high}]")
    if attention_mask is not None:
        _check_mask(attention_mask, prompt)


def _check_mask(attention_mask: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The mask as booleans, after checking its shape, values, and that no row is all padding."""
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            f"they must match"
        )
    keep = attention_mask != 0
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"attention_mask rows {empty} are all padding: every row needs at least one token")
    return keep


def as_causal_lm(model: Any) -> QuambaForCausalLM:
    """A `QuambaForCausalLM` for `model`: one already, a GraphModule, a Hugging Face Mamba model
    (captured), or a string (`QuambaForCausalLM.from_pretrained`)."""
    if isinstance(model, QuambaForCausalLM):
        return model
    if isinstance(model, torch.fx.GraphModule):
        return QuambaForCausalLM(model)
    if isinstance(model, (str, Path)):
        return QuambaForCausalLM.from_pretrained(model)
    if isinstance(model, nn.Module):
        return QuambaForCausalLM(capture(model))
    raise UnsupportedModelError(
        f"expected a GraphModule, QuambaForCausalLM, Mamba model, name or directory; got {type(model).__name__}"
    )


class StopOnStrings(StoppingCriteria):
    """Stop each row once its generated text (after `prompt_len` tokens) contains one of `stops`.

    `decode` maps a list of token ids to text (bytes -> UTF-8 for byte-level models). Only the last
    `window` generated tokens are decoded each step, enough to see any stop string arrive.
    """

    def __init__(self, stops: Sequence[str], prompt_len: int, decode: Callable[[list[int]], str]):
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.decode = decode
        # A stop string of k characters spans at most 4k UTF-8 bytes (or k tokens of >= 1 character).
        self.window = 4 * max((len(s) for s in self.stops), default=1) + 4

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            tail = self.decode(ids[-self.window:])
            done[row] = any(stop in tail for stop in self.stops)
        return done


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of `stops`."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def encode_bytes(text: str) -> list[int]:
    """Byte-level tokens: the UTF-8 bytes of `text`."""
    return list(text.encode("utf-8"))


def decode_bytes(ids: Sequence[int]) -> str:
    """Text of byte-level tokens; bytes that are not valid UTF-8 become U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def generate_text(
    model: Any,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    include_prompt: bool = False,
    tokenizer: Any = None,
    **generate_kwargs: Any,
) -> str:
    """Continue `prompt` and return the new text (UTF-8, errors replaced).

    `model` is a GraphModule (float or quantized), a `QuambaForCausalLM`, or a name/directory.
    Text becomes tokens through `tokenizer` (anything `quamba_fx.text.as_codec` takes), else the
    tokenizer the graph carries (a checkpoint saved with one), else UTF-8 bytes for a byte-level
    model. Greedy by default; `do_sample=True` samples with `temperature`/`top_k`/`top_p`,
    reproducibly when `seed` is given (the global RNG state is restored afterwards). Generation
    ends after `max_new_tokens` tokens, at the model's eos token, or once any `stop` string appears
    (the text is cut before it). Other keywords go to `QuambaForCausalLM.generate`.
    """
    lm = as_causal_lm(model)
    codec = as_codec(tokenizer) if tokenizer is not None else graph_codec(lm.model, "generate_text")
    check_fits(codec, lm.config.vocab_size, "this model")
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise InputError("prompt is empty: generation needs at least one token to continue")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    ids = torch.tensor([codec.encode(prompt)], dtype=torch.long)
    if ids.shape[1] == 0:
        raise InputError(f"prompt {prompt!r} encodes to no tokens: generation needs at least one to continue")
    sampling = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if v is not None}
    if stops:
        criteria = generate_kwargs.pop("stopping_criteria", None) or []
        stop_on = StopOnStrings(stops, ids.shape[1], codec.decode)
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, stop_on])
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        out = lm.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling, **generate_kwargs
        )
    sequence = out.sequences if hasattr(out, "sequences") else out
    new = sequence[0, ids.shape[1]:].tolist()
    eos = lm.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    # generate keeps the eos token it stopped at; the text ends before it.
    for i, token in enumerate(new):
        if token in eos_ids:
            new = new[:i]
            break
    text = truncate_at_stops(codec.decode(new), stops)
    return prompt + text if include_prompt else text
