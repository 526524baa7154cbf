"""Quantized accuracy on CPU: the trained byte model on WikiText-2, and a 130m-shaped model with outliers.

    python benchmarks/accuracy.py [--windows 64] [--seq-len 512] [--synthetic-layers 24]
                                  [--recipes naive quamba fp8 naive-w4a8 quamba2-w4a8 naive-w4a16 quamba2-w4a16]
                                  [--skip-bytes-model] [--skip-synthetic]
                                  [--bytes-model mamba-bytes-wt2 | mamba2-bytes-wt2]

1. the trained byte model (`--bytes-model`, default mamba-bytes-wt2): bits per byte on test.txt (fp32 and each recipe), calibrated on valid.txt, plus
   KL(fp32 || quantized) and top-1 agreement.
2. A random model of mamba-130m's shape with 4 injected outlier channels (x100) per block at
   out_proj's input (quamba_fx.synthetic): KL and top-1 agreement of each recipe against its own
   float graph, on byte windows of WikiText-2 used as token ids.
"""

from __future__ import annotations

import argparse
import time

import torch

import quamba_fx
from quamba_fx import textdata
from quamba_fx.commands import state_bytes
from quamba_fx.synthetic import inject_out_proj_outliers, reinit_like_mamba_ssm


def windows(split: str, seq_len: int, count: int) -> torch.Tensor:
    return textdata.chunk_sequences(textdata.load_bytes(textdata.find_wikitext(split)), seq_len, num_sequences=count)


def compare(model, calib: torch.Tensor, held_out: torch.Tensor, batch: int, recipes: list) -> dict:
    gm = quamba_fx.capture(model)
    rows = {"fp32": quamba_fx.evaluate(gm, held_out, batch_size=batch, progress=False)}
    for recipe in recipes:
        started = time.perf_counter()
        qm = quamba_fx.quantize(gm, calib.split(batch), recipe=recipe, progress=False)
        rows[recipe] = quamba_fx.evaluate(qm, held_out, gm, batch_size=batch, progress=False)
        rows[recipe].seconds = time.perf_counter() - started
        rows[recipe].bytes = state_bytes(qm, float_bytes=2)
    rows["fp32"].bytes = state_bytes(gm, float_bytes=2)
    return rows


def print_rows(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"{'recipe':<13} {'bits/byte':>9} {'vs fp32':>8} {'KL':>8} {'top-1':>7} {'logit rel err':>13} {'state MB':>9}")
    base = rows["fp32"].bits_per_byte
    for name, r in rows.items():
        rel = "" if name == "fp32" else f"{r.bits_per_byte / base - 1:+.2%}"
        kl = "" if r.kl_divergence is None else f"{r.kl_divergence:.5f}"
        top1 = "" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
        err = "" if r.logits_rel_error is None else f"{r.logits_rel_error:.4f}"
        print(f"{name:<13} {r.bits_per_byte:>9.4f} {rel:>8} {kl:>8} {top1:>7} {err:>13} {r.bytes / 1e6:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--synthetic-layers", type=int, default=24)
    parser.add_argument("--synthetic-windows", type=int, default=4)
    parser.add_argument("--recipes", nargs="+", default=["naive", "quamba", "fp8"], help="registered recipe names")
    parser.add_argument("--skip-bytes-model", action="store_true", help="only the synthetic check")
    parser.add_argument("--skip-synthetic", action="store_true", help="only the trained byte model")
    parser.add_argument("--bytes-model", default="mamba-bytes-wt2", choices=["mamba-bytes-wt2", "mamba2-bytes-wt2"],
                        help="the trained byte model of part 1")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if not args.skip_bytes_model:
        byte_rows = compare(quamba_fx.load_model(args.bytes_model), windows("valid", args.seq_len, args.calib_windows),
                            windows("test", args.seq_len, args.windows), batch=8, recipes=args.recipes)
        print_rows(f"{args.bytes_model}, {args.windows} x {args.seq_len} bytes of test.txt "
                   f"(calibration {args.calib_windows} x {args.seq_len} of valid.txt)", byte_rows)
    if args.skip_synthetic:
        return
    config = quamba_fx.builtin_config("mamba-130m")
    config.num_hidden_layers = args.synthetic_layers
    model = reinit_like_mamba_ssm(quamba_fx.random_model(config, seed=0))
    inject_out_proj_outliers(model, channels=4, factor=100.0)
    synth_rows = compare(model, windows("valid", 128, args.synthetic_windows),
                         windows("test", 128, args.synthetic_windows), batch=2, recipes=args.recipes)
    print_rows(f"mamba-130m shape ({args.synthetic_layers} layers, random weights, 4 outlier channels x100 "
               f"per block at out_proj's input; in/x/out_proj re-drawn like mamba_ssm); random logits saturate the softmax, "
               f"so compare the logits' relative error", synth_rows)


if __name__ == "__main__":
    main()
