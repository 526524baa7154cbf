"""Decode tokens/s of one lowered model under each value of a module setting, in one process: the
A/B of a kernel rule (e.g. the L2 prefetch window) without rebuilding the model per variant.

    python benchmarks/decode_settings.py --set quamba_fx.kernels.pdl.L2_WINDOW_BYTES=0,4194304,8388608
        [--model mamba-2.8b] [--recipe quamba] [--rtn-weights] [--batches 1 16 64] [--rounds 2] [--ref]
        [--greedy] [--commit SHA] [--json PATH] [--smoke]

`--set MODULE.NAME=V1,V2,...` (Python literals; repeat the flag for a grid of every combination) is
assigned before each variant's `quamba_fx.Generator` is built and its decode step captured, so it
must be a setting read when a kernel is launched or its config chosen (the tuned-config caches are
emptied for each variant; a captured CUDA graph keeps what was read at capture). Variants run in
order within each round and the rounds repeat the whole order, so a drift of the GPU's clock shows
as a difference between rounds, not between variants. Every setting is put back at the end. `--ref`
also times mamba_ssm's CUDA-graph decode at the start of every round (needs /work/shared/anchors
on PYTHONPATH, as benchmarks/reference.py does); the ratios divide by its mean.

Rows are tokens/s of greedy decode steps replayed from CUDA graphs after a 16-token prompt (as
reference.py times them: a replay, then the argmax, a step); with `--greedy`, of
`Generator.greedy`, whose graphs hold the argmax and `quamba_fx.runtime.STEPS_PER_GRAPH` steps
(`--greedy --set quamba_fx.runtime.STEPS_PER_GRAPH=1,8,32`: what the host's gap between replays
costs). The table gives each round, the mean, and the mean over the first variant's, and (for
CUDA-graph steps) how many leading greedy steps gave the first variant's tokens at that batch in
every round: a variant that computes something else (a kernel wrong on this GPU) departs at
once, while kernels that round differently (an FMA contracted or not) may agree throughout or
depart later, as greedy decoding amplifies any difference. `--smoke` checks the script on CPU
(mamba-tiny, a few plain steps; the numbers mean nothing there). docs/benchmarks.md (session 29)
has the L2 window sweep this script reproduces.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from quamba_fx.kernels.dispatch import clear_tuned_configs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference, gpu_timing (also when imported by a test)
import reference as R  # noqa: E402
from gpu_timing import setting_grid, write_json  # noqa: E402


def parse_setting(text: str) -> tuple[object, str, list]:
    """`MODULE.NAME=V1,V2,...` -> (module, NAME, [values]); a clear error for a name that does not
    exist (a typo must not silently time the same setting twice) or a value that is no literal."""
    name, sep, values = text.partition("=")
    module_name, _, attr = name.rpartition(".")
    if not sep or not module_name or not attr or not values:
        raise ValueError(f"--set {text!r}: expected MODULE.NAME=V1,V2,...")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--set {text!r}: cannot import {module_name}: {exc}") from exc
    if not hasattr(module, attr):
        raise ValueError(f"--set {text!r}: {module_name} has no attribute {attr}")
    parsed = []
    for value in values.split(","):
        try:
            parsed.append(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"--set {text!r}: {value!r} is not a Python literal") from exc
    return module, attr, parsed


def leading_equal_steps(tokens: torch.Tensor, first: torch.Tensor) -> int:
    """How many leading steps of greedy `tokens [steps, B]` equal `first`'s in every sequence."""
    differ = (tokens != first).any(dim=1).nonzero()
    return int(differ[0]) if differ.numel() else tokens.shape[0]


def label(variant: dict) -> str:
    return ", ".join(f"{attr}={value!r}" for (_, attr), value in variant.items())


def time_reference(ref, prompts: dict[int, torch.Tensor], steps: int, result: dict) -> None:
    """One round of mamba_ssm's CUDA-graph decode at every batch, into `result`: its rates a round
    (`mamba_ssm_rounds`) and their mean (`mamba_ssm`, what the ratios divide by). Timed in every
    round, as our variants are, because its figure drifts too (2.4% between two processes at
    batch 16 in session 58): one sample would put that drift into every ratio."""
    rounds = result.setdefault("mamba_ssm_rounds", {})
    means = result.setdefault("mamba_ssm", {})
    for batch, prompt in prompts.items():
        dec = R.RefDecoder(ref, batch, R.PROMPT_LEN + steps + 8)
        rate = R.decode_rate(dec.prefill, dec.decode, prompt, steps)
        del dec
        rounds.setdefault(str(batch), []).append(rate)
        means[str(batch)] = statistics.fmean(rounds[str(batch)])
        R.log(f"  mamba_ssm batch {batch}: {rate:.0f} tok/s")


