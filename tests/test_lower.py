"""Lowering the W8A8 graph to kernel ops, and cached generation through the lowered graph.

Under TRITON_INTERPRET=1 (the README's test command) the kernel ops run the Triton kernels on CPU;
otherwise they run the kernels' references. Either way the lowered graph must compute what the
reference W8A8 graph computes, and cached decoding must reproduce full recomputation.
"""

from __future__ import annotations

import json

import pytest
import torch

import quamba_fx
from quamba_fx import textdata
from quamba_fx.graph_info import op_name
from quamba_fx.graph_meta import graph_meta
from quamba_fx.quant.linear import QuantizedLinear
from quamba_fx.runtime import MambaCache

from .conftest import make_model, tiny_config

KERNEL_OPS = {"w8a8_linear", "selective_scan_int8", "hadamard_quantize", "add_rmsnorm_quantize", "conv1d_silu_int8"}


@pytest.fixture(scope="module")
def tiny_quantized():
    model = make_model(tiny_config(vocab_size=64, num_hidden_layers=2))
    torch.manual_seed(1)
    calib = [torch.randint(0, 64, (2, 24))]
    return quamba_fx.quantize(model, calib, progress=False)


@pytest.fixture(scope="module")
def bytes_quantized():
    model = quamba_fx.load_model("mamba-bytes-wt2")
    valid = textdata.load_bytes(textdata.find_wikitext("valid"))
    calib = textdata.chunk_sequences(valid, 256, num_sequences=8)
    return quamba_fx.quantize(model, calib.split(4), progress=False)


# The Triton interpreter runs a kernel program at numpy speed: the real-text tests keep to a few
# hundred bytes so the suite stays fast under TRITON_INTERPRET=1.


@pytest.fixture(scope="module")
def test_windows():
    return textdata.chunk_sequences(textdata.load_bytes(textdata.find_wikitext("test")), 96, num_sequences=2)


def ops_by_block(gm: torch.fx.GraphModule) -> dict:
    counts: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = (node.meta.get("quamba", {}).get("block"), op_name(node))
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_every_reference_op_is_replaced_by_one_kernel_per_block(tiny_quantized):
    low = quamba_fx.lower(tiny_quantized)
    names = {op_name(n) for n in low.graph.nodes if n.op == "call_function"}
    assert not names & {"int8_linear", "selective_scan", "hadamard", "quantize", "dequantize", "exp", "neg"}
    assert not any(isinstance(m, QuantizedLinear) for n in low.graph.nodes if n.op == "call_module"
                   for m in [low.get_submodule(n.target)])
    counts = ops_by_block(low)
    for b in range(2):
        assert counts[(b, "w8a8_linear")] == 4  # in_proj, x_proj, dt_proj, out_proj
        for op in ("conv1d_silu_int8", "selective_scan_int8", "hadamard_quantize", "add_rmsnorm_quantize"):
            assert counts[(b, op)] == 1, op
    assert counts[(None, "add_rmsnorm_quantize")] == 1  # norm_f
    quamba_fx.verify_topology(low)
    # The input graph is untouched.
    assert any(op_name(n) == "selective_scan" for n in tiny_quantized.graph.nodes)


def test_dump_names_the_kernel_of_each_node(tiny_quantized):
    low = quamba_fx.lower(tiny_quantized)
    text = quamba_fx.dump(low, block=0)
    assert text.splitlines()[0].split()[-1] == "kernel"
    for kernel in ("triton:int8_gemm", "triton:selective_scan_int8", "triton:hadamard_quantize",
                   "triton:add_rmsnorm_quantize", "triton:conv1d_silu_int8"):
        assert kernel in text
    records = json.loads(quamba_fx.dump(low, format="json"))["nodes"]
    kernels = {r["annotations"].get("kernel") for r in records if r["target"].startswith("torch.ops.quamba")}
    assert "triton:int8_gemm" in kernels
    # Graphs that are not lowered keep the narrower table.
    assert "kernel" not in quamba_fx.dump(tiny_quantized).splitlines()[0]


