"""Text <-> token ids for every text command: UTF-8 bytes for byte-level models, a tokenizer otherwise.

A `TextCodec` encodes text to token ids, decodes ids to text, and counts the UTF-8 bytes of the text
some ids decode to: bits per byte divide by that count, so a tokenized model and a byte model are
scored on the same scale. `ByteCodec` (vocab 256, one token per byte) needs no files.
`TokenizerCodec` reads a Hugging Face `tokenizer.json` with the `tokenizers` library, from the
model's own directory; nothing is ever fetched from the Hub.

A quamba-fx checkpoint keeps its tokenizer in a `tokenizer/` folder (`save_tokenizer` writes it,
`load_tokenizer` finds it), so a checkpoint is self-contained. A byte-level model has no tokenizer
files at all.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, QuambaError, UnsupportedModelError
from .graph_meta import GraphMeta, find_graph_meta, graph_meta
from .textdata import EmptyTextError, TextDataNotFoundError, chunk_sequences, load_bytes

BYTE_VOCAB_SIZE = 256
TOKENIZER_FILE = "tokenizer.json"
# Copied along with tokenizer.json, when present, so the copy also loads with transformers' AutoTokenizer.
TOKENIZER_SIDECAR_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Tokenizer formats transformers reads but the `tokenizers` library does not: named in the error.
_UNREAD_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt")
CHECKPOINT_TOKENIZER_DIR = "tokenizer"


class TokenizerError(QuambaError, ValueError):
    """A tokenizer is unreadable, or does not fit the vocabulary of the model it comes with."""


class TextCodec:
    """Text <-> token ids for one model. Codecs are immutable: copies of a graph share one."""

    name: str
    vocab_size: int  # every id `encode` returns is below this

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` (no BOS/EOS added)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        raise NotImplementedError

    def byte_count(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes of the text `ids` decode to: the denominator of bits per byte."""
        return len(self.decode(ids).encode("utf-8"))

    def encode_file(self, path: str | Path) -> torch.Tensor:
        """A text file's token ids as a 1-D int64 tensor."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write the files `load_tokenizer(directory)` reads back (none for bytes)."""
        raise NotImplementedError

    def __deepcopy__(self, memo: dict) -> "TextCodec":
        return self  # immutable; deep-copying a graph must not copy a 50k-entry tokenizer


class ByteCodec(TextCodec):
    """Byte-level text: the token ids are the UTF-8 bytes, vocab 256."""

    name = "utf-8-bytes"
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def byte_count(self, ids: Sequence[int]) -> int:
        return len(ids)  # exact even where the bytes are not valid UTF-8

    def encode_file(self, path: str | Path) -> torch.Tensor:
        return load_bytes(path)  # raw bytes: any file, UTF-8 or not

    def save(self, directory: str | Path) -> None:
        """Nothing to write: a model without tokenizer files is byte-level."""

    def __repr__(self) -> str:
        return "ByteCodec()"


class TokenizerCodec(TextCodec):
    """A Hugging Face fast tokenizer (`tokenizer.json`) run by the `tokenizers` library.

    `files` maps file names to their bytes: `tokenizer.json` and any of `TOKENIZER_SIDECAR_FILES`.
    They are held in memory, so `save` copies them exactly even after the source is gone.
    """

    def __init__(self, files: Mapping[str, bytes], source: str = "<memory>"):
        from tokenizers import Tokenizer

        if TOKENIZER_FILE not in files:
            raise TokenizerError(f"a tokenizer needs {TOKENIZER_FILE}; got only {', '.join(files) or 'no files'}")
        self.files = dict(files)
        self.source = source
        try:
            self.tokenizer = Tokenizer.from_str(self.files[TOKENIZER_FILE].decode("utf-8"))
        except Exception as exc:  # tokenizers raises bare Exception for a malformed file
            raise TokenizerError(f"{source}: {TOKENIZER_FILE} is not a valid tokenizer: {exc}") from exc
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        digest = hashlib.sha256(self.files[TOKENIZER_FILE]).hexdigest()[:12]
        self.name = f"{TOKENIZER_FILE}:{digest}"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are kept: decode(encode(text)) gives text back, so byte counts are honest.
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_file(self, path: str | Path) -> torch.Tensor:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise TextDataNotFoundError(f"text file {path} {what}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                             f"a tokenizer reads UTF-8 text") from exc
        ids = self.encode(text)
        if not ids:
            raise EmptyTextError(f"text file {path} is empty; it has no tokens to read")
        return torch.tensor(ids, dtype=torch.long)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (directory / name).write_bytes(data)

    def __repr__(self) -> str:
        return f"TokenizerCodec({self.source!r}, vocab_size={self.vocab_size})"


def tokenizer_dir(path: str | Path) -> Path | None:
    """Where the tokenizer of a model directory lives: its `tokenizer/` folder (a quamba-fx
    checkpoint), the directory itself (a Hugging Face `save_pretrained` directory), or None."""
    path = Path(path)
    for folder in (path / CHECKPOINT_TOKENIZER_DIR, path):
        if (folder / TOKENIZER_FILE).is_file():
            return folder
    return None


def config_vocab_size(path: str | Path) -> int | None:
    """The vocab size recorded in a model directory's config.json (Hugging Face or quamba-fx), if any."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    source = raw.get("source_config") if isinstance(raw.get("source_config"), dict) else raw
    vocab = source.get("vocab_size")
    return vocab if isinstance(vocab, int) else None


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> TextCodec:
    """The codec of the model directory `path`: its tokenizer, or bytes for a byte-level model.

    Looks for `tokenizer.json` in `path/tokenizer/` (quamba-fx checkpoints), then in `path`
    (Hugging Face directories, e.g. a local copy of state-spaces/mamba-130m-hf). Without one, a
    model of vocab 256 is byte-level. `vocab_size` defaults to the one in `path/config.json`; the
    tokenizer's ids must fit in it. Raises `TokenizerError` or `UnsupportedModelError`, naming
    what is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path} is not a directory; a tokenizer is read from a model directory")
    if vocab_size is None:
        vocab_size = config_vocab_size(path)
    folder = tokenizer_dir(path)
    if folder is None:
        if vocab_size == BYTE_VOCAB_SIZE:
            return ByteCodec()
        other = [name for name in _UNREAD_TOKENIZER_FILES if (path / name).is_file()]
        if other:
            raise TokenizerError(
                f"{path} has {', '.join(other)} but no {TOKENIZER_FILE}, the one format quamba-fx reads; convert it once "
                f"with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
            )
        raise UnsupportedModelError(
            f"{path} has no {TOKENIZER_FILE} and its model has vocab_size {vocab_size}, not {BYTE_VOCAB_SIZE} "
            f"(byte-level): copy the model's tokenizer files ({TOKENIZER_FILE}, tokenizer_config.json) into {path}"
        )
    files = {name: (folder / name).read_bytes()
             for name in (TOKENIZER_FILE, *TOKENIZER_SIDECAR_FILES) if (folder / name).is_file()}
    codec = TokenizerCodec(files, source=str(folder / TOKENIZER_FILE))
    check_fits(codec, vocab_size, str(path))
    return codec


