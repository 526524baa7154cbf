"""Speed against the reference stack: mamba_ssm fp16 vs our lowered W8A8, same weights, one process.

    python benchmarks/reference.py [--models mamba-130m mamba-2.8b] [--prefill 1x128 1x2048 8x2048]
        [--decode-batches 1 16 64] [--breakdown-models mamba-2.8b] [--recipes quamba fp8 quamba2-w4a8]
        [--rtn-weights] [--json PATH] [--smoke]

Needs CUDA and the reference stack of /work/shared/anchors (`anchors.py` importable: put its folder
on PYTHONPATH). For each model shape, from ONE seeded random `MambaForCausalLM` (`Mamba2ForCausalLM`
for the `mamba2-*` names; block Linears drawn as mamba_ssm initialises them, as benchmarks/e2e.py
does):

* the reference: mamba_ssm's `MambaLMHeadModel` with the same weights (`mamba_ssm_model`): for
  Mamba-1 `anchors.mamba_ssm_from_hf(model, float16)` (CUDA selective scan and causal conv1d, Triton
  fused add+RMSNorm, cuBLAS fp16 GEMMs); for Mamba-2 its `Mamba2` mixer (Triton SSD kernels, the
  causal conv1d, Triton gated RMSNorm);
* ours: `quamba_fx.lower(quamba_fx.quantize(model, one 1 x 256 calibration batch, recipe=...))` for
  each of `--recipes` (default `quamba`, labelled `w8a8`; others by their name, e.g. `fp8`).

Rows (ratio = reference / ours, so > 1 means we are faster):

* prefill ms of a full forward to logits at each (B, L), plain calls and CUDA-graph replays;
* decode tokens/s of greedy steps after a 16-token prompt, both replaying a captured step: the
  reference through mamba_ssm's own `update_graph_cache` (what `generate(..., cg=True)` runs), ours
  through `quamba_fx.Generator`; each stack's share of its bandwidth limit, batch x (measured copy
  bandwidth) / (bytes read per step: the weights, and the weights plus the decode state read and
  written);
* kernel time by kind (scan, GEMM, conv, norm, Hadamard, other) from `torch.profiler`, for the
  prefill shapes of `--breakdown-shapes` and one decode step at each of `--breakdown-decode-batches`
  (default 1; plain calls: the same kernels a replay runs).

`--smoke` checks the script on CPU without mamba_ssm (mamba-tiny, our side only, tiny shapes): the
numbers mean nothing there, the table, JSON and profiler logic run. tests/test_reference_script.py
runs it.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_timing, e2e (also when imported by a test)
from gpu_timing import profiled_events, write_json  # noqa: E402

REF, OURS = "mamba_ssm", "w8a8"
RECIPE_LABELS = {"quamba": OURS}  # the default recipe keeps the label every earlier run used
KINDS = ("scan", "GEMM", "conv", "norm", "Hadamard", "other")
# First match wins: Hadamard before GEMM (our hadamard_quantize may contain "dot"), scan before the
# rest. Names seen: mamba_ssm `selective_scan_fwd_kernel`, `_selective_scan_update_kernel`,
# `causal_conv1d_fwd_kernel`, `_layer_norm_fwd_1pass_kernel`; ours `_selective_scan_kernel`,
# `_selective_state_update_kernel`, `_causal_conv1d_silu_int8_kernel`, `_add_rmsnorm_kernel`,
# `_hadamard_kernel`, `_int8_gemm_jit`; Mamba-2's SSD, mamba_ssm `_chunk_cumsum_fwd_kernel`,
# `_bmm_chunk_fwd_kernel`, `_chunk_state_fwd_kernel`, `_state_passing_fwd_kernel`,
# `_chunk_scan_fwd_kernel`, ours `_chunk_dt_kernel`, `_chunk_cb_kernel`, `_state_update_kernel`;
# cuBLAS `nvjet_*`, `sm90_xmma_gemm_*`, `gemv2T_kernel*`, `splitKreduce_kernel`; on CPU (smoke) the op names `quamba::w8a8_linear`, `aten::addmm`.
_PATTERNS = (
    ("Hadamard", r"hadamard"),
    ("scan", r"selective_(scan|state)|scan_update|ssm_scan|ssd|chunk_(cumsum|state|scan|cb|dt)|bmm_chunk"
             r"|state_passing|state_update"),
    ("conv", r"conv1d"),
    ("norm", r"rms_?norm|layer_?norm"),
    ("GEMM", r"gemm|gemv|skinny|xmma|cutlass|nvjet|cublas|splitk|matmul|linear|wgmma|dot_kernel|_int_mm"
             r"|aten::(mm|addmm|bmm)$"),
)

PREFILL_SHAPES = [(1, 128), (1, 2048), (8, 2048)]
BREAKDOWN_SHAPES = [(1, 2048), (8, 2048)]
DECODE_BATCHES = [1, 16, 64]
BREAKDOWN_DECODE_BATCHES = [1]
TOP_KERNELS = 12  # kernels by name per breakdown row, in the JSON
DECODE_STEPS = 256  # 64 steps of a 130m batch-1 decode last only ~45 ms: too short a window
PROMPT_LEN = 16
DEVICE = "cuda"
BUDGET_S = 1.0  # seconds of repetitions per timed row (at least 3); --smoke sets 0
_STARTED = time.perf_counter()


def log(msg: str) -> None:
    """Progress with the seconds since start: each device call must fit a time limit."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {msg}", flush=True)


