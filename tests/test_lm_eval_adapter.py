"""QuambaLM: the lm-evaluation-harness interface on captured and quantized graphs.

Everything but the last tests runs without lm_eval: requests are any objects with `.args`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quamba_fx
from quamba_fx import textdata
from quamba_fx.errors import InputError, UnsupportedModelError
from quamba_fx.generation import generate_text
from quamba_fx.lm_eval_adapter import LM_EVAL_AVAILABLE, QuambaLM, rolling_windows

from .conftest import make_model, tiny_config


class Request:
    """A duck-typed harness request: only `.args` is read."""

    def __init__(self, *args):
        self.args = args


# Sentences in the style of WikiText-2 (whose validation split trained the byte model); the first
# choice is the right one, the others are implausible continuations.
TOY_MULTIPLE_CHOICE = [
    ("The film was released in the United", [" States", " Bananas", " Xqzvbnw"]),
    ("He was born in London , England , on 4", [" July", " purple", " qqqq"]),
    ("The song reached number one on the Billboard Hot", [" 100", " dog", " zzz"]),
    ("The game received positive reviews from", [" critics", " rocks", " xkcdq"]),
    ("During the Second World", [" War", " Cup", " Jqx"]),
    ("The city is the capital of the", [" state", " thirteen", " eat"]),
    ("She studied at the University of", [" Cambridge", " jumped", " Zxq"]),
    ("The population was 2 @,@ 000 at the 2010", [" census", " banana", " qwrty"]),
]


@pytest.fixture(scope="module")
def byte_graph():
    return quamba_fx.capture("mamba-bytes-wt2")


@pytest.fixture(scope="module")
def byte_lm(byte_graph):
    # batch_size 3 so batches mix lengths: right padding must not change any score.
    return QuambaLM(model=byte_graph, batch_size=3, progress=False)


def direct_loglikelihood(gm, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) from one unpadded graph run."""
    ids = torch.tensor([context + continuation])
    logprobs = F.log_softmax(gm(ids)[0].float(), dim=-1)
    positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
    target = torch.tensor(continuation)
    return logprobs[positions, target].sum().item(), bool((logprobs[positions].argmax(-1) == target).all())


@pytest.mark.slow
def test_toy_multiple_choice_prefers_the_right_continuation(byte_lm):
    requests = [Request(context, choice) for context, choices in TOY_MULTIPLE_CHOICE for choice in choices]
    results = byte_lm.loglikelihood(requests)
    for q, (context, choices) in enumerate(TOY_MULTIPLE_CHOICE):
        scores = [results[q * len(choices) + c][0] for c in range(len(choices))]
        assert max(range(len(choices)), key=scores.__getitem__) == 0, (context, scores)


