"""Run lm-evaluation-harness tasks on captured or quantized graphs: `QuambaLM`.

`QuambaLM` implements the harness's LM interface (`loglikelihood`, `loglikelihood_rolling`,
`generate_until`). When `lm_eval` is importable it subclasses `lm_eval.api.model.LM` and is
registered as model "quamba" (`--model quamba --model_args checkpoint=DIR`); without it the class
still works on any request objects with an `.args` tuple, so it can be used and tested alone.

Tokens come from `tokenizer=` (an object with `encode(str) -> list[int]` and
`decode(list[int]) -> str`, or the path of a local Hugging Face tokenizer), else from the tokenizer
the model carries (its directory's `tokenizer.json`, or the one saved in a quamba-fx checkpoint),
else UTF-8 bytes for a byte-level model (vocab 256). Semantics follow the harness's own HF model
(`HFLM`):

- the context's trailing whitespace moves to the front of the continuation before encoding;
- an empty context is replaced by `prefix_token_id` (for byte models a newline: the byte models
  were trained on raw text, where documents start after a line break);
- inputs longer than `max_length` keep their last `max_length` tokens;
- rolling loglikelihood scores every token exactly once, in windows of `max_length` tokens, each
  as long as possible (`lm_eval.utils.get_rolling_token_windows` with `context_len=1`).

Scoring batches are right-padded: Mamba is causal, so padding after a sequence cannot change its
logits, and one graph run serves the whole batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from .errors import InputError
from .generation import QuambaForCausalLM, StopOnStrings, as_causal_lm, truncate_at_stops
from .graph_meta import GraphMeta, find_graph_meta
from .text import ByteCodec, graph_codec, load_tokenizer, tokenizer_dir

try:  # lm_eval is optional: the adapter is a plain class without it.
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import register_model as _register_model
except ImportError:
    _HarnessLM = None
    _register_model = None

LM_EVAL_AVAILABLE = _HarnessLM is not None
NEWLINE_BYTE = ord("\n")


class _NoCacheHook:
    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        """The harness's response cache, absent outside lm_eval."""


class _StandaloneLM:
    """The few members of `lm_eval.api.model.LM` the adapter relies on, for use without lm_eval."""

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self._device = None
        self.cache_hook = _NoCacheHook()

    @property
    def device(self) -> Any:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size


_Base: type = _HarnessLM if LM_EVAL_AVAILABLE else _StandaloneLM


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `tokens` exactly once.

    The first window predicts the first `max_length` tokens from `prefix_token` onwards; each later
    window predicts the next (up to) `max_length` tokens from the `max_length` tokens before them,
    so the last window keeps a full context. The contexts are disjoint from the continuations
    (`make_disjoint_window` in lm_eval), and `context + continuation` never exceeds
    `max_length + 1` tokens.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    tokens = list(tokens)
    full = [prefix_token, *tokens]  # full[j] is predicted from full[:j]
    pairs = []
    start = 1
    while start < len(full):
        end = min(start + max_length, len(full))  # targets full[start:end]
        first = max(0, end - 1 - max_length)  # input full[first:end-1] holds <= max_length tokens
        pairs.append((full[first:start], full[start:end]))
        start = end
    return pairs