def _fail(msg: str) -> None:
    print(f"benchmarks/reference.py: {msg}", file=sys.stderr)
    sys.exit(2)


def classify(kernel_name: str) -> str:
    """The kind (one of `KINDS`) of a GPU kernel or, on CPU, an op name."""
    name = kernel_name.lower()
    for kind, pattern in _PATTERNS:
        if re.search(pattern, name):
            return kind
    return "other"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], object], budget_s: float = 1.0, max_reps: int = 20) -> float:
    """Median wall time of `fn` (synchronized) after one warm-up call (compilation, autotuning)."""
    fn()
    sync()
    times: list[float] = []
    while len(times) < max_reps and (sum(times) < budget_s * 1e3 or len(times) < 3):
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes/s of a device copy, counting bytes read plus written: the memory-bound ceiling."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), budget_s=0.5, max_reps=50)
    return 2 * nbytes / (ms * 1e-3)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, each storage once (tied embeddings count once)."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def kernel_breakdown(fn: Callable[[], object], calls: int = 3) -> dict:
    """Milliseconds per call of `fn` by kernel kind (and "total"), from `torch.profiler`, plus
    "kernels": the heaviest kernels by name.

    On CUDA the device kernels are summed; on CPU (smoke) the ops' self time.
    """
    us = dict.fromkeys(KINDS, 0.0)
    per_kernel: dict[str, float] = {}
    on_cuda = DEVICE == "cuda"
    for event in profiled_events(fn, calls, cuda=on_cuda):
        took = event.device_time_total if on_cuda else event.self_cpu_time_total
        us[classify(event.name)] += took
        per_kernel[event.name] = per_kernel.get(event.name, 0.0) + took
    ms: dict = {kind: t / 1e3 / calls for kind, t in us.items()}
    ms["total"] = sum(ms.values())
    # The heaviest kernels by name (in the JSON only): what a kind's time is made of, and what
    # "other" holds.
    heaviest = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    ms["kernels"] = {name[:120]: t / 1e3 / calls for name, t in heaviest}
    return ms


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


class RefDecoder:
    """mamba_ssm's own cached decoding, as its `generate` runs it: prefill through `InferenceParams`,
    then one step per token, replayed from the graph `update_graph_cache` captures (`cuda_graph`)."""

    def __init__(self, ref, batch_size: int, max_length: int, cuda_graph: bool = True):
        from mamba_ssm.utils.generation import InferenceParams, update_graph_cache

        self.ref, self.batch_size, self.max_length = ref, batch_size, max_length
        self.cache = None
        if cuda_graph:
            self.cache = update_graph_cache(ref, None, batch_size, PROMPT_LEN, max_length)
            self.params = self.cache.inference_params
        else:
            self.params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=DEVICE)

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for states in self.params.key_value_memory_dict.values()
                   for t in states)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.params.reset(self.max_length, self.batch_size)
        logits = self.ref(ids, inference_params=self.params, num_last_tokens=1).logits[:, -1]
        self.params.seqlen_offset += ids.shape[1]
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(self.batch_size, 1)
        if self.cache is not None:
            self.positions.fill_(self.params.seqlen_offset)
            logits = self.cache.run(ids, self.positions, self.params.seqlen_offset)
        else:
            logits = self.ref(ids, inference_params=self.params, num_last_tokens=1).logits
        self.params.seqlen_offset += 1
        return logits[:, -1]