def test_fp16_lowering_stays_close_to_the_reference_graph(tiny_quantized):
    # fp16 scan and out_proj outputs perturb values right before they are requantized, which
    # re-rolls some int8 roundings: the error is of the order of the quantization noise (on
    # mamba-bytes-wt2, 16 x 512 bytes of test.txt: bits/byte 0.08% from the reference), so the
    # bound is looser than fp32's but still catches a wrong kernel or layout.
    low = quamba_fx.lower(tiny_quantized)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = tiny_quantized(ids), low(ids)
    assert got.dtype == torch.float32
    assert (got - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("length", [1, 5, pytest.param(17, marks=pytest.mark.slow)])
def test_fp32_lowering_matches_the_reference_graph(tiny_quantized, length):
    low = quamba_fx.lower(tiny_quantized, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref, got = tiny_quantized(ids), low(ids)
    # Kernels round differently (scan exp/log1p, Hadamard summation order: at most one int8 step
    # here and there), so compare logits relative to their size.
    assert (got - ref).norm() / ref.norm() < 0.02


@pytest.mark.slow
def test_lowered_graph_scores_real_text_like_the_reference(bytes_quantized, test_windows):
    # fp32 between kernels: what is left is the kernels' own rounding (scan exp/log1p, Hadamard
    # summation order), each flipping an int8 rounding here and there. On 16 x 512 bytes that moves
    # bits/byte by 0.002% (docs/benchmarks.md); this sample is kept small for the interpreter, where
    # the same flips move it by up to ~0.15%, so the bounds are on KL and agreement as well.
    low = quamba_fx.lower(bytes_quantized, dtype=torch.float32)
    result = quamba_fx.evaluate(low, test_windows, bytes_quantized, batch_size=2, progress=False)
    assert abs(result.bits_per_byte / result.reference_bits_per_byte - 1) < 5e-3, result
    assert result.kl_divergence < 1e-3, result
    assert result.top1_agreement > 0.98, result


@pytest.mark.slow
def test_cached_greedy_decoding_equals_full_recomputation(bytes_quantized, test_windows):
    low = quamba_fx.lower(bytes_quantized)
    prompt = test_windows[:2, :24]
    out = quamba_fx.Generator(low, batch_size=2).generate(prompt, 8)
    ref = prompt
    with torch.no_grad():
        for _ in range(8):  # the reference W8A8 graph, rerun over the whole prefix
            ref = torch.cat([ref, bytes_quantized(ref)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ref), (bytes(out[0].tolist()), bytes(ref[0].tolist()))


# Over 10 s on the oldest CI leg (2 cores, Triton 3.6's interpreter): CI's slow run keeps it.
@pytest.mark.slow
def test_decode_step_logits_equal_the_prefill_of_the_longer_sequence(tiny_quantized):
    low = quamba_fx.lower(tiny_quantized)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    gen = quamba_fx.Generator(low, batch_size=2)
    with torch.no_grad():
        gen.prefill(ids[:, :6])
        steps = [gen.decode(ids[:, t]) for t in range(6, 9)]
        full = low(ids)
    for i, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[:, 6 + i], rtol=1e-3, atol=1e-3)


def test_generator_graphs_call_the_kernel_functions_without_the_dispatcher(tiny_quantized):
    """The Generator's graphs only run, so their kernel nodes call the ops' functions directly;
    the lowered graph a user holds keeps the ops (traceable, compilable, dumped as kernel ops)."""
    low = quamba_fx.lower(tiny_quantized)
    gen = quamba_fx.Generator(low, batch_size=1)

    def quamba_ops(gm):
        return [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
                and n.target.namespace == "quamba"]

    assert quamba_ops(low)
    for gm in (gen.prefill_graph, gen.decode_graph):
        assert quamba_ops(gm) == []
        direct = [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) == "w8a8_linear"]
        assert direct and all(callable(n.target) for n in direct)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    full = low(ids)
    torch.testing.assert_close(gen.prefill(ids), full, rtol=0, atol=0)


def test_generator_graphs_read_their_weights_without_walking_the_module_tree(tiny_quantized):
    """Each weight or scale the runnable graphs read is held by the graph itself (one dict lookup,
    not a chain of nn.Module.__getattr__), the very tensor of the lowered model; their state dicts
    name the lowered model's tensors only."""
    low = quamba_fx.lower(tiny_quantized)
    gen = quamba_fx.Generator(low, batch_size=1)
    for gm in (gen.prefill_graph, gen.decode_graph):
        reads = [n for n in gm.graph.nodes if n.op == "get_attr"]
        assert reads and all("." not in n.target and n.target in gm.__dict__ for n in reads)
        assert set(gm.state_dict()) <= set(low.state_dict())  # nothing registered under the new names
    weight = low.get_submodule("backbone.layers.0.mixer.in_proj").weight
    assert any(v is weight for v in gen.decode_graph.__dict__.values())
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gen.prefill(ids), low(ids), rtol=0, atol=0)