class QuambaLM(_Base):
    """lm-evaluation-harness model for quamba-fx graphs (float or W8A8).

    Give exactly one of `model` (a GraphModule, `QuambaForCausalLM`, Mamba model, built-in name or
    directory) and `checkpoint` (a `save_pretrained` directory or built-in name: the form
    `--model_args checkpoint=DIR` uses). `batch_size` requests are scored per graph run ("auto"
    means 8 here: there is no memory probe on CPU). `max_gen_toks` caps `generate_until` when a
    request gives no `max_gen_toks` of its own.
    """

    def __init__(
        self,
        model: Any = None,
        checkpoint: str | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if (model is None) == (checkpoint is None):
            raise ValueError("QuambaLM needs exactly one of model=... or checkpoint=...")
        self.lm: QuambaForCausalLM = as_causal_lm(model if model is not None else str(checkpoint))
        device = _usable_device(device)
        if device is not None:
            self.lm.to(device)
        self._device = self.lm.device
        self.batch_size = _parse_batch_size(batch_size, max_batch_size)
        if int(max_length) < 1 or int(max_gen_toks) < 1:
            raise ValueError(f"max_length and max_gen_toks must be positive, got {max_length} and {max_gen_toks}")
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = bool(progress)
        self._encode, self._decode, self._tokenizer_name = _codec(tokenizer, self.lm)
        if prefix_token_id is None:
            prefix_token_id = self._default_prefix(tokenizer)
        self.prefix_token_id = int(prefix_token_id)
        eos = self.lm.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _default_prefix(self, tokenizer: Any) -> int:
        if self._tokenizer_name == ByteCodec.name:
            return NEWLINE_BYTE
        for source in (tokenizer, self.lm.config):
            for name in ("bos_token_id", "eos_token_id"):
                value = getattr(source, name, None)
                if isinstance(value, int):
                    return value
        raise ValueError("no bos/eos token id found on the tokenizer or config: pass prefix_token_id=")

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenization, used by the harness to key its request caches."""
        return self._tokenizer_name

    def get_model_info(self) -> dict[str, Any]:
        """What the harness records about the model in its results."""
        meta = find_graph_meta(self.lm.model) or GraphMeta()
        return {
            "quamba_recipe": meta.recipe,
            "quamba_source": meta.source,
            "tokenizer": self._tokenizer_name,
        }

    def tok_encode(self, text: str) -> list[int]:
        return self._encode(text)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._decode(list(tokens))

    # ----------------------------------------------------------------------------------- loglikelihood

    def loglikelihood(self, requests: Iterable[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding yields the continuation) per request."""
        requests = list(requests)
        pairs = [self._encode_pair(*_args(req, 2, "loglikelihood")) for req in requests]
        results = self._score(pairs, disable_tqdm, "loglikelihood")
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: Iterable[Any], disable_tqdm: bool = False) -> list[float]:
        """log P(text) per request, conditioned on `prefix_token_id`, every token scored once."""
        requests = list(requests)
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for index, req in enumerate(requests):
            (text,) = _args(req, 1, "loglikelihood_rolling")
            for pair in rolling_windows(self._encode(text), self.prefix_token_id, self.max_length):
                windows.append(pair)
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows, disable_tqdm, "loglikelihood_rolling")):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise InputError("loglikelihood requests are (context: str, continuation: str)")
        # As in the harness: trailing spaces belong to the continuation (tokenizers glue them there).
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        context_ids = self._encode(context)
        whole = self._encode(context + continuation)
        return context_ids, whole[len(context_ids):]

    @torch.inference_mode()
    def _score(
        self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool, desc: str
    ) -> list[tuple[float, bool]]:
        """Score each (context, continuation) pair; longest first, so batches pad little."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        jobs = []
        for index, (context, continuation) in enumerate(pairs):
            if not continuation:
                continue  # nothing to score: log 1 = 0, trivially greedy
            if len(continuation) > self.max_length:
                raise InputError(
                    f"a continuation of {len(continuation)} tokens is longer than max_length={self.max_length}"
                )
            # The model sees the last max_length tokens and predicts each continuation token.
            inputs = (context + continuation)[-(self.max_length + 1):][:-1]
            jobs.append((index, inputs, continuation))
        jobs.sort(key=lambda job: -len(job[1]))
        hide = disable_tqdm or not self.progress or self.rank != 0
        for start in tqdm(range(0, len(jobs), self.batch_size), desc=desc, disable=hide):
            batch = jobs[start:start + self.batch_size]
            width = len(batch[0][1])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, inputs, _) in enumerate(batch):
                ids[row, :len(inputs)] = torch.tensor(inputs)  # right padding: causal, so harmless
            logprobs = F.log_softmax(self.lm.model(ids.to(self.device)).float(), dim=-1).cpu()
            for row, (index, inputs, continuation) in enumerate(batch):
                n = len(continuation)
                scores = logprobs[row, len(inputs) - n:len(inputs)]
                target = torch.tensor(continuation)
                logprob = scores.gather(1, target[:, None]).sum().item()
                greedy = bool((scores.argmax(dim=-1) == target).all())
                results[index] = (logprob, greedy)
        return results

    # ---------------------------------------------------------------------------------- generate_until

    def generate_until(self, requests: Iterable[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings (cut off), eos or `max_gen_toks`."""
        requests = list(requests)
        hide = disable_tqdm or not self.progress or self.rank != 0
        outputs = []
        for req in tqdm(requests, desc="generate_until", disable=hide):
            context, gen_kwargs = _args(req, 2, "generate_until")
            text = self._generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs

    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        _harness_sampling_defaults(gen_kwargs)
        ids = self._encode(context) if context else [self.prefix_token_id]
        ids = ids[-max(1, self.max_length - max_new):]
        prompt = torch.tensor([ids], dtype=torch.long)
        criteria = StoppingCriteriaList([StopOnStrings(until, len(ids), self._decode)])
        out = self.lm.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new, stopping_criteria=criteria,
            **gen_kwargs,
        )
        new = out[0, len(ids):].tolist()
        for i, token in enumerate(new):
            if token in self._eos_ids:
                new = new[:i]
                break
        return truncate_at_stops(self._decode(new), until)