def decode_rate(prefill: Callable, decode: Callable, prompt: torch.Tensor, steps: int,
                tokens: list | None = None) -> float:
    """Tokens/s of greedy steps (decode + argmax) after `prompt`, after 3 warm-up steps; `prefill`
    returns the last position's logits `[B, V]`, `decode` maps tokens `[B]` to logits `[B, V]`.
    `tokens`, if given, receives each timed step's greedy tokens `[B]` (left on the device)."""
    token = prefill(prompt).argmax(-1)
    for _ in range(3):
        token = decode(token).argmax(-1)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        token = decode(token).argmax(-1)
        if tokens is not None:
            tokens.append(token)
    sync()
    return prompt.shape[0] * steps / (time.perf_counter() - started)


def recipe_label(recipe: str) -> str:
    """The name of a recipe's rows in the tables and the JSON."""
    return RECIPE_LABELS.get(recipe, recipe)


def mamba_ssm_model(hf_model, dtype: torch.dtype):
    """mamba_ssm's `MambaLMHeadModel` on CUDA in `dtype` with the weights of a transformers
    `MambaForCausalLM` (anchors' mapping) or `Mamba2ForCausalLM`. The Mamba-2 parameter names are
    HF's but for `embeddings` -> `embedding`; its gated norm is per B/C group in mamba_ssm, which
    is HF's whole-row norm when `n_groups` is 1 (every built-in shape). `build` checks the logits."""
    import anchors

    config = hf_model.config
    if config.model_type != "mamba2":
        return anchors.mamba_ssm_from_hf(hf_model, dtype)
    anchors.enable()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    ssm = {"layer": "Mamba2", "d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand,
           "headdim": config.head_dim, "ngroups": config.n_groups, "chunk_size": config.chunk_size,
           "dt_limit": tuple(float(v) for v in config.time_step_limit), "bias": config.use_bias,
           "conv_bias": config.use_conv_bias, "rmsnorm": True, "norm_before_gate": False}
    mamba_config = MambaConfig(d_model=config.hidden_size, n_layer=config.num_hidden_layers,
                               vocab_size=config.vocab_size, ssm_cfg=ssm, rms_norm=True,
                               residual_in_fp32=config.residual_in_fp32, fused_add_norm=True,
                               pad_vocab_size_multiple=8, tie_embeddings=bool(config.tie_word_embeddings))
    model = MambaLMHeadModel(mamba_config, device=DEVICE, dtype=dtype).eval()
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and mamba_config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"Mamba-2 weights do not map onto mamba_ssm: missing {missing}, unexpected {unexpected}")
    return model