def test_decode_graph_folds_dt_proj_into_the_scan_and_the_conv_into_in_proj(tiny_quantized):
    low = quamba_fx.lower(tiny_quantized)
    gen = quamba_fx.Generator(low, batch_size=1)
    blocks = tiny_config().num_hidden_layers
    decode = [n for n in gen.decode_graph.graph.nodes if n.op == "call_function"]
    prefill = [n for n in gen.prefill_graph.graph.nodes if n.op == "call_function"]
    scans = [n for n in decode if op_name(n) == "dt_proj_state_update"]
    convs = [n for n in decode if op_name(n) == "in_proj_conv_update"]
    assert len(scans) == len(convs) == blocks
    assert all(n.meta["quamba"]["kernel"] == "triton:dt_proj_state_update" for n in scans)
    assert all(n.meta["quamba"]["kernel"] == "triton:in_proj_conv_update" for n in convs)
    # dt_proj's weight is read by the scan's op, in_proj's and the conv's by one op: no GEMM of
    # dt_proj or in_proj, no conv op left in the decode graph; the prefill graph keeps them all.
    assert all("dt_proj" in n.args[4].target for n in scans)
    assert all("in_proj" in n.args[2].target and "conv1d" in n.args[6].target for n in convs)
    gemm_weights = [n.args[2].target for n in decode if op_name(n) == "w8a8_linear"]
    assert not any("dt_proj" in t or "in_proj" in t for t in gemm_weights)
    assert not any(op_name(n) == "conv1d_silu_int8_cached" for n in decode)
    assert sum(op_name(n) == "conv1d_silu_int8_cached" for n in prefill) == blocks
    assert sum(op_name(n) == "w8a8_linear" and "dt_proj" in n.args[2].target for n in prefill) == blocks


@pytest.mark.slow  # ~15 s interpreted, for a rule that is off by default; the kernel's equality test is fast
def test_prefill_scan_folds_dt_proj_in_when_asked_with_the_same_logits_and_generation(tiny_quantized, monkeypatch):
    """With FUSE_DT_PROJ_IN_PREFILL each block's scan computes dt_proj itself (no dt_proj GEMM left
    in the forward graph), in the forward, the cached prefill and the decode step, and every
    output is the unfused graph's, bit for bit (the same delta bits, the same scan)."""
    from quamba_fx.passes.lowering import scan as scan_rules

    blocks = tiny_config().num_hidden_layers
    # Short: the interpreter pays per kernel program (the kernel's own test covers several chunks).
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(5))

    def run(low):
        gen = quamba_fx.Generator(low, batch_size=1)
        with torch.no_grad():
            return [low(ids), gen.prefill(ids[:, :7]), gen.decode(ids[:, 7])], gen

    plain, _ = run(quamba_fx.lower(tiny_quantized))
    monkeypatch.setattr(scan_rules, "FUSE_DT_PROJ_IN_PREFILL", True)
    low = quamba_fx.lower(tiny_quantized)
    fused, gen = run(low)
    for gm, name in ((low, "selective_scan_int8_dt_proj"), (gen.prefill_graph, "selective_scan_int8_dt_proj_cached"),
                     (gen.decode_graph, "selective_scan_int8_dt_proj_cached")):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert sum(op_name(n) == name for n in nodes) == blocks
        assert not any(op_name(n) == "w8a8_linear" and "dt_proj" in n.args[2].target for n in nodes)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))


@pytest.mark.slow  # ~11 s under the interpreter; the kernel's own equality test is in the fast suite
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_decode_kernels_give_the_logits_of_the_separate_ones(tiny_quantized, batch, monkeypatch):
    from quamba_fx.kernels import gemv, scan

    low = quamba_fx.lower(tiny_quantized)
    ids = torch.randint(0, 64, (batch, 7), generator=torch.Generator().manual_seed(4))

    def decode_two() -> list[torch.Tensor]:
        gen = quamba_fx.Generator(low, batch_size=batch)
        with torch.no_grad():
            gen.prefill(ids[:, :5])
            return [gen.decode(ids[:, t]) for t in (5, 6)]

    fused = decode_two()
    monkeypatch.setattr(scan, "DT_PROJ_MAX_BATCH", 0)  # dt_proj as its own GEMM first
    monkeypatch.setattr(gemv, "GEMV_MAX_M", 0)  # no GEMV: in_proj, then the conv kernel
    separate = decode_two()
    assert all(torch.equal(a, b) for a, b in zip(fused, separate))