def test_loglikelihood_equals_a_direct_computation(byte_lm, byte_graph):
    pairs = [(context, choices[0]) for context, choices in TOY_MULTIPLE_CHOICE[:5]]
    results = byte_lm.loglikelihood([Request(*pair) for pair in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        expected, expected_greedy = direct_loglikelihood(
            byte_graph, list(context.encode()), list(continuation.encode())
        )
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(byte_lm, byte_graph):
    context = "The film was released in"
    greedy = generate_text(byte_graph, context, 12)
    other = greedy[:-1] + ("x" if greedy[-1] != "x" else "y")
    (_, is_greedy), (_, is_other_greedy) = byte_lm.loglikelihood([Request(context, greedy), Request(context, other)])
    assert is_greedy and not is_other_greedy


def test_empty_context_trailing_space_and_empty_continuation(byte_lm, byte_graph):
    (empty_ctx, _), (spaced, _), (moved, _), (nothing, nothing_greedy) = byte_lm.loglikelihood(
        [Request("", "The"), Request("In the ", "war"), Request("In the", " war"), Request("In the", "")]
    )
    assert empty_ctx == pytest.approx(direct_loglikelihood(byte_graph, [10], list(b"The"))[0], abs=1e-4)
    assert spaced == pytest.approx(moved, abs=1e-5)  # the context's trailing space is scored as continuation
    assert (nothing, nothing_greedy) == (0.0, True)


def test_rolling_loglikelihood_is_the_sum_over_the_text(byte_lm, byte_graph):
    text = "The game was released in Japan in 2011 . It was praised by critics ."
    (total,) = byte_lm.loglikelihood_rolling([Request(text)])
    ids = [10, *text.encode()]
    logprobs = F.log_softmax(byte_graph(torch.tensor([ids]))[0].float(), dim=-1)
    expected = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    assert total == pytest.approx(expected, abs=1e-3)

    # Short windows: every byte is still scored exactly once, each window from its own context.
    small = QuambaLM(model=byte_graph, max_length=16, progress=False)
    (windowed,) = small.loglikelihood_rolling([Request(text)])
    manual = sum(
        direct_loglikelihood(byte_graph, context, continuation)[0]
        for context, continuation in rolling_windows(list(text.encode()), 10, 16)
    )
    assert windowed == pytest.approx(manual, abs=1e-3)
    assert byte_lm.loglikelihood_rolling([Request("")]) == [0.0]


def test_rolling_windows_follow_the_harness_example():
    # The example in lm_eval's LM.loglikelihood_rolling docstring (max context 4, prefix "BOS").
    windows = rolling_windows(list(range(10)), -1, 4)
    assert windows == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    for length in range(1, 30):
        pairs = rolling_windows(list(range(length)), -1, 5)
        assert [t for _, continuation in pairs for t in continuation] == list(range(length))
        assert all(len(c) + len(k) <= 6 for c, k in pairs)


@pytest.mark.slow
def test_generate_until_stops_at_the_until_strings(byte_lm, byte_graph):
    context = "The film was released in"
    free = generate_text(byte_graph, context, 24)
    stop = free.strip().split(" ")[1]  # the second word it generates
    outputs = byte_lm.generate_until(
        [
            Request(context, {"until": [stop, "never-seen"], "max_gen_toks": 24}),
            Request(context, {"until": stop, "max_gen_toks": 24, "do_sample": False, "temperature": 0.0}),
            Request(context, {"until": [], "max_gen_toks": 7}),
        ]
    )
    assert outputs[0] == outputs[1] == free[: free.index(stop)]
    assert stop not in outputs[0]
    assert outputs[2] == free[:7]


def test_generate_until_on_a_lowered_graph_decodes_from_the_ssm_cache(byte_graph, monkeypatch):
    """Issue 14: generate_until reaches HF generate on the wrapper, which on a lowered graph runs
    the prompt once and then one token per step from the SSM cache (the full graph is never
    called), with the tokens the cache-free path gives."""
    from quamba_fx.kernels import conv1d, gemm, hadamard, norm, scan

    # The ops' PyTorch references: this is about the cache protocol, not the kernels (tested alone).
    for module in (conv1d, gemm, hadamard, norm, scan):
        monkeypatch.setattr(module, "_use_triton", lambda t: t.is_cuda)
    calib = textdata.chunk_sequences(torch.tensor(list(("The game was released . " * 40).encode())), 64, 4)
    lowered = quamba_fx.lower(quamba_fx.quantize(byte_graph, calib.split(2), recipe="quamba", progress=False))
    lm = QuambaLM(model=lowered, progress=False)
    full_calls = []
    handle = lm.lm.model.register_forward_pre_hook(lambda module, args: full_calls.append(args[0].shape[1]))
    try:
        [cached] = lm.generate_until([Request("The film was", {"until": ["never-seen"], "max_gen_toks": 6})])
    finally:
        handle.remove()
    assert full_calls == []
    ids = torch.tensor([list(b"The film was")])
    expected = quamba_fx.Generator(lowered, 1).generate(ids, 6)[0, ids.shape[1]:].tolist()
    assert cached == bytes(expected).decode("utf-8", errors="replace")


def test_a_quantized_checkpoint_is_scored_through_checkpoint_arg(byte_graph, tmp_path):
    calib = textdata.chunk_sequences(torch.tensor(list(("The game was released . " * 40).encode())), 64, 4)
    qgm = quamba_fx.quantize(byte_graph, calib.split(2), recipe="quamba", progress=False)
    qgm.save_pretrained(tmp_path / "w8a8")
    lm = QuambaLM(checkpoint=str(tmp_path / "w8a8"), progress=False)
    assert lm.get_model_info()["quamba_recipe"] == "quamba"
    context, choices = TOY_MULTIPLE_CHOICE[0]
    results = lm.loglikelihood([Request(context, choice) for choice in choices])
    expected = direct_loglikelihood(qgm, list(context.encode()), list(choices[0].encode()))
    # The adapter scores the three choices as one padded batch, the direct run one sequence: the
    # reference scan's fp32 sums differ by ~1e-5 between the two, which can move one int8 code of
    # the head's input (the final norm at one scale) and the log-likelihood by ~1e-2 (0.008 seen).
    assert results[0][0] == pytest.approx(expected[0], abs=0.03)
    assert max(range(3), key=lambda c: results[c][0]) == 0
    assert isinstance(lm.generate_until([Request(context, {"until": ["\n"], "max_gen_toks": 8})])[0], str)


class CharTokenizer:
    """A toy tokenizer for a 97-token model: lowercase letters and space."""

    alphabet = " abcdefghijklmnopqrstuvwxyz"
    bos_token_id = 96

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) + 1 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 1] if 1 <= i <= len(self.alphabet) else "?" for i in ids)


