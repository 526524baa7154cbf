"""GPU check of the torch.compile backend: compiled == eager, and how long each takes.

    python benchmarks/compile_check.py [--seq-len 256] [--batch 4]

For mamba-bytes-wt2: the float graph, the W8A8 graph and the fused W8A8 graph, each run eagerly
and through `torch.compile(..., backend="quamba")`, on CUDA. Prints max |compiled - eager| / max
|eager| and median milliseconds per forward (CUDA events via triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import quamba_fx
from quamba_fx import textdata


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("compile_check needs a CUDA device", file=sys.stderr)
        return 2
    import triton.testing

    valid = textdata.load_bytes(textdata.find_wikitext("valid"))
    calib = textdata.chunk_sequences(valid, 256, num_sequences=8)
    model = quamba_fx.load_model("mamba-bytes-wt2")
    float_gm = quamba_fx.capture(model)
    quantized = quamba_fx.quantize(float_gm, calib.split(4), recipe="quamba", progress=False)
    graphs = {"float": float_gm, "w8a8": quantized, "w8a8+fused": quamba_fx.fuse(quantized)}
    ids = textdata.chunk_sequences(textdata.load_bytes(textdata.find_wikitext("test")), args.seq_len,
                                   num_sequences=args.batch).cuda()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch} x {args.seq_len}")
    print(f"{'graph':<11} {'eager ms':>9} {'compiled ms':>11} {'compile s':>9} {'rel diff':>9}")
    for name, gm in graphs.items():
        gm = gm.cuda()
        with torch.no_grad():
            eager = gm(ids)
            compiled_fn = torch.compile(gm, backend="quamba")
            started = time.perf_counter()
            compiled = compiled_fn(ids)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            rel = ((compiled - eager).abs().max() / eager.abs().max()).item()
            eager_ms = triton.testing.do_bench(lambda: gm(ids), warmup=5, rep=50, return_mode="median")
            compiled_ms = triton.testing.do_bench(lambda: compiled_fn(ids), warmup=5, rep=50, return_mode="median")
        print(f"{name:<11} {eager_ms:>9.2f} {compiled_ms:>11.2f} {compile_s:>9.1f} {rel:>9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