def test_cache_shapes_and_reset(tiny_quantized):
    low = quamba_fx.lower(tiny_quantized)
    cache = MambaCache.allocate(low, batch_size=3)
    config = tiny_config()
    d_inner = config.hidden_size * config.expand
    assert [tuple(s.shape) for s in cache.conv_states] == [(3, d_inner, config.conv_kernel - 1)] * 2
    assert [tuple(s.shape) for s in cache.ssm_states] == [(3, d_inner, config.state_size)] * 2
    # The default fp16 lowering keeps the scan state in fp16, as mamba_ssm does.
    assert cache.conv_states[0].dtype == torch.int8 and cache.ssm_states[0].dtype == torch.float16
    gen = quamba_fx.Generator(low, batch_size=1)
    gen.prefill(torch.randint(0, 64, (1, 7)))
    assert any(bool(s.abs().sum() > 0) for s in gen.cache.ssm_states)
    gen.prefill(torch.zeros(1, 1, dtype=torch.long))  # a new prompt starts from an empty cache
    first = gen.cache.clone()
    gen.cache.zero_()
    gen.prefill(torch.zeros(1, 1, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(first.ssm_states, gen.cache.ssm_states))


@pytest.mark.parametrize("kwargs, want", [
    ({}, torch.float16),
    (dict(dtype=torch.float32), torch.float32),  # the exact option keeps an fp32 state
    (dict(dtype=torch.bfloat16), torch.float32),  # bf16's 8-bit mantissa: too coarse by default
    (dict(state_dtype=torch.bfloat16), torch.bfloat16),
    (dict(dtype=torch.float32, state_dtype=torch.float16), torch.float16),
    (dict(state_dtype=torch.float32), torch.float32),
])
def test_cache_state_dtype_follows_lower(tiny_quantized, kwargs, want):
    low = quamba_fx.lower(tiny_quantized, **kwargs)
    assert graph_meta(low).state_dtype == str(want).replace("torch.", "")
    cache = MambaCache.allocate(low, batch_size=2)
    assert [s.dtype for s in cache.ssm_states] == [want] * 2
    assert [s.dtype for s in cache.conv_states] == [torch.int8] * 2
    gen = quamba_fx.Generator(low, batch_size=2)
    assert [s.dtype for s in gen.cache.ssm_states] == [want] * 2
    # The cached graphs carry the lowered graph's facts.
    assert graph_meta(gen.decode_graph).state_dtype == graph_meta(low).state_dtype


def test_graphs_lowered_before_the_state_dtype_was_recorded_keep_fp32(tiny_quantized):
    low = quamba_fx.lower(tiny_quantized)
    graph_meta(low).state_dtype = None
    assert [s.dtype for s in MambaCache.allocate(low, batch_size=1).ssm_states] == [torch.float32] * 2
    graph_meta(low).state_dtype = "float64"
    with pytest.raises(quamba_fx.InputError, match=r"state_dtype\) is 'float64'.*lower the quantized graph again"):
        MambaCache.allocate(low, batch_size=1)


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.int8, "float16"])
def test_bad_state_dtype_is_refused(tiny_quantized, state_dtype):
    match = "state_dtype must be None, torch.float16, torch.bfloat16 or torch.float32"
    with pytest.raises(quamba_fx.InvalidArgumentError, match=match) as raised:
        quamba_fx.lower(tiny_quantized, state_dtype=state_dtype)
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "float16"])
def test_bad_activation_dtype_is_refused(tiny_quantized, dtype):
    match = r"dtype \(the activations between kernels\) must be torch.float16, torch.bfloat16 or torch.float32"
    with pytest.raises(quamba_fx.InvalidArgumentError, match=match):
        quamba_fx.lower(tiny_quantized, dtype=dtype)


def test_clear_errors(tiny_quantized):
    float_graph = quamba_fx.capture(make_model(tiny_config(vocab_size=64)))
    with pytest.raises(ValueError, match="quantized graph"):
        quamba_fx.lower(float_graph)
    with pytest.raises(quamba_fx.InputError, match="lowered graph"):
        quamba_fx.Generator(tiny_quantized, batch_size=1)
    low = quamba_fx.lower(tiny_quantized)
    with pytest.raises(quamba_fx.InputError, match="batch_size"):
        quamba_fx.Generator(low, batch_size=0)
    gen = quamba_fx.Generator(low, batch_size=2)
    with pytest.raises(quamba_fx.InputError, match=r"\[2, L\]"):
        gen.prefill(torch.zeros(3, 4, dtype=torch.long))
    if not torch.cuda.is_available():
        with pytest.raises(quamba_fx.InputError, match="CUDA"):
            quamba_fx.Generator(low, batch_size=1, cuda_graph=True)