def _harness_sampling_defaults(gen_kwargs: dict[str, Any]) -> None:
    """Harness tasks send `temperature=0` for greedy; HF generate rejects that with sampling on."""
    if gen_kwargs.get("temperature") == 0.0 and "do_sample" not in gen_kwargs:
        gen_kwargs["do_sample"] = False
    if not gen_kwargs.get("do_sample", False):
        for key in ("temperature", "top_p", "top_k"):
            gen_kwargs.pop(key, None)


def _usable_device(device: str | None) -> str | None:
    """`device`, unless it names CUDA on a machine without it: the harness asks for "cuda" by
    default, and the W8A8 reference graph runs on CPU, so fall back there with a warning."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device={device!r} requested but CUDA is not available: running on CPU", stacklevel=3)
        return None
    return device


def _args(req: Any, count: int, kind: str) -> tuple:
    args = getattr(req, "args", None)
    if not isinstance(args, tuple) or len(args) != count:
        raise InputError(f"a {kind} request needs .args, a tuple of {count}; got {args!r}")
    return args


def _parse_batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        size = 8
    else:
        size = int(batch_size)
    if max_batch_size is not None:
        size = min(size, int(max_batch_size))
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    return size


def _codec(tokenizer: Any, lm: QuambaForCausalLM) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str], str]:
    """encode, decode and a name: the given tokenizer (an object or a local path), else the one the
    graph carries (see `quamba_fx.text`), else UTF-8 bytes for a byte-level model."""
    if tokenizer is None:  # the graph's own tokenizer (from its directory or checkpoint), else bytes
        codec = graph_codec(lm.model, "QuambaLM")
        return codec.encode, codec.decode, codec.name
    if isinstance(tokenizer, str) and tokenizer_dir(tokenizer) is not None:
        codec = load_tokenizer(tokenizer, lm.config.vocab_size)
        return codec.encode, codec.decode, codec.name
    if isinstance(tokenizer, str):  # formats without a tokenizer.json: transformers converts them
        from transformers import AutoTokenizer

        name = tokenizer
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    else:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if not callable(getattr(tokenizer, "encode", None)) or not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer must have encode(str) and decode(list[int]); got {type(tokenizer).__name__}")

    def encode(text: str) -> list[int]:
        try:  # Hugging Face tokenizers: no BOS/EOS inside the texts we score
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))

    return encode, lambda ids: tokenizer.decode(ids), str(name)


if LM_EVAL_AVAILABLE:
    try:
        QuambaLM = _register_model("quamba")(QuambaLM)
    except (ValueError, AssertionError):  # newer / older lm_eval registries
        # Already registered: this module was imported twice (e.g. run with `python -m`); the
        # first registration stands.
        pass


def main() -> None:
    """`python -m quamba_fx.lm_eval_adapter ...`: the lm_eval command line with "quamba" registered.

    lm_eval finds models only in its own registry, and has no plugin entry points; importing this
    module registers "quamba", then the harness's CLI runs with the same arguments.
    """
    if not LM_EVAL_AVAILABLE:
        raise SystemExit("lm_eval is not installed: pip install 'quamba-fx[eval]' (or pip install lm_eval)")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
