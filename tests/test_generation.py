"""QuambaForCausalLM: captured/quantized graphs behind transformers' own generate; generate_text."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
from transformers import GenerationConfig

import quamba_fx
from quamba_fx.errors import InputError, MetaDeviceError, UnsupportedModelError
from quamba_fx.generation import QuambaForCausalLM, StopOnStrings, as_causal_lm, generate_text, truncate_at_stops
from quamba_fx.graph_meta import graph_meta

from .conftest import make_model, tiny_config

VOCAB = 97  # tiny_config's vocabulary


def prompt(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    # Ids from 1: 0 is the tiny config's eos/pad token.
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def varied_model():
    # Seed 3 samples varied tokens; greedy decoding of these random models soon repeats one token.
    return make_model(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def bytes_pair():
    hf = quamba_fx.load_model("mamba-bytes-wt2")
    return hf, quamba_fx.capture(hf)


def test_greedy_matches_hf_generate_token_for_token(tiny_model):
    ids = prompt()
    ours = QuambaForCausalLM(quamba_fx.capture(tiny_model)).generate(ids, do_sample=False, max_new_tokens=12)
    theirs = tiny_model.generate(ids, do_sample=False, max_new_tokens=12)
    assert ours.shape == (2, 18)
    assert torch.equal(ours, theirs)


def test_greedy_matches_hf_on_the_trained_byte_model(bytes_pair):
    hf, gm = bytes_pair
    ids = torch.tensor([list(b"The film was released in")])
    ours = QuambaForCausalLM(gm).generate(ids, max_new_tokens=24)
    assert torch.equal(ours, hf.generate(ids, do_sample=False, max_new_tokens=24))


def test_sampling_is_seeded_and_matches_hf(varied_model):
    lm = QuambaForCausalLM(quamba_fx.capture(varied_model))
    ids, mask = prompt(), torch.ones(2, 6, dtype=torch.long)
    kwargs = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=20, attention_mask=mask)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(lm.generate(ids, **kwargs))
    torch.manual_seed(5)
    reference = varied_model.generate(ids, **kwargs)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.equal(runs[0], reference)
    assert len(set(runs[0][0, 6:].tolist())) > 3  # really sampled, not one repeated token


def test_beam_search_and_generation_config_object(varied_model):
    lm = QuambaForCausalLM(quamba_fx.capture(varied_model))
    ids, mask = prompt(), torch.ones(2, 6, dtype=torch.long)
    config = GenerationConfig(num_beams=3, max_new_tokens=6, use_cache=True, eos_token_id=0, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = lm.generate(ids, generation_config=config, attention_mask=mask)
    # A GenerationConfig has use_cache=True by default: no reason to warn.
    assert not [w for w in caught if "no SSM cache" in str(w.message)]
    assert config.use_cache is True  # the caller's object is not modified
    assert torch.equal(ours, varied_model.generate(ids, num_beams=3, max_new_tokens=6, attention_mask=mask))


def test_left_padded_batch_equals_unpadded_rows_and_hf(varied_model):
    lm = QuambaForCausalLM(quamba_fx.capture(varied_model))
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    batched = lm.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    short = lm.generate(ids[:1, 3:], max_new_tokens=8)
    full = lm.generate(ids[1:], max_new_tokens=8)
    assert torch.equal(batched[0, 3:], short[0])
    assert torch.equal(batched[1], full[0])
    assert torch.equal(batched, varied_model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0))


def test_every_step_reruns_the_whole_prefix(tiny_model):
    lm = QuambaForCausalLM(quamba_fx.capture(tiny_model))
    lengths = []
    lm.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    lm.generate(prompt(1), max_new_tokens=5, eos_token_id=None)
    assert lengths == [6, 7, 8, 9, 10]


def test_use_cache_is_refused_with_a_warning(tiny_model):
    lm = QuambaForCausalLM(quamba_fx.capture(tiny_model))
    expected = lm.generate(prompt(), max_new_tokens=4)
    with pytest.warns(UserWarning, match="not lowered .* has no SSM cache"):
        out = lm.generate(prompt(), max_new_tokens=4, use_cache=True)
    assert torch.equal(out, expected)
    assert lm.generation_config.use_cache is False


@pytest.fixture
def reference_kernels(monkeypatch):
    """The lowered ops' PyTorch references instead of interpreted Triton: these tests are about the
    cache protocol, which is the same whichever implementation computes each op (the kernels have
    their own tests against the references), and interpreting a decode step per token is slow."""
    from quamba_fx.kernels import conv1d, gemm, hadamard, norm, scan

    for module in (conv1d, gemm, hadamard, norm, scan):
        monkeypatch.setattr(module, "_use_triton", lambda t: t.is_cuda)


@pytest.fixture(scope="module")
def varied_quantized(varied_model):
    calib = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return quamba_fx.quantize(varied_model, calib, recipe="quamba", progress=False)


@pytest.fixture(scope="module")
def lowered_lm(varied_quantized):
    return QuambaForCausalLM(quamba_fx.lower(varied_quantized))


def graph_lengths(gm: torch.fx.GraphModule) -> tuple[list[int], object]:
    """The sequence length of every call of `gm` from now on, and the hook's handle."""
    lengths: list[int] = []
    handle = gm.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    return lengths, handle