def build(name: str, with_ref: bool, recipes: list[str], rtn_weights: bool = False, hf_check: bool = True) -> tuple:
    """({label: lowered model} for each recipe, mamba_ssm fp16 or None, same-weights check, vocab),
    all from one seeded random model. `rtn_weights`: 4-bit recipes round their weights to nearest
    instead of running GPTQ (the same kernels and bytes; minutes less on the 2.8b shape).
    `hf_check`: compare every stack's logits with HF fp32's (without it the check is empty)."""
    import dataclasses

    import quamba_fx
    from e2e import random_model
    from quamba_fx.recipes import make_recipe

    model = random_model(name, DEVICE)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (1, 256), device=DEVICE)]
    ours = {}
    for recipe in recipes:
        started = time.perf_counter()
        spec = make_recipe(recipe)
        if rtn_weights and spec.weights.bits == 4:
            spec = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, method="rtn"))
        ours[recipe_label(recipe)] = quamba_fx.lower(quamba_fx.quantize(model, calib, recipe=spec, progress=False))
        log(f"{name}: {recipe} quantized and lowered in {time.perf_counter() - started:.1f} s")
    check_ids = torch.randint(0, vocab, (1, 128), device=DEVICE)
    if not hf_check:
        ref = mamba_ssm_model(model, torch.float16) if with_ref else None
        del model
        empty_cache()
        return ours, ref, {"shape": [1, 128]}, vocab
    with torch.inference_mode():
        # fp32 HF logits before mamba_ssm is importable, so HF surely runs its own torch path.
        hf_logits = model(check_ids, use_cache=False).logits.float()
        check = {"shape": [1, 128], **{f"{k} vs hf fp32": rel_error(m(check_ids), hf_logits) for k, m in ours.items()}}
    ref = None
    if with_ref:
        ref = mamba_ssm_model(model, torch.float16)
        with torch.inference_mode():
            check[f"{REF} fp16 vs hf fp32"] = rel_error(ref(check_ids).logits[..., :vocab], hf_logits)
    log(f"{name}: logits relative error on {check['shape']}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in check.items() if k != "shape"))
    del model, hf_logits
    empty_cache()
    return ours, ref, check, vocab


def _timed(result_ms: dict, key: str, label: str, fn: Callable[[], object], slow: bool) -> None:
    started = time.perf_counter()
    try:
        result_ms[key] = time_ms(fn, budget_s=BUDGET_S, max_reps=5 if slow else 20)
        log(f"  {label} {key}: {result_ms[key]:.3f} ms ({time.perf_counter() - started:.1f} s with warm-up)")
    except Exception as exc:  # one failing row must not lose the rest of the run
        print(f"  [{label} {key}] failed: {type(exc).__name__}: {exc}"[:400], file=sys.stderr, flush=True)
        result_ms[key] = None


def bench_prefill(ours: dict, ref, shapes, graphs: bool, vocab: int) -> list[dict]:
    from gpu_timing import graphed

    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), device=DEVICE)
        row = {"shape": [batch, length], "ms": {}}
        slow = batch * length >= 8192
        impls: dict[str, Callable[[], Callable]] = {}
        if ref is not None:
            impls[REF] = lambda: (lambda: ref(ids).logits)
        for key, lowered in ours.items():
            impls[key] = lambda lowered=lowered: (lambda: lowered(ids))
        if graphs and DEVICE == "cuda":
            if ref is not None:
                impls[f"{REF} graph"] = lambda: graphed(lambda: ref(ids).logits)
            for key, lowered in ours.items():
                impls[f"{key} graph"] = lambda lowered=lowered: graphed(lambda: lowered(ids))
        for key, make in impls.items():
            try:
                fn = make()  # a graph is captured here (its warm-up autotunes)
            except Exception as exc:
                print(f"  [{batch}x{length} {key}] capture failed: {type(exc).__name__}: {exc}"[:400],
                      file=sys.stderr, flush=True)
                row["ms"][key] = None
                continue
            _timed(row["ms"], key, f"prefill {batch}x{length}", fn, slow)
            del fn
            empty_cache()
        rows.append(row)
    return rows


def _our_decode_rate(lowered, prompt: torch.Tensor, steps: int, tokens: list | None = None) -> tuple[float, int]:
    """(tokens/s, decode state bytes) of `quamba_fx.Generator` replaying CUDA-graph steps;
    `tokens` as in `decode_rate`."""
    import quamba_fx

    gen = quamba_fx.Generator(lowered, prompt.shape[0], cuda_graph=DEVICE == "cuda")
    return decode_rate(lambda p: gen.prefill(p)[:, -1], gen.decode, prompt, steps, tokens), gen.cache.nbytes


def our_greedy_rate(lowered, prompt: torch.Tensor, steps: int) -> float:
    """Tokens/s of `quamba_fx.Generator.greedy` after `prompt`: greedy steps with the argmax and
    the next step's input on the GPU, `steps_per_graph` (`quamba_fx.runtime.STEPS_PER_GRAPH`) of
    them a CUDA graph replay; after warm-up steps that capture its graphs."""
    import quamba_fx

    gen = quamba_fx.Generator(lowered, prompt.shape[0], cuda_graph=DEVICE == "cuda")
    token = gen.prefill(prompt)[:, -1].argmax(-1)
    token = gen.greedy(token, max(3, 2 * gen.steps_per_graph))[:, -1]
    sync()
    started = time.perf_counter()
    gen.greedy(token, steps)
    sync()
    return prompt.shape[0] * steps / (time.perf_counter() - started)


def _our_decode_breakdown(lowered, prompt: torch.Tensor) -> dict:
    """`kernel_breakdown` of one plain (not graph-replayed) decode step after `prompt`."""
    import quamba_fx

    gen = quamba_fx.Generator(lowered, prompt.shape[0], cuda_graph=False)
    gen.prefill(prompt)
    token = prompt[:, -1]
    return kernel_breakdown(lambda: gen.decode(token), calls=5)