def test_any_model_with_a_tokenizer():
    gm = quamba_fx.capture(make_model(tiny_config()))
    with pytest.raises(UnsupportedModelError, match="tokenizer="):
        QuambaLM(model=gm)
    lm = QuambaLM(model=gm, tokenizer=CharTokenizer(), progress=False)
    assert lm.prefix_token_id == 96
    [(logprob, _)] = lm.loglikelihood([Request("hello", " world")])
    tok = CharTokenizer()
    assert logprob == pytest.approx(direct_loglikelihood(gm, tok.encode("hello"), tok.encode(" world"))[0], abs=1e-4)
    [text] = lm.generate_until([Request("abc", {"until": ["zzz"], "max_gen_toks": 5})])
    assert isinstance(text, str) and len(text) <= 5


def test_bad_arguments_and_requests(byte_graph, byte_lm):
    with pytest.raises(ValueError, match="exactly one"):
        QuambaLM()
    with pytest.raises(ValueError, match="exactly one"):
        QuambaLM(model=byte_graph, checkpoint="mamba-bytes-wt2")
    with pytest.raises(ValueError, match="batch_size"):
        QuambaLM(model=byte_graph, batch_size=0)
    with pytest.raises(InputError, match="tuple of 2"):
        byte_lm.loglikelihood([Request("only context")])
    with pytest.raises(InputError, match="context: str"):
        byte_lm.loglikelihood([Request(b"bytes", "x")])
    with pytest.raises(InputError, match="tuple of 1"):
        byte_lm.loglikelihood_rolling([Request("a", "b")])
    with pytest.raises(InputError, match="longer than max_length"):
        QuambaLM(model=byte_graph, max_length=4, progress=False).loglikelihood([Request("a", "abcdefgh")])


# ------------------------------------------------------------------- with lm-evaluation-harness only

needs_lm_eval = pytest.mark.skipif(
    not LM_EVAL_AVAILABLE, reason="lm_eval is not installed (pip install 'quamba-fx[eval]')"
)


@needs_lm_eval
def test_registered_with_the_harness(tmp_path, byte_graph):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    assert issubclass(QuambaLM, LM) and get_model("quamba") is QuambaLM
    byte_graph.save_pretrained(tmp_path / "float")
    lm = get_model("quamba").create_from_arg_string(
        f"checkpoint={tmp_path / 'float'},max_length=512,progress=False",
        {"batch_size": 2, "max_batch_size": None, "device": None},
    )
    context, choices = TOY_MULTIPLE_CHOICE[4]
    instances = [
        Instance("loglikelihood", doc={}, arguments=(context, choice), idx=i) for i, choice in enumerate(choices)
    ]
    scores = [logprob for logprob, _ in lm.loglikelihood(instances)]
    assert max(range(3), key=scores.__getitem__) == 0


@needs_lm_eval
def test_rolling_windows_match_the_harness():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for length in (1, 5, 16, 17, 40):
        for max_length in (1, 4, 16):
            tokens = list(range(length))
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, -1, max_length, 1)]
            assert rolling_windows(tokens, -1, max_length) == [tuple(map(list, w)) for w in theirs]


@needs_lm_eval
def test_simple_evaluate_on_a_local_toy_task(tmp_path, byte_graph):
    """The documented Python API, end to end, on a multiple-choice task read from a local file."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = [{"context": context, "choices": choices, "label": 0} for context, choices in TOY_MULTIPLE_CHOICE]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "toy.yaml").write_text(
        "task: toy_wikitext_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'toy.jsonl'}}}, cache_dir: {tmp_path / 'cache'}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'target_delimiter: ""\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    results = lm_eval.simple_evaluate(
        model=QuambaLM(model=byte_graph, progress=False),
        tasks=["toy_wikitext_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    assert results["results"]["toy_wikitext_mc"]["acc,none"] == 1.0