@pytest.mark.usefixtures("reference_kernels")
def test_lowered_graph_generates_from_the_ssm_cache(lowered_lm):
    ids = prompt()
    first = lowered_lm.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None)
    generator = lowered_lm._generators[2]
    seen = {name: graph_lengths(gm) for name, gm in
            (("full", lowered_lm.model), ("prefill", generator.prefill_graph), ("decode", generator.decode_graph))}
    again = lowered_lm.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None)
    for lengths, handle in seen.values():
        handle.remove()
    # The prompt once, then one token per step: linear, not quadratic, in the generated length.
    assert seen["prefill"][0] == [6] and seen["decode"][0] == [1] * 7 and seen["full"][0] == []
    assert torch.equal(first, again)
    assert torch.equal(first, quamba_fx.Generator(lowered_lm.model, 2).generate(ids, 8))
    # The cache changes the cost, not the tokens.
    assert torch.equal(first, lowered_lm.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None,
                                                  use_cache=False))


def decoded_and_uncached_logits(lowered: torch.fx.GraphModule, ids: torch.Tensor, cut: int):
    """Logits of ids[:, cut:] decoded one token at a time after a prefill of ids[:, :cut], and the
    same positions' logits from one run of the uncached graph (whose scan state is never stored)."""
    gen = quamba_fx.Generator(lowered, ids.shape[0])
    with torch.no_grad():
        gen.prefill(ids[:, :cut])
        decoded = torch.stack([gen.decode(ids[:, t]) for t in range(cut, ids.shape[1])], dim=1)
        return gen, decoded, lowered(ids)[:, cut:]


@pytest.mark.usefixtures("reference_kernels")
def test_fp16_state_decodes_like_the_uncached_graph(lowered_lm, varied_quantized):
    """The default fp16 lowering keeps the decode state in fp16: every prefill and decode step
    stores it rounded to nearest even (relative error <= 2**-11), where the uncached graph keeps
    fp32 in registers. That rounding is the only difference: with an fp32 state the decoded logits
    equal the uncached graph's. The rounding errors decay with the scan and reach the logits
    damped by the rest of the model, so the logits stay within 2**-11 (relative, over all decoded
    positions; measured 1.6e-4 with torch 2.14 and 0 with torch 2.11, where no rounding reached
    the fp16 logits). Losing the state (5e-3 to 6e-3 on the two), rounding it to bf16 (about
    2e-3) or scaling it by 1 + 2**-7 at one step (1e-3 to 2.6e-3) all exceed that."""
    low = lowered_lm.model
    ids = prompt(2, 20, seed=4)
    gen, decoded, uncached = decoded_and_uncached_logits(low, ids, 4)
    assert graph_meta(low).state_dtype == "float16"
    assert all(s.dtype == torch.float16 and bool(s.any()) for s in gen.cache.ssm_states)
    error = float((decoded - uncached).norm() / uncached.norm())
    assert error < 2.0**-11, error
    wide = quamba_fx.lower(varied_quantized, state_dtype=torch.float32)
    gen, decoded, uncached = decoded_and_uncached_logits(wide, ids, 4)
    assert all(s.dtype == torch.float32 for s in gen.cache.ssm_states)
    assert torch.equal(decoded, uncached)