def bench_decode(ours: dict, ref, batches, steps: int, vocab: int) -> list[dict]:
    rows = []
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, PROMPT_LEN), device=DEVICE)
        row: dict = {"batch": batch, "tokens_per_s": {}, "state_bytes": {}}
        if ref is not None:
            try:
                dec = RefDecoder(ref, batch, PROMPT_LEN + steps + 8)
                row["tokens_per_s"][REF] = decode_rate(dec.prefill, dec.decode, prompt, steps)
                row["state_bytes"][REF] = dec.state_bytes
                del dec
            except Exception as exc:
                print(f"  [decode {batch} {REF}] failed: {type(exc).__name__}: {exc}"[:400], file=sys.stderr, flush=True)
                row["tokens_per_s"][REF] = None
        for key, lowered in ours.items():
            row["tokens_per_s"][key], row["state_bytes"][key] = _our_decode_rate(lowered, prompt, steps)
            empty_cache()
        log(f"  decode batch {batch}: " + ", ".join(
            f"{k} {v:.0f} tok/s" if v else f"{k} failed" for k, v in row["tokens_per_s"].items()))
        rows.append(row)
    return rows


def bench_breakdown(ours: dict, ref, shapes, decode_batches, vocab: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), device=DEVICE)
        label = f"{batch}x{length}"
        out[label] = {}
        if ref is not None:
            out[label][REF] = kernel_breakdown(lambda: ref(ids).logits)
        for key, lowered in ours.items():
            out[label][key] = kernel_breakdown(lambda: lowered(ids))
        log(f"  breakdown {label}: " + "; ".join(
            f"{k} " + ", ".join(f"{kind} {v[kind]:.2f}" for kind in (*KINDS, "total")) for k, v in out[label].items()))
    for batch in decode_batches:
        prompt = torch.randint(0, vocab, (batch, PROMPT_LEN), device=DEVICE)
        label = f"decode {batch}"
        out[label] = {}
        token = prompt[:, -1]
        if ref is not None:
            dec = RefDecoder(ref, batch, PROMPT_LEN + 64, cuda_graph=False)
            dec.prefill(prompt)
            out[label][REF] = kernel_breakdown(lambda: dec.decode(token), calls=5)
            del dec
        for key, lowered in ours.items():
            out[label][key] = _our_decode_breakdown(lowered, prompt)
            empty_cache()
        log(f"  breakdown {label}: " + "; ".join(
            f"{k} " + ", ".join(f"{kind} {v[kind]:.3f}" for kind in (*KINDS, "total")) for k, v in out[label].items()))
    return out


def bench_model(name: str, args, bandwidth: float, result: dict, save: Callable[[], None]) -> None:
    """Fills `result` section by section, calling `save` after each (a timeout keeps the rest)."""
    ours, ref, check, vocab = build(name, not args.smoke, args.recipes, args.rtn_weights, not args.no_hf_check)
    result.update(check=check, weight_bytes={**{k: weight_bytes(m) for k, m in ours.items()},
                                             **({REF: weight_bytes(ref)} if ref else {})},
                  prefill=[], decode=[])
    with torch.inference_mode():
        result["prefill"] = bench_prefill(ours, ref, args.prefill, not args.no_graph, vocab)
        save()
        result["decode"] = bench_decode(ours, ref, args.decode_batches, args.steps, vocab)
        for row in result["decode"]:
            row["limit_fraction"] = limit_fractions(row, result["weight_bytes"], bandwidth)
        save()
        if name in args.breakdown_models:
            result["breakdown"] = bench_breakdown(ours, ref, args.breakdown_shapes, args.breakdown_decode_batches,
                                                  vocab)
            save()


def limit_fractions(row: dict, weights: dict, bandwidth: float) -> dict:
    """Measured tokens/s over the bandwidth limit batch * bandwidth / bytes per step, with the bytes
    of the weights alone and of the weights plus the decode state read and written once each."""
    out = {}
    for impl, rate in row["tokens_per_s"].items():
        if not rate or impl not in weights:
            continue
        per_step = {"weights": weights[impl], "weights+state": weights[impl] + 2 * row["state_bytes"][impl]}
        out[impl] = {k: rate / (row["batch"] * bandwidth / b) for k, b in per_step.items()}
    return out


