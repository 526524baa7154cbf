"""Byte-level text for calibration, evaluation and training: one token per UTF-8 byte, vocab 256.

Bytes need no tokenizer (nothing to download) and make bits-per-byte the natural metric, comparable
across models whatever their vocabulary. The text is WikiText-2 as shipped in the shared data folder:
`valid.txt` trains and calibrates, `test.txt` evaluates; never evaluate on what you calibrated on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import QuambaError

VOCAB_SIZE = 256
WIKITEXT_ENV = "QUAMBA_FX_WIKITEXT"
WIKITEXT_SPLITS = ("valid", "test")
_WIKITEXT_SUBDIR = Path("shared") / "data" / "wikitext-2"


class TextDataNotFoundError(QuambaError, FileNotFoundError):
    """A text file (or the WikiText-2 folder) is not where it was looked for."""


class EmptyTextError(QuambaError, ValueError):
    """A text file holds no bytes, or too few for the windows asked of it."""


def _ancestors(start: Path) -> list[Path]:
    start = start.resolve()
    return [start, *start.parents]


def wikitext_search_dirs(search_from: Iterable[Path] | None = None) -> list[Path]:
    """The `shared/data/wikitext-2` folders `find_wikitext` tries, in order (the env var aside).

    By default it walks up from the working directory and from this file: the checkout sits beside
    `shared/` (`/work/main` and `/work/shared`, or `../shared` in CI), and either start may be the
    one that reaches it (a test run from elsewhere, or an installed copy of the package).
    """
    starts = list(search_from) if search_from is not None else [Path.cwd(), Path(__file__).parent]
    seen: dict[Path, None] = {}
    for start in starts:
        for ancestor in _ancestors(Path(start)):
            seen.setdefault(ancestor / _WIKITEXT_SUBDIR, None)
    return list(seen)


def find_wikitext(split: str, search_from: Iterable[Path] | None = None) -> Path:
    """The path of WikiText-2's `{split}.txt` (`split` is "valid" or "test").

    The directory named by the environment variable QUAMBA_FX_WIKITEXT wins; when it is set, it
    must hold the file (a mistyped override should fail, not quietly read another copy). Otherwise
    the first of `wikitext_search_dirs(search_from)` that holds the file is used.
    """
    if split not in WIKITEXT_SPLITS:
        raise ValueError(f"unknown WikiText-2 split {split!r}; expected one of {WIKITEXT_SPLITS}")
    name = f"{split}.txt"
    override = os.environ.get(WIKITEXT_ENV)
    if override:
        path = Path(override).expanduser() / name
        if path.is_file():
            return path
        raise TextDataNotFoundError(
            f"{WIKITEXT_ENV}={override!r} is set but {path} does not exist; point it at a folder "
            f"holding WikiText-2's valid.txt and test.txt, or unset it to search shared/data/wikitext-2"
        )
    tried = wikitext_search_dirs(search_from)
    for folder in tried:
        if (folder / name).is_file():
            return folder / name
    listing = "\n  ".join(str(folder) for folder in tried)
    raise TextDataNotFoundError(
        f"WikiText-2 {name} not found. Looked in:\n  {listing}\n"
        f"Set {WIKITEXT_ENV} to the folder holding valid.txt and test.txt, e.g. "
        f"`export {WIKITEXT_ENV}=/path/to/shared/data/wikitext-2`."
    )


def load_bytes(path: str | Path) -> torch.Tensor:
    """The bytes of a file as a 1-D int64 tensor of token ids in [0, 256)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise TextDataNotFoundError(f"text file {path} {what}")
    data = path.read_bytes()
    if not data:
        raise EmptyTextError(f"text file {path} is empty; byte-level data needs at least one byte")
    # frombuffer wants a writable buffer to avoid a warning; bytearray copies once, then we widen.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def _check_ids(ids: torch.Tensor, seq_len: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if ids.numel() < seq_len:
        raise EmptyTextError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")


def _windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    offsets = torch.arange(seq_len, device=ids.device)
    return ids[starts.to(ids.device)[:, None] + offsets]


def chunk_sequences(
    ids: torch.Tensor,
    seq_len: int,
    num_sequences: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Deterministic windows of `seq_len` token ids (bytes, or a tokenizer's ids: see
    `quamba_fx.text`), as a LongTensor [N, seq_len].

    - Neither `num_sequences` nor `stride`: every non-overlapping window from the start of the text.
    - `num_sequences` alone: that many non-overlapping windows spread evenly over the whole text, the
      first at token 0 and the last ending at the final token, so a small calibration set still samples
      the whole text rather than its first articles.
    - `stride` (with or without `num_sequences`): windows starting at 0, stride, 2*stride, ... (the
      first `num_sequences` of them); a stride below `seq_len` gives overlapping windows.
    """
    _check_ids(ids, seq_len)
    total = ids.numel()
    if stride is not None:
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        starts = torch.arange(0, total - seq_len + 1, stride)
        if num_sequences is not None:
            if num_sequences > starts.numel():
                raise EmptyTextError(
                    f"asked for {num_sequences} windows of {seq_len} tokens at stride {stride}, "
                    f"but the text ({total} tokens) holds only {starts.numel()}"
                )
            starts = starts[:num_sequences]
    elif num_sequences is None:
        starts = torch.arange(0, total - seq_len + 1, seq_len)
    else:
        starts = _evenly_spaced_starts(total, seq_len, num_sequences)
    return _windows(ids, starts, seq_len)


def _evenly_spaced_starts(total: int, seq_len: int, num_sequences: int) -> torch.Tensor:
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be at least 1, got {num_sequences}")
    available = total // seq_len
    if num_sequences > available:
        raise EmptyTextError(
            f"asked for {num_sequences} non-overlapping windows of {seq_len} tokens, "
            f"but the text ({total} tokens) holds only {available}"
        )
    if num_sequences == 1:
        return torch.zeros(1, dtype=torch.long)
    # Integer floor of i * span / (n - 1): the gaps are >= floor(span / (n - 1)) >= seq_len, because
    # total >= n * seq_len, so the windows never overlap.
    span = total - seq_len
    return torch.arange(num_sequences, dtype=torch.long) * span // (num_sequences - 1)


def random_batches(
    ids: torch.Tensor,
    batch: int,
    seq_len: int,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """An endless stream of [batch, seq_len] windows at uniformly random offsets, for training.

    Offsets are drawn on the CPU from `generator`, so a seed gives the same stream on any device;
    the windows are cut from `ids` on whatever device it lives on.
    """
    _check_ids(ids, seq_len)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    high = ids.numel() - seq_len + 1
    while True:
        starts = torch.randint(0, high, (batch,), generator=generator)
        yield _windows(ids, starts, seq_len)


def next_byte_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats of predicting byte t+1 from the logits at position t.

    `logits` is [..., L, V] and `ids` the [..., L] windows they were computed from: the logits at
    the last position predict past the window and are dropped, and the first byte of each window
    is never scored, since nothing before it in the window predicts it. Computed in fp32.
    """
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)} (+ vocab dim)")
    if ids.shape[-1] < 2:
        raise ValueError("windows need at least 2 bytes: the first byte of a window is never scored")
    predictions = logits[..., :-1, :].float()
    targets = ids[..., 1:]
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1))


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """`next_byte_loss` converted from nats to bits (divided by ln 2): 8.0 for a uniform predictor.

    `targets` are the same windows the logits were computed from (not pre-shifted); see
    `next_byte_loss` for the shift.
    """
    return next_byte_loss(logits, targets).item() / math.log(2)