def run(args: argparse.Namespace, settings: list[tuple[object, str, list]],
        save: Callable[[dict], None] = lambda result: None) -> dict:
    """Time every variant of `settings` (`parse_setting`'s) at every batch for `args.rounds` rounds;
    returns the results dict, also handed to `save` after every row (a run cut short keeps what it
    measured)."""
    grid = setting_grid(settings)
    saved = {(module, attr): getattr(module, attr) for module, attr, _ in settings}
    ours, ref, check, vocab = R.build(args.model, args.ref, [args.recipe], args.rtn_weights)
    lowered = ours[R.recipe_label(args.recipe)]
    torch.manual_seed(1)
    prompts = {b: torch.randint(0, vocab, (b, R.PROMPT_LEN), device=R.DEVICE) for b in args.batches}
    result: dict = {"model": args.model, "recipe": args.recipe, "check": check, "greedy": args.greedy,
                    "variants": [label(v) for v in grid], "rows": []}
    first_tokens: dict[int, torch.Tensor] = {}  # batch -> the first variant's greedy tokens [steps, B]
    try:
        with torch.inference_mode():
            for round_ in range(args.rounds):
                if ref is not None:
                    time_reference(ref, prompts, args.steps, result)
                    save(result)
                for variant in grid:
                    for (module, attr), value in variant.items():
                        setattr(module, attr, value)
                    # Configs chosen under the last variant would outlive it (the caches are keyed
                    # by problem, not by setting): each variant chooses its own.
                    clear_tuned_configs()
                    for batch, prompt in prompts.items():
                        tokens: list = []
                        rate = (R.our_greedy_rate(lowered, prompt, args.steps) if args.greedy
                                else R._our_decode_rate(lowered, prompt, args.steps, tokens)[0])
                        row = {"variant": label(variant), "round": round_, "batch": batch, "tokens_per_s": rate}
                        if tokens:
                            steps = torch.stack(tokens).cpu()
                            first_tokens.setdefault(batch, steps)
                            row["equal_steps"] = leading_equal_steps(steps, first_tokens[batch])
                        result["rows"].append(row)
                        R.log(f"  round {round_} {label(variant)} batch {batch}: {rate:.0f} tok/s")
                        save(result)
                        R.empty_cache()
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)
    return result


def print_table(result: dict, batches: list[int]) -> None:
    names = result["variants"]
    how = "Generator.greedy" if result.get("greedy") else "CUDA-graph steps"
    print(f"\nDecode tokens/s, {result['model']} {result['recipe']}, {how} "
          "(rounds; mean; mean / first variant's)")
    ref = "mamba_ssm" in result
    equal = any("equal_steps" in row for row in result["rows"])
    print("| variant | batch | rounds | mean | vs first |" + (" vs mamba_ssm |" if ref else "")
          + (" steps with the first's tokens |" if equal else ""))
    print("|---|---|---|---|---|" + ("---|" if ref else "") + ("---|" if equal else ""))
    means = {(row["variant"], row["batch"]): [] for row in result["rows"]}
    agree = {(row["variant"], row["batch"]): [] for row in result["rows"]}
    for row in result["rows"]:
        means[(row["variant"], row["batch"])].append(row["tokens_per_s"])
        agree[(row["variant"], row["batch"])].append(row.get("equal_steps"))
    for name in names:
        for batch in batches:
            rates = means[(name, batch)]
            mean, first = statistics.fmean(rates), statistics.fmean(means[(names[0], batch)])
            cells = [name, str(batch), " / ".join(f"{r:.0f}" for r in rates), f"{mean:.0f}", f"{mean / first:.3f}x"]
            if ref:
                cells.append(f"{mean / result['mamba_ssm'][str(batch)]:.2f}x")
            if equal:
                cells.append(str(min(agree[(name, batch)])))
            print("| " + " | ".join(cells) + " |")
    for batch in batches if ref else ():
        rates = result["mamba_ssm_rounds"][str(batch)]
        cells = ["mamba_ssm", str(batch), " / ".join(f"{r:.0f}" for r in rates),
                 f"{result['mamba_ssm'][str(batch)]:.0f}", "", "1.00x"] + ([""] if equal else [])
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", required=True, metavar="MODULE.NAME=V1,V2,...")
    parser.add_argument("--model", default="mamba-2.8b")
    parser.add_argument("--recipe", default="quamba", help="the recipe lowered (reference.py's --recipes names)")
    parser.add_argument("--rtn-weights", action="store_true",
                        help="4-bit recipes round their weights to nearest instead of running GPTQ (faster)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=R.DECODE_STEPS, help="timed decode steps")
    parser.add_argument("--ref", action="store_true", help="also time mamba_ssm's decode, once a round")
    parser.add_argument("--greedy", action="store_true",
                        help="time our steps through Generator.greedy (graphs of STEPS_PER_GRAPH steps)")
    parser.add_argument("--commit", default=None, help="the checkout's commit, recorded in the JSON")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--smoke", action="store_true", help="check the script on CPU: mamba-tiny, a few steps")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or min(args.batches) < 1:
        parser.error("--rounds, --steps and every batch must be at least 1")
    if args.smoke:
        if args.ref:
            parser.error("--smoke runs our side only; drop --ref")
        R.DEVICE = "cpu"
        args.model, args.steps = "mamba-tiny", min(args.steps, 3)
        device = "cpu (smoke run)"
    else:
        from gpu_timing import require_gpu

        device = require_gpu("decode_settings.py")
    try:
        settings = [parse_setting(text) for text in args.set]
    except ValueError as exc:
        parser.error(str(exc))
    meta = {"commit": args.commit, "command": sys.argv[1:] if argv is None else argv}

    def save(result: dict) -> None:
        if args.json:
            write_json(args.json, device, meta, result=result)

    result = run(args, settings, save)
    print_table(result, args.batches)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