def _cell(value, fmt: str) -> str:
    return format(value, fmt) if value else "-"


def _ratio(ref, ours) -> str:
    return f"{ref / ours:.2f}x" if ref and ours else "-"


def _ours(results: list[dict]) -> list[str]:
    """Our rows' labels, in the order they were built (the weight table has every impl)."""
    return [k for k in results[0]["weight_bytes"] if k != REF] if results else [OURS]


def print_tables(results: list[dict], bandwidth: float) -> None:
    """Markdown tables (docs/benchmarks.md quotes them), one column pair per recipe: ratio =
    reference time / ours, > 1: we are faster."""
    ours = _ours(results)
    print(f"\nPrefill, ms per forward to logits (ratio = {REF} / ours; > 1: ours faster)\n")
    print(f"| model | B x L | {REF} fp16 ms | " + " | ".join(f"{k} ms | ratio" for k in ours)
          + f" | {REF} graph ms | " + " | ".join(f"{k} graph ms | ratio (graph)" for k in ours) + " |")
    print("|---|---|---|" + "---|---|" * len(ours) + "---|" + "---|---|" * len(ours))
    for r in results:
        for row in r["prefill"]:
            ms = row["ms"]
            plain = " | ".join(f"{_cell(ms.get(k), '.2f')} | {_ratio(ms.get(REF), ms.get(k))}" for k in ours)
            g_ref = ms.get(f"{REF} graph")
            graph = " | ".join(f"{_cell(ms.get(f'{k} graph'), '.2f')} | {_ratio(g_ref, ms.get(f'{k} graph'))}"
                               for k in ours)
            print(f"| {r['model']} | {row['shape'][0]} x {row['shape'][1]} | {_cell(ms.get(REF), '.2f')} | {plain} | "
                  f"{_cell(g_ref, '.2f')} | {graph} |")
    print(f"\nDecode, tokens/s, CUDA-graph steps (ratio = ours / {REF}; > 1: ours faster); share of the "
          f"bandwidth limit batch x {bandwidth / 1e12:.2f} TB/s / bytes per step (weights | weights + state r/w)\n")
    print(f"| model | batch | {REF} fp16 tok/s | " + " | ".join(f"{k} tok/s | ratio" for k in ours)
          + f" | {REF} % of limit | " + " | ".join(f"{k} % of limit" for k in ours) + " |")
    print("|---|---|---|" + "---|---|" * len(ours) + "---|" + "---|" * len(ours))
    for r in results:
        for row in r["decode"]:
            t, frac = row["tokens_per_s"], row.get("limit_fraction", {})
            share = lambda k: (f"{100 * frac[k]['weights']:.1f}% \\| {100 * frac[k]['weights+state']:.1f}%"  # noqa: E731
                               if k in frac else "-")
            rates = " | ".join(f"{_cell(t.get(k), '.0f')} | {_ratio(t.get(k), t.get(REF))}" for k in ours)
            print(f"| {r['model']} | {row['batch']} | {_cell(t.get(REF), '.0f')} | {rates} | {share(REF)} | "
                  + " | ".join(share(k) for k in ours) + " |")
    print("\nWeights and decode state (bytes per sequence); logits' relative error against HF fp32\n")
    impls = [REF, *ours]
    print("| model | " + " | ".join(f"{k} weights GB" for k in impls) + " | "
          + " | ".join(f"{k} state MiB/seq" for k in impls) + " | " + " | ".join(f"{k} logits error" for k in impls)
          + " |")
    print("|---|" + "---|---|---|" * len(impls))
    for r in results:
        wb, c = r["weight_bytes"], r["check"]
        row = r["decode"][0] if r["decode"] else {"batch": 1, "state_bytes": {}}
        state = lambda k: (f"{row['state_bytes'][k] / row['batch'] / 2**20:.2f}"  # noqa: E731
                           if k in row["state_bytes"] else "-")
        print(f"| {r['model']} | " + " | ".join(_cell(wb.get(k, 0) / 1e9, '.3f') for k in impls) + " | "
              + " | ".join(state(k) for k in impls) + " | "
              + " | ".join(_cell(c.get(f"{k} vs hf fp32"), '.4f') for k in impls) + " |")
    for r in results:
        if "breakdown" not in r:
            continue
        labels = list(r["breakdown"])
        print(f"\nKernel time by kind, {r['model']}, ms per call (torch.profiler, plain calls)\n")
        print("| kind | " + " | ".join(f"{label} {k}" for label in labels for k in impls) + " |")
        print("|---|" + "---|" * len(impls) * len(labels))
        for kind in (*KINDS, "total"):
            cells = []
            for label in labels:
                entry = r["breakdown"][label]
                digits = ".3f" if label.startswith("decode") else ".2f"
                cells += [format(entry[k][kind], digits) if k in entry else "-" for k in impls]
            print(f"| {kind} | " + " | ".join(cells) + " |")


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape BxL such as 8x2048, got {text!r}") from None
    return batch, length


