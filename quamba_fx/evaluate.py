"""Accuracy of a (quantized) model on text: bits per byte, perplexity per token, and agreement
with a reference model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .text import TextCodec
from .textdata import next_byte_loss

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    """Bits per byte of the model and, against a reference model on the same windows: its bits per
    byte, the mean KL(reference || model) in nats per position, the top-1 agreement, and the
    relative error of the logits ||model - reference|| / ||reference|| (meaningful even where the
    softmax saturates, e.g. on random weights).

    Bits per byte are the summed nats of every scored token / ln 2 / the UTF-8 bytes those tokens
    decode to (`scored_bytes`), so tokenized and byte-level models compare; `perplexity` is per
    token (per byte for a byte-level model), exp(nats / `scored_tokens`)."""

    bits_per_byte: float
    windows: int
    seq_len: int
    reference_bits_per_byte: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    logits_rel_error: float | None = None
    perplexity: float | None = None
    reference_perplexity: float | None = None
    scored_tokens: int | None = None
    scored_bytes: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def scored_byte_count(windows: torch.Tensor, codec: TextCodec | None) -> int:
    """UTF-8 bytes of the tokens `evaluate` scores: every token of each window but its first.

    Each window's scored tokens are decoded on their own, so a character split across a window's
    first two tokens counts as U+FFFD (3 bytes); windows are hundreds of tokens, so this is noise.
    """
    if codec is None:
        return windows.shape[0] * (windows.shape[1] - 1)
    return sum(codec.byte_count(row[1:]) for row in windows.tolist())


@torch.inference_mode()
def evaluate(
    logits_fn: LogitsFn,
    windows: torch.Tensor,
    reference_fn: LogitsFn | None = None,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "evaluating",
    device: str | torch.device | None = None,
    codec: TextCodec | None = None,
) -> EvalResult:
    """Score `logits_fn` (ids [B, L] -> logits [B, L, V]) on `windows` [N, L] of token ids.

    Every window scores L-1 next-token predictions; all windows have the same length, so means over
    batches weighted by batch size are means over positions. `codec` (see `quamba_fx.text`) counts
    the bytes for bits per byte; None means byte-level ids, one byte per token. `device` moves each
    batch of ids there (windows can stay on the CPU).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"expected windows of shape [N>0, L>1], got {tuple(windows.shape)}")
    nats = ref_nats = kl = agree = rel = 0.0  # nats: summed over every scored token
    n = windows.shape[0]
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        batch = windows[start:start + batch_size]
        if device is not None:
            batch = batch.to(device)
        logits = logits_fn(batch).float()
        scored = batch[:, 1:].numel()
        nats += next_byte_loss(logits, batch).item() * scored
        if reference_fn is None:
            continue
        ref = reference_fn(batch).float()
        ref_nats += next_byte_loss(ref, batch).item() * scored
        log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
        kl += (log_p.exp() * (log_p - log_q)).sum(-1).mean().item() * batch.shape[0]
        agree += (ref.argmax(-1) == logits.argmax(-1)).float().mean().item() * batch.shape[0]
        rel += ((logits - ref).norm() / ref.norm()).item() * batch.shape[0]
    tokens = n * (windows.shape[1] - 1)
    scored_bytes = scored_byte_count(windows, codec)
    if scored_bytes == 0:
        raise ValueError("the scored tokens decode to no text (0 bytes): bits per byte are undefined")
    result = EvalResult(
        nats / scored_bytes / math.log(2), n, windows.shape[1],
        perplexity=math.exp(nats / tokens), scored_tokens=tokens, scored_bytes=scored_bytes,
    )
    if reference_fn is not None:
        result.reference_bits_per_byte = ref_nats / scored_bytes / math.log(2)
        result.reference_perplexity = math.exp(ref_nats / tokens)
        result.kl_divergence = kl / n
        result.top1_agreement = agree / n
        result.logits_rel_error = rel / n
    return result
