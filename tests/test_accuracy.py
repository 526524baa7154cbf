"""Accuracy of the W8A8 recipes on the trained byte model and on WikiText-2 text.

Measured (benchmarks/accuracy.py, 64 x 512 bytes of test.txt): fp32 1.8734 bits/byte, naive +6.0%,
quamba +0.08% (+0.17% before its head was W8A8, session 55). These tests use fewer windows; their
margins are set so a regression that loses the percentile scale, the Hadamard rotation or the
per-block scales fails them.
"""

from __future__ import annotations

import pytest
import torch

import quamba_fx
from quamba_fx import textdata


def windows(split: str, count: int, seq_len: int = 512) -> torch.Tensor:
    return textdata.chunk_sequences(textdata.load_bytes(textdata.find_wikitext(split)), seq_len, num_sequences=count)


@pytest.fixture(scope="module")
def results():
    gm = quamba_fx.capture(quamba_fx.load_model("mamba-bytes-wt2"))
    calib, held_out = windows("valid", 16), windows("test", 16)
    out = {}
    for recipe in ("naive", "quamba"):
        qm = quamba_fx.quantize(gm, calib.split(8), recipe=recipe, progress=False)
        out[recipe] = quamba_fx.evaluate(qm, held_out, gm, batch_size=8, progress=False)
    return out


@pytest.mark.slow
def test_float_model_is_a_real_language_model(results):
    # A uniform byte predictor scores 8 bits/byte; the trained model ~1.86 on the full test set.
    assert 1.6 < results["quamba"].reference_bits_per_byte < 2.1


@pytest.mark.slow
def test_quamba_w8a8_is_within_2_percent_of_fp32(results):
    r = results["quamba"]
    assert r.bits_per_byte / r.reference_bits_per_byte - 1 < 0.02
    assert r.kl_divergence < 0.01 and r.top1_agreement > 0.95


@pytest.mark.slow
def test_quamba_is_clearly_better_than_naive(results):
    naive, quamba = results["naive"], results["quamba"]
    assert naive.bits_per_byte / naive.reference_bits_per_byte - 1 > 0.03
    assert quamba.kl_divergence < naive.kl_divergence / 10
    assert quamba.top1_agreement > naive.top1_agreement + 0.05