def main(argv: list[str] | None = None) -> int:
    global DEVICE, BUDGET_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mamba-130m", "mamba-2.8b"])
    parser.add_argument("--prefill", nargs="*", type=_shape, default=PREFILL_SHAPES, metavar="BxL")
    parser.add_argument("--decode-batches", nargs="*", type=int, default=DECODE_BATCHES)
    parser.add_argument("--steps", type=int, default=DECODE_STEPS, help="timed decode steps")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph prefill rows")
    parser.add_argument("--breakdown-models", nargs="*", default=["mamba-2.8b"],
                        help="models to profile by kernel kind (none: no breakdown)")
    parser.add_argument("--breakdown-shapes", nargs="*", type=_shape, default=BREAKDOWN_SHAPES, metavar="BxL")
    parser.add_argument("--breakdown-decode-batches", nargs="*", type=int, default=BREAKDOWN_DECODE_BATCHES,
                        metavar="B", help="decode batch sizes to profile by kernel kind")
    parser.add_argument("--recipes", nargs="+", default=["quamba"],
                        help="our recipes to lower and time (default: quamba, labelled w8a8)")
    parser.add_argument("--rtn-weights", action="store_true",
                        help="4-bit recipes round weights to nearest instead of GPTQ (same kernels and bytes)")
    parser.add_argument("--no-hf-check", action="store_true",
                        help="skip comparing the logits with HF fp32's (Mamba-2's torch path takes minutes on "
                             "the GPU); the error columns then show '-'")
    parser.add_argument("--commit", default=None, help="the checkout's commit, recorded in the JSON")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU: mamba-tiny (or the --models ending in -tiny), tiny "
                             "shapes, our side only")
    args = parser.parse_args(argv)
    if args.smoke:
        DEVICE, BUDGET_S = "cpu", 0.0
        # The tiny built-ins only (mamba-tiny unless mamba2-tiny is asked for): --models' defaults
        # would take minutes on CPU.
        args.models = [m for m in args.models if m.endswith("-tiny")] or ["mamba-tiny"]
        args.breakdown_models = args.models
        args.prefill, args.breakdown_shapes = [(1, 8), (2, 16)], [(1, 16)]
        args.decode_batches, args.steps, args.breakdown_decode_batches = [1, 2], 3, [1, 2]
    else:
        from gpu_timing import require_gpu

        require_gpu("reference.py")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import transformers
    import triton

    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    meta = {"transformers": transformers.__version__, "commit": args.commit}
    if not args.smoke:
        try:  # enabled later by `mamba_ssm_from_hf`: the first HF fp32 check runs before mamba_ssm is importable
            import anchors  # noqa: F401
        except ImportError:
            _fail("cannot import anchors: put the reference stack's folder (/work/shared/anchors) on PYTHONPATH")
    print(f"device: {device}  torch {torch.__version__}  triton {triton.__version__}  transformers "
          f"{transformers.__version__}", flush=True)
    bandwidth = copy_bandwidth(2**30 if DEVICE == "cuda" else 2**24)
    log(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (bytes read + written)")
    results: list[dict] = []

    def save() -> None:  # after every section: a run cut short keeps what it measured
        if args.json:
            write_json(args.json, device, meta, copy_bandwidth_bytes_per_s=bandwidth, results=results)

    for name in args.models:
        torch.manual_seed(1)  # the same token ids for every model and run
        results.append({"model": name})
        bench_model(name, args, bandwidth, results[-1], save)
        if "mamba_ssm" in sys.modules:
            meta["mamba_ssm"] = getattr(sys.modules["mamba_ssm"], "__version__", "?")
        empty_cache()
    print_tables(results, bandwidth)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
