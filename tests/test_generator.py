"""quamba_fx.Generator's greedy decoding: `greedy` picks the tokens of `decode` then argmax, step
by step, whatever the steps a CUDA graph holds; bad arguments are named. On CPU the steps run
as plain calls (the same `_greedy_steps` a CUDA graph captures); on CUDA the graphs replay."""

from __future__ import annotations

import pytest
import torch

import quamba_fx
from quamba_fx import runtime
from quamba_fx.errors import InputError

from .conftest import make_model, tiny_config


@pytest.fixture(scope="module")
def lowered():
    model = make_model(tiny_config(vocab_size=64, num_hidden_layers=2))
    torch.manual_seed(1)
    quantized = quamba_fx.quantize(model, [torch.randint(0, 64, (2, 24))], progress=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return quamba_fx.lower(quantized).to(device)


def step_by_step(gen: quamba_fx.Generator, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    picked = []
    for _ in range(steps):
        tokens = gen.decode(tokens).argmax(dim=-1)
        picked.append(tokens[:, None])
    return torch.cat(picked, dim=1)


# Each interpreted decode step takes about a second on two cores: the wider cases run in CI's slow leg.
@pytest.mark.parametrize("steps_per_graph, steps", [(2, 3), pytest.param(1, 4, marks=pytest.mark.slow),
                                                    pytest.param(3, 7, marks=pytest.mark.slow),
                                                    pytest.param(4, 3, marks=pytest.mark.slow)])
def test_greedy_steps_pick_what_decode_then_argmax_picks(lowered, steps_per_graph, steps):
    """Whole groups of steps_per_graph steps (one graph on CUDA) and the steps left over, against
    one decode at a time from the same prompt; the cache ends in the same state."""
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(steps_per_graph))
    ours = quamba_fx.Generator(lowered, batch_size=2, steps_per_graph=steps_per_graph)
    theirs = quamba_fx.Generator(lowered, batch_size=2, steps_per_graph=1)
    first = ours.prefill(prompt)[:, -1].argmax(-1)
    assert torch.equal(first, theirs.prefill(prompt)[:, -1].argmax(-1))
    got = ours.greedy(first, steps)
    assert got.shape == (2, steps) and got.dtype == torch.long
    assert torch.equal(got, step_by_step(theirs, first, steps))
    for mine, other in zip((*ours.cache.conv_states, *ours.cache.ssm_states),
                           (*theirs.cache.conv_states, *theirs.cache.ssm_states)):
        assert torch.equal(mine, other)
    again = ours.greedy(got[:, -1], steps_per_graph)  # a captured graph replays from where the cache is
    assert torch.equal(again, step_by_step(theirs, got[:, -1], steps_per_graph))


def test_generate_is_prefill_then_greedy(lowered, monkeypatch):
    monkeypatch.setattr(runtime, "STEPS_PER_GRAPH", 3)  # the module default, read when a Generator is made
    prompt = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(0))
    gen = quamba_fx.Generator(lowered, batch_size=1)
    assert gen.steps_per_graph == 3
    out = gen.generate(prompt, 4)
    assert out.shape == (1, 7) and torch.equal(out[:, :3].cpu(), prompt)
    first = gen.prefill(prompt)[:, -1].argmax(-1)
    assert out[0, 3] == first[0]
    assert torch.equal(out[:, 4:], gen.greedy(first, 3))
    assert torch.equal(gen.generate(prompt, 0).cpu(), prompt)


def test_bad_greedy_arguments_are_named(lowered):
    with pytest.raises(InputError, match="steps_per_graph must be an integer >= 1, got 0"):
        quamba_fx.Generator(lowered, batch_size=1, steps_per_graph=0)
    gen = quamba_fx.Generator(lowered, batch_size=2)
    token = torch.zeros(2, dtype=torch.long)
    with pytest.raises(InputError, match="steps must be an integer >= 0, got -1"):
        gen.greedy(token, -1)
    with pytest.raises(InputError, match=r"expected 2 token\(s\), one a sequence, got shape \(3,\)"):
        gen.greedy(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(InputError, match="tokens must be integer ids, got torch.float32"):
        gen.greedy(torch.zeros(2), 2)
    assert gen.greedy(token, 0).shape == (2, 0)


class FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the step again and writes
    its output into the buffer the capture returned, as a real replay writes its output buffer."""

    def __init__(self, step, out):
        self.step, self.out, self.replays = step, out, 0

    def replay(self):
        self.replays += 1
        new = self.step()
        if isinstance(self.out, torch.Tensor):
            self.out.copy_(new)


def fake_capture(gen: quamba_fx.Generator):
    """`Generator._captured` as a CUDA capture behaves: the step is recorded, not run (its side
    effects on the cache are undone), and its output buffer is what replays write."""
    graphs = []

    def captured(step):
        saved = gen.cache.clone()
        out = step()
        gen.cache.copy_(saved)
        graphs.append(FakeGraph(step, out))
        return graphs[-1], out

    return captured, graphs


def test_graph_replays_give_the_tokens_and_logits_of_plain_steps(lowered, monkeypatch):
    """The CUDA-graph paths of decode and greedy (static inputs, replays, the copies out, whole
    graphs then the steps left over), run on the CPU with replays that rerun the captured step:
    the same logits, tokens and cache as plain steps."""
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    graphed = quamba_fx.Generator(lowered, batch_size=2, steps_per_graph=2)
    plain = quamba_fx.Generator(lowered, batch_size=2)
    if graphed.device.type == "cuda":
        pytest.skip("on CUDA the real graphs run in test_greedy_steps_pick_what_decode_then_argmax_picks")
    graphed.use_cuda_graph = True  # the graph paths, with captures faked below
    captured, graphs = fake_capture(graphed)
    monkeypatch.setattr(graphed, "_captured", captured)
    first = graphed.prefill(prompt)[:, -1].argmax(-1)
    assert torch.equal(first, plain.prefill(prompt)[:, -1].argmax(-1))
    logits = graphed.decode(first)
    torch.testing.assert_close(logits, plain.decode(first), rtol=0, atol=0)
    token = logits.argmax(-1)
    got = graphed.greedy(token, 5)  # two replays of the two-step graph, then one of decode's
    assert torch.equal(got, step_by_step(plain, token, 5))
    assert [g.replays for g in graphs] == [2, 2]  # decode's graph: the step above and the tail
    for mine, other in zip((*graphed.cache.conv_states, *graphed.cache.ssm_states),
                           (*plain.cache.conv_states, *plain.cache.ssm_states)):
        assert torch.equal(mine, other)


def test_capture_warms_up_twice_restores_the_cache_and_returns_the_graph_and_its_output(lowered, monkeypatch):
    """`_captured` on fakes of torch.cuda's streams and graphs: two warm-up runs whose effect on the
    cache is undone, then the capture, whose output is returned with the graph."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    gen = quamba_fx.Generator(lowered, batch_size=1)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    before = gen.cache.clone()
    runs = []

    def step():
        runs.append(torch.equal(gen.cache.ssm_states[0], before.ssm_states[0]))
        for state in gen.cache.ssm_states:
            state.add_(1)
        return f"out {len(runs)}"

    graph, out = gen._captured(step)
    assert (graph, out) == ("graph", "out 3")
    assert runs == [True, False, True]  # the capture starts from the cache as it was