@pytest.mark.usefixtures("reference_kernels")
def test_cached_sampling_is_seeded(lowered_lm):
    kwargs = dict(do_sample=True, temperature=0.9, top_k=30, max_new_tokens=12, eos_token_id=None)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(lowered_lm.generate(prompt(1), **kwargs))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kwargs", [
    dict(attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]), pad_token_id=0),
    dict(num_beams=2),
], ids=["padded", "beams"])
@pytest.mark.usefixtures("reference_kernels")
def test_cache_is_skipped_where_it_cannot_serve(lowered_lm, kwargs):
    # A padded batch (the prefill graph has no mask) and beam search (which reorders rows) rerun
    # the full graph every step, and give what the uncached path gives.
    lengths, handle = graph_lengths(lowered_lm.model)
    try:
        out = lowered_lm.generate(prompt(), max_new_tokens=3, eos_token_id=None, **kwargs)
    finally:
        handle.remove()
    assert lengths and lengths[-1] == 8
    assert torch.equal(out, lowered_lm.generate(prompt(), max_new_tokens=3, eos_token_id=None, use_cache=False,
                                                **kwargs))


@pytest.mark.usefixtures("reference_kernels")
def test_forward_refuses_a_cache_outside_generate(lowered_lm):
    with pytest.raises(InputError, match="quamba_cache is generate's own"):
        lowered_lm(prompt(), quamba_cache=object())


def test_wrapping_never_reinitialises_weights(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    lm = QuambaForCausalLM(gm)
    lm.init_weights()  # what post_init runs; must leave the graph's weights alone
    assert lm.model is gm
    assert before.keys() == gm.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_forward_returns_the_graph_logits(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    lm = QuambaForCausalLM(gm)
    ids = prompt()
    assert torch.equal(lm(ids).logits, gm(ids))
    assert torch.equal(lm(ids, return_dict=False)[0], gm(ids))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    padded = lm(ids, attention_mask=mask).logits
    assert torch.equal(padded[0, 0], torch.zeros(VOCAB))
    torch.testing.assert_close(padded[0, 1:], gm(ids[:1, 1:])[0])
    with pytest.raises(NotImplementedError, match="no KV/SSM cache"):
        lm(ids, cache=object())
    with pytest.raises(TypeError, match="unexpected argument 'bogus'"):
        lm(ids, bogus=1)


def test_quantized_wrapper_generates_from_the_quantized_graph(tiny_model):
    calib = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    qgm = quamba_fx.quantize(tiny_model, calib, recipe="quamba", progress=False)
    ids = prompt(1)
    out = QuambaForCausalLM(qgm).generate(ids, max_new_tokens=6, eos_token_id=None)
    manual = ids
    for _ in range(6):  # greedy by hand on the quantized graph, whole prefix each step
        manual = torch.cat([manual, qgm(manual)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, manual)


def test_eos_stops_generation(varied_model):
    lm = QuambaForCausalLM(quamba_fx.capture(varied_model))
    ids = prompt()
    free = lm.generate(ids, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, 8])  # the third new token of row 0
    first = free[0, 6:].tolist().index(eos)
    stopped = lm.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped[0, : 6 + first + 1], free[0, : 6 + first + 1])
    assert stopped[0, 6 + first] == eos
    # A finished row is padded while the other keeps going; the run stops once all rows finished.
    assert (stopped[0, 6 + first + 1:] == 0).all()
    single = lm.generate(ids[:1], max_new_tokens=10, eos_token_id=eos)
    assert single.shape[1] == 6 + first + 1


def test_save_and_reload_through_the_wrapper(tiny_model, tmp_path):
    lm = QuambaForCausalLM(quamba_fx.capture(tiny_model))
    lm.save_pretrained(tmp_path / "ckpt")
    again = QuambaForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = prompt()
    assert torch.equal(again.generate(ids, max_new_tokens=5), lm.generate(ids, max_new_tokens=5))
    assert as_causal_lm(lm) is lm


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda lm: lm.generate(torch.tensor([1, 2, 3]), max_new_tokens=2), InputError, r"input_ids\[None\]"),
        (lambda lm: lm.generate(torch.ones(1, 3), max_new_tokens=2), InputError, "int64 or int32"),
        (lambda lm: lm.generate([[1, 2]], max_new_tokens=2), InputError, "must be a tensor"),
        (lambda lm: lm.generate(torch.zeros(1, 0, dtype=torch.long)), InputError, "empty"),
        (lambda lm: lm.generate(torch.tensor([[1, VOCAB]]), max_new_tokens=2), InputError, r"\[0, 97\)"),
        (lambda lm: lm.generate(max_new_tokens=2), InputError, "needs a prompt"),
        (lambda lm: lm.generate(inputs_embeds=torch.zeros(1, 2, 32)), InputError, "not inputs_embeds"),
        (lambda lm: lm.generate(prompt(), attention_mask=torch.ones(2, 5)), InputError, "must match"),
        (lambda lm: lm.generate(prompt(), attention_mask=torch.tensor([[0] * 6, [1] * 6])), InputError, r"rows \[0\]"),
        (lambda lm: lm.generate(prompt(), attention_mask=torch.full((2, 6), 2)), InputError, "only 0"),
        (lambda lm: lm.generate(prompt(), max_new_tokens=2, temprature=0.5), ValueError, "temprature"),
    ],
)
def test_bad_generate_inputs_raise_clear_errors(tiny_model, call, error, match):
    with pytest.raises(error, match=match):
        call(QuambaForCausalLM(quamba_fx.capture(tiny_model)))