def check_fits(codec: TextCodec, vocab_size: int | None, model: str) -> None:
    """Raise `TokenizerError` when `codec` makes ids the model's embedding has no row for."""
    if vocab_size is not None and codec.vocab_size > vocab_size:
        raise TokenizerError(
            f"the tokenizer of {model} has {codec.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
            f"they do not belong together; put the model's own tokenizer beside it"
        )


def as_codec(tokenizer: Any) -> TextCodec:
    """A `TextCodec` from a codec, a model directory, a `tokenizers.Tokenizer`, or a transformers
    fast tokenizer (`PreTrainedTokenizerFast`; saved and read back, so its config files come too)."""
    if isinstance(tokenizer, TextCodec):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return TokenizerCodec({TOKENIZER_FILE: tokenizer.to_str().encode("utf-8")})
    if hasattr(tokenizer, "backend_tokenizer") and hasattr(tokenizer, "save_pretrained"):
        with tempfile.TemporaryDirectory(prefix="quamba-tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            folder = Path(tmp)
            files = {name: (folder / name).read_bytes()
                     for name in (TOKENIZER_FILE, *TOKENIZER_SIDECAR_FILES) if (folder / name).is_file()}
        return TokenizerCodec(files, source=getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)
    raise TokenizerError(
        f"expected a TextCodec, a model directory, a tokenizers.Tokenizer or a transformers fast tokenizer; "
        f"got {type(tokenizer).__name__}"
    )


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """Write `tokenizer` (anything `as_codec` takes) into `directory`; a byte codec writes nothing."""
    as_codec(tokenizer).save(directory)


def source_codec(source: str | Path, vocab_size: int) -> TextCodec:
    """The codec for a model named as on the command line: a directory (its tokenizer, see
    `load_tokenizer`), or a built-in name, which has no tokenizer and must be byte-level."""
    if Path(source).is_dir():
        return load_tokenizer(source, vocab_size)
    if vocab_size == BYTE_VOCAB_SIZE:
        return ByteCodec()
    raise UnsupportedModelError(
        f"{source} has vocab_size {vocab_size} and no tokenizer (built-in shapes have random weights and no "
        f"tokenizer); text needs a byte-level model (vocab {BYTE_VOCAB_SIZE}) or a model directory with its "
        f"{TOKENIZER_FILE}"
    )


def attach_tokenizer(gm: torch.fx.GraphModule, path: str | Path) -> None:
    """Let `gm` carry the tokenizer of the model directory it was made from, when it has one, so
    `quantize`, `generate_text` and `save_pretrained` find it (`graph_meta(gm).tokenizer`)."""
    if Path(path).is_dir() and tokenizer_dir(path) is not None:
        meta = graph_meta(gm)
        meta.tokenizer = load_tokenizer(path, meta.hf_config.get("vocab_size"))


def graph_codec(gm: torch.fx.GraphModule, what: str = "text") -> TextCodec:
    """The codec a graph carries (`from_pretrained` of a checkpoint with a tokenizer), else bytes
    for a vocab-256 graph; else `UnsupportedModelError` saying a tokenizer is needed."""
    meta = find_graph_meta(gm) or GraphMeta()
    codec = meta.tokenizer
    if codec is not None:
        return codec
    vocab = (meta.hf_config or {}).get("vocab_size")
    if vocab == BYTE_VOCAB_SIZE:
        return ByteCodec()
    raise UnsupportedModelError(
        f"{what} needs a tokenizer: this model has vocab_size {vocab}, not {BYTE_VOCAB_SIZE} (byte-level), and carries "
        f"none; pass tokenizer= (quamba_fx.text.load_tokenizer(MODEL_DIR)) or save it with the checkpoint"
    )


def text_windows(codec: TextCodec, path: str | Path, seq_len: int, count: int | None = None) -> torch.Tensor:
    """`count` windows of `seq_len` tokens spread evenly over a tokenized text file, `[count, seq_len]`
    (every non-overlapping window when `count` is None); see `textdata.chunk_sequences`."""
    return chunk_sequences(codec.encode_file(path), seq_len, num_sequences=count)
