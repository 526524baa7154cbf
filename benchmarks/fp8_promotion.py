"""What promoting the fp8 tensor cores' partial sums into fp32 buys and costs in a whole model, in one
process: the accuracy of the trained byte model and the prefill time of a large one.

    python benchmarks/fp8_promotion.py [--model mamba-2.8b] [--shape 8x2048] [--windows 64] [--rounds 2]
        [--ref] [--commit SHA] [--json PATH] [--smoke]

Variants (module settings of `quamba_fx.kernels.gemm_fp8`, put back at the end):

* default   -- the prefill GEMM (gemm_tma's persistent kernel, 256 rows or more) never promotes;
* promoted  -- it promotes every 128 products (`_PREFILL_PROMOTE_K = 128`, once a K step);
* scaled_mm -- `torch._scaled_mm` (cuBLASLt, not fast-accumulating) instead of our kernels.

For each: bits per byte of `mamba-bytes-wt2` on `--windows` 512-byte windows of WikiText-2's test
split, quantized with the fp8 recipe (calibrated on valid) and lowered on the GPU, against its fp32
model and the fp8 CPU reference graph; then `--model` (random seeded weights) lowered once with the
fp8 recipe: its logits' relative error against HF fp32 on 1 x 1024 (M >= 256: the prefill kernel)
and its `--shape` prefill replayed from a CUDA graph, with our int8 path (`quamba`) in every round
and, with `--ref`, mamba_ssm fp16 (needs /work/shared/anchors on PYTHONPATH). docs/benchmarks.md,
session 40, has the run that set the default. `--smoke` checks the script on CPU (mamba-tiny, two
short windows; the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference, gpu_timing, e2e (also when imported by a test)
import reference as R  # noqa: E402
from gpu_timing import write_json  # noqa: E402

VARIANTS = {  # name: (_PREFILL_PROMOTE_K, backend)
    "default": (None, "triton"),
    "promoted": (128, "triton"),
    "scaled_mm": (None, "scaled_mm"),
}
_BACKEND_VARIABLE = "QUAMBA_FX_FP8_GEMM"


def apply(variant: str) -> None:
    from quamba_fx.kernels import gemm_fp8

    gemm_fp8._PREFILL_PROMOTE_K, backend = VARIANTS[variant]
    os.environ[_BACKEND_VARIABLE] = backend


def bytes_model_rows(windows: int, seq_len: int) -> dict:
    """Bits per byte of mamba-bytes-wt2: fp32, the fp8 CPU reference, each variant lowered."""
    import quamba_fx
    from quamba_fx import textdata

    gm = quamba_fx.capture(quamba_fx.load_model("mamba-bytes-wt2"))
    held = textdata.chunk_sequences(textdata.load_bytes(textdata.find_wikitext("test")), seq_len, num_sequences=windows)
    calib = textdata.chunk_sequences(textdata.load_bytes(textdata.find_wikitext("valid")), seq_len, num_sequences=32)
    rows = {"fp32": quamba_fx.evaluate(gm, held, batch_size=16, progress=False).bits_per_byte}
    qm = quamba_fx.quantize(gm, calib.split(8), recipe="fp8", progress=False)
    rows["fp8 cpu reference"] = quamba_fx.evaluate(qm, held, batch_size=16, progress=False).bits_per_byte
    # The settings are read at each GEMM call (the tuned configs are keyed by them): one lowered
    # graph serves every variant.
    lowered = quamba_fx.lower(qm).to(R.DEVICE)
    for variant in VARIANTS:
        apply(variant)
        rows[variant] = quamba_fx.evaluate(lowered, held, batch_size=16, progress=False, device=R.DEVICE).bits_per_byte
        R.log(f"  mamba-bytes-wt2 {variant}: {rows[variant]:.5f} bits/byte (fp32 {rows['fp32']:.5f})")
    return rows


def model_rows(name: str, shape: tuple[int, int], check_len: int, rounds: int, with_ref: bool,
               out: dict, save) -> None:
    """Fills `out` with the logits' error against HF fp32 per variant and `shape` prefill ms per
    variant and round, calling `save` after each timed row."""
    import quamba_fx
    from e2e import random_model
    from gpu_timing import graphed

    model = random_model(name, R.DEVICE)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (1, 256), device=R.DEVICE)]
    ours = {r: quamba_fx.lower(quamba_fx.quantize(model, calib, recipe=r, progress=False)) for r in ("quamba", "fp8")}
    check_ids = torch.randint(0, vocab, (1, check_len), device=R.DEVICE)
    out.update(logits_error={}, ms={})
    with torch.inference_mode():
        hf = model(check_ids, use_cache=False).logits.float()
        ref = R.mamba_ssm_model(model, torch.float16) if with_ref else None
        del model
        out["logits_error"]["int8 (quamba)"] = R.rel_error(ours["quamba"](check_ids), hf)
        for variant in VARIANTS:
            apply(variant)
            out["logits_error"][variant] = R.rel_error(ours["fp8"](check_ids), hf)
        del hf
        R.empty_cache()
        ids = torch.randint(0, vocab, shape, device=R.DEVICE)
        impls = {"int8 (quamba)": lambda: ours["quamba"](ids)}
        if ref is not None:
            impls = {R.REF: lambda: ref(ids).logits, **impls}
        impls.update({variant: lambda: ours["fp8"](ids) for variant in VARIANTS})
        for round_ in range(rounds):
            for key, fn in impls.items():
                if key in VARIANTS:
                    apply(key)
                run = graphed(fn) if R.DEVICE == "cuda" else fn
                out["ms"].setdefault(key, []).append(R.time_ms(run, budget_s=R.BUDGET_S, max_reps=8))
                R.log(f"  round {round_} {name} {shape[0]}x{shape[1]} {key}: {out['ms'][key][-1]:.3f} ms")
                del run
                R.empty_cache()
                save()


def print_tables(result: dict) -> None:
    rows = result.get("bytes_model", {})
    if rows:
        print("\nmamba-bytes-wt2, bits per byte on WikiText-2 test (vs fp32)")
        for key, bpb in rows.items():
            print(f"| {key} | {bpb:.5f} | {bpb / rows['fp32'] - 1:+.3%} |")
    model = result.get("model_rows")
    if model:
        print(f"\n{result['model']} prefill {result['shape']}, ms per forward from a CUDA graph (rounds; mean); "
              "logits' relative error against HF fp32")
        for key, times in model["ms"].items():
            err = model["logits_error"].get(key)
            print(f"| {key} | {' / '.join(f'{t:.2f}' for t in times)} | {sum(times) / len(times):.2f} | "
                  + (f"{err:.4f} |" if err is not None else "- |"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mamba-2.8b")
    parser.add_argument("--shape", type=R._shape, default=(8, 2048), metavar="BxL")
    parser.add_argument("--windows", type=int, default=64, help="512-byte test windows for bits per byte")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ref", action="store_true", help="also time mamba_ssm fp16")
    parser.add_argument("--commit", default=None, help="the checkout's commit, recorded in the JSON")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--smoke", action="store_true", help="check the script on CPU: mamba-tiny, tiny shapes")
    args = parser.parse_args(argv)
    seq_len, check_len = 512, 1024
    if args.smoke:
        R.DEVICE, R.BUDGET_S = "cpu", 0.0
        args.model, args.shape, args.windows, args.rounds, args.ref = "mamba-tiny", (1, 16), 2, 1, False
        seq_len, check_len = 64, 16
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    else:
        from gpu_timing import require_gpu

        require_gpu("fp8_promotion.py")
    device = torch.cuda.get_device_name() if R.DEVICE == "cuda" else "cpu (smoke run)"
    result: dict = {"model": args.model, "shape": f"{args.shape[0]}x{args.shape[1]}"}

    def save() -> None:  # after every row: a run cut short keeps what it measured
        if args.json:
            write_json(args.json, device, {"commit": args.commit, "smoke": args.smoke}, **result)

    from quamba_fx.kernels import gemm_fp8

    saved = gemm_fp8._PREFILL_PROMOTE_K, os.environ.get(_BACKEND_VARIABLE)
    try:
        result["bytes_model"] = bytes_model_rows(args.windows, seq_len)
        save()
        result["model_rows"] = {}
        model_rows(args.model, args.shape, check_len, args.rounds, args.ref, result["model_rows"], save)
        save()
    finally:
        gemm_fp8._PREFILL_PROMOTE_K = saved[0]
        if saved[1] is None:
            os.environ.pop(_BACKEND_VARIABLE, None)
        else:
            os.environ[_BACKEND_VARIABLE] = saved[1]
    print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