def test_what_cannot_be_wrapped(tiny_model):
    with pytest.raises(UnsupportedModelError, match="GraphModule"):
        QuambaForCausalLM(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="MambaModel"):
        QuambaForCausalLM(quamba_fx.capture(make_model(tiny_config(), head=False)))
    with pytest.raises(MetaDeviceError):
        QuambaForCausalLM(quamba_fx.capture(quamba_fx.load_model("mamba-tiny", device="meta")))
    with pytest.raises(UnsupportedModelError, match="vocab_size 97"):
        generate_text(quamba_fx.capture(tiny_model), "hello", 4)


@pytest.mark.slow
def test_generate_text_on_the_byte_model(bytes_pair):
    _, gm = bytes_pair
    text = generate_text(gm, "The film was released in", 24)
    ids = QuambaForCausalLM(gm).generate(torch.tensor([list(b"The film was released in")]), max_new_tokens=24)
    assert text == bytes(ids[0, 24:].tolist()).decode("utf-8", errors="replace")
    assert generate_text(gm, "The film", 8, include_prompt=True).startswith("The film")
    sampled = [generate_text(gm, "The", 16, do_sample=True, temperature=0.9, top_k=40, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.slow
def test_generate_text_stops_at_stop_strings(bytes_pair):
    _, gm = bytes_pair
    free = generate_text(gm, "The film was released in", 40)
    stop = free.strip().split(" ")[1]  # the second word it generates
    cut = generate_text(gm, "The film was released in", 40, stop=[stop])
    assert cut == free[: free.index(stop)]
    assert truncate_at_stops("a.b,c", [",", "."]) == "a"
    criterion = StopOnStrings(["\n\n"], 1, lambda ids: bytes(ids).decode())
    done = criterion(torch.tensor([[65, 10, 10], [65, 10, 66]]), None)
    assert done.tolist() == [True, False]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": b"x"}, "must be a str"),
        ({"prompt": "x", "max_new_tokens": 0}, "positive"),
    ],
)
def test_generate_text_bad_inputs(bytes_pair, kwargs, match):
    with pytest.raises(InputError, match=match):
        generate_text(bytes_pair[1], **kwargs)
