"""A Mamba model with a real (BPE) tokenizer, end to end: Python API and command line.

The fixture trains a small byte-level BPE on a slice of WikiText-2 with the `tokenizers` library,
wraps it as a transformers fast tokenizer and saves it beside a random-weight Mamba, exactly as
`save_pretrained` lays out state-spaces/mamba-130m-hf (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json). Nothing comes from the Hub.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import quamba_fx
from quamba_fx.cli import main
from quamba_fx.errors import UnsupportedModelError
from quamba_fx.generation import QuambaForCausalLM, generate_text
from quamba_fx.graph_meta import graph_meta
from quamba_fx.kernels import dispatch
from quamba_fx.lm_eval_adapter import QuambaLM
from quamba_fx.text import (
    ByteCodec,
    TokenizerCodec,
    TokenizerError,
    as_codec,
    load_tokenizer,
    save_tokenizer,
    text_windows,
)
from quamba_fx.textdata import find_wikitext

from .conftest import make_model, tiny_config

TOKENIZER_VOCAB = 600
MODEL_VOCAB = 608  # padded past the tokenizer, as published checkpoints are (50277 -> 50280)
SEQ_LEN = 16  # the CPU reference scan dominates the run time: short windows keep this file fast


def train_tokenizer(text: str, vocab_size: int):
    """A GPT-2-style byte-level BPE, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Small calibration and evaluation files cut from WikiText-2 valid.txt (disjoint slices)."""
    text = find_wikitext("valid").read_text(encoding="utf-8")
    folder = tmp_path_factory.mktemp("corpus")
    files = {"train": text[:60_000], "calib": text[60_000:66_000], "eval": text[70_000:76_000] + " naïve café ✓\n"}
    for name, body in files.items():
        (folder / f"{name}.txt").write_text(body, encoding="utf-8")
    return {name: folder / f"{name}.txt" for name in files}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, corpus) -> Path:
    """A Hugging Face model directory with its tokenizer, like a local copy of mamba-130m-hf."""
    tokenizer = train_tokenizer(corpus["train"].read_text(encoding="utf-8"), TOKENIZER_VOCAB)
    assert len(tokenizer) == TOKENIZER_VOCAB
    path = tmp_path_factory.mktemp("hf") / "tiny-bpe-mamba"
    model = make_model(tiny_config(vocab_size=MODEL_VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert (path / "tokenizer.json").is_file()
    return path


@pytest.fixture(scope="session")
def codec(model_dir) -> TokenizerCodec:
    return load_tokenizer(model_dir)


@pytest.fixture(scope="session")
def quantized(model_dir, corpus, codec):
    """W8A8 graph calibrated on the calibration file, through the Python API."""
    calib = text_windows(codec, corpus["calib"], SEQ_LEN, 4)
    return quamba_fx.quantize(str(model_dir), calib.split(2), recipe="quamba", progress=False)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, quantized) -> Path:
    return quamba_fx.save_pretrained(quantized, tmp_path_factory.mktemp("ckpt") / "w8a8")


# ------------------------------------------------------------------------------------- the codec


def test_the_model_directory_tokenizer_is_read_with_its_files(model_dir, codec):
    assert isinstance(codec, TokenizerCodec) and codec.vocab_size == TOKENIZER_VOCAB
    assert set(codec.files) == {"tokenizer.json", "tokenizer_config.json"}
    text = "The naïve café opened in 1999 ✓"
    ids = codec.encode(text)
    assert max(ids) < TOKENIZER_VOCAB and len(ids) < len(text.encode())  # merges happened
    assert codec.decode(ids) == text and codec.byte_count(ids) == len(text.encode("utf-8"))
    assert codec.encode("<|endoftext|>") == [0]  # special tokens are tokens, and decode back to text
    assert codec.decode([0]) == "<|endoftext|>"


def test_codecs_from_objects_and_bytes(model_dir, codec, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    for source in (hf, hf.backend_tokenizer, model_dir, codec):
        assert as_codec(source).encode("Hello world") == codec.encode("Hello world")
    save_tokenizer(hf, tmp_path / "t")
    assert load_tokenizer(tmp_path / "t", vocab_size=MODEL_VOCAB).name == codec.name
    byte = ByteCodec()
    assert byte.encode("é") == [195, 169] and byte.byte_count([195]) == 1 and byte.decode([195]) == "\ufffd"
    with pytest.raises(TokenizerError, match="expected a TextCodec"):
        as_codec(42)


# ------------------------------------------------------------------------------------- Python API


def test_quantize_from_a_directory_keeps_its_tokenizer(quantized, codec):
    assert graph_meta(quantized).recipe == "quamba"
    assert graph_meta(quantized).tokenizer.name == codec.name


def test_evaluate_reports_perplexity_per_token_and_bits_per_byte(quantized, corpus, codec):
    windows = text_windows(codec, corpus["eval"], SEQ_LEN, 3)
    result = quamba_fx.evaluate(quantized, windows, progress=False, codec=codec)
    with torch.no_grad():
        logits = quantized(windows).float()
    nats = F.cross_entropy(logits[:, :-1].reshape(-1, MODEL_VOCAB), windows[:, 1:].reshape(-1), reduction="sum").item()
    scored_bytes = sum(len(codec.decode(row[1:]).encode("utf-8")) for row in windows.tolist())
    assert result.scored_tokens == 3 * (SEQ_LEN - 1) and result.scored_bytes == scored_bytes
    assert scored_bytes > 1.5 * result.scored_tokens  # BPE tokens span several bytes
    assert result.perplexity == pytest.approx(math.exp(nats / result.scored_tokens), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / scored_bytes, rel=1e-5)
    # Counted as bytes instead (the default), the same nats would be spread over one byte per token.
    as_bytes = quamba_fx.evaluate(lambda ids: logits, windows, progress=False)
    assert as_bytes.bits_per_byte == pytest.approx(result.bits_per_byte * scored_bytes / result.scored_tokens)


def test_checkpoint_keeps_the_tokenizer_and_generates(checkpoint, model_dir, codec, quantized):
    assert (checkpoint / "tokenizer" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    loaded = quamba_fx.from_pretrained(checkpoint)
    assert graph_meta(loaded).tokenizer.name == codec.name
    ids = torch.tensor([codec.encode("The city of")])
    assert torch.equal(loaded(ids), quantized(ids))
    text = generate_text(loaded, "The city of", 4)
    greedy = QuambaForCausalLM(loaded).generate(ids, max_new_tokens=4)[0, ids.shape[1]:].tolist()
    eos = greedy.index(0) if 0 in greedy else len(greedy)
    assert text == codec.decode(greedy[:eos])
    sampled = [generate_text(loaded, "The city of", 2, do_sample=True, temperature=1.0, seed=s) for s in (3, 3)]
    assert sampled[0] == sampled[1]
    # Re-saving a loaded checkpoint (e.g. after fuse) keeps the tokenizer without being told.
    again = quamba_fx.save_pretrained(loaded, checkpoint.parent / "again")
    assert load_tokenizer(again).name == codec.name


@pytest.fixture
def kernel_references(monkeypatch):
    """The lowered ops run their PyTorch references, as on a CPU without the Triton interpreter:
    these tests are about tokens, the kernels have their own tests (and the interpreter is slow)."""
    monkeypatch.setattr(dispatch, "INTERPRET", False)


def test_cached_generator_decodes_the_same_tokens(quantized, codec, kernel_references):
    ids = torch.tensor([codec.encode("In the year")])
    runner = quamba_fx.Generator(quamba_fx.lower(quantized, dtype=torch.float32), batch_size=1)
    cached = runner.generate(ids, 5)[0, ids.shape[1]:].tolist()
    recomputed = QuambaForCausalLM(quantized).generate(ids, max_new_tokens=5)[0, ids.shape[1]:].tolist()
    assert cached == recomputed and max(cached) < MODEL_VOCAB


def test_lm_eval_adapter_uses_the_checkpoint_tokenizer(checkpoint, codec):
    lm = QuambaLM(checkpoint=str(checkpoint), progress=False)
    assert lm.tokenizer_name == codec.name and lm.prefix_token_id == 0  # the config's bos
    assert lm.tok_encode("Hello world") == codec.encode("Hello world")
    [(logprob, _)] = lm.loglikelihood([type("Request", (), {"args": ("The city", " of")})()])
    context, whole = codec.encode("The city"), codec.encode("The city of")
    with torch.no_grad():
        logits = lm.lm.model(torch.tensor([whole[:-1]])).log_softmax(-1)[0]
    expected = sum(logits[i - 1, whole[i]].item() for i in range(len(context), len(whole)))
    assert logprob == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------- errors


def test_a_directory_without_tokenizer_and_vocab_not_256_is_refused(tmp_path, model_dir, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    with pytest.raises(UnsupportedModelError, match=rf"has no tokenizer.json and its model has vocab_size {MODEL_VOCAB}"):
        load_tokenizer(bare)
    assert main(["eval", str(bare), "--recipe", "none", "--windows", "1", "--seq-len", "8"]) == 1
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert main(["quantize", str(bare), "--out", str(tmp_path / "q")]) == 1
    assert "has no tokenizer.json" in capsys.readouterr().err and not (tmp_path / "q").exists()
    (bare / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="has vocab.json but no tokenizer.json"):
        load_tokenizer(bare)


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path, model_dir, quantized, capsys):
    small = tmp_path / "small"  # another model's tokenizer beside a model of vocab 512
    make_model(tiny_config(vocab_size=512)).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, small / name)
    with pytest.raises(TokenizerError, match=f"has {TOKENIZER_VOCAB} tokens but the model's vocab_size is 512"):
        load_tokenizer(small)
    with pytest.raises(TokenizerError, match="vocab_size is 512"):
        load_tokenizer(model_dir, vocab_size=512)
    with pytest.raises(TokenizerError, match="do not belong together"):
        quamba_fx.capture(str(small))
    assert main(["eval", str(small), "--recipe", "none", "--windows", "1", "--seq-len", "8"]) == 1
    assert "do not belong together" in capsys.readouterr().err
    bigger = as_codec(train_tokenizer("abc def ghi " * 50 + (model_dir / "tokenizer.json").read_text(), 700))
    assert bigger.vocab_size > MODEL_VOCAB
    with pytest.raises(TokenizerError, match="vocab_size is 608"):
        quamba_fx.save_pretrained(quantized, tmp_path / "bad", tokenizer=bigger)
    assert not (tmp_path / "bad").exists()
    (small / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        load_tokenizer(small)


# ------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory, model_dir, corpus) -> Path:
    out = tmp_path_factory.mktemp("cli") / "q"
    assert main(["quantize", str(model_dir), "--calib", str(corpus["calib"]), "--out", str(out),
                 "--calib-windows", "4", "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--quiet"]) == 0
    return out


def test_cli_quantize_writes_a_self_contained_checkpoint(cli_checkpoint, model_dir, capsys):
    names = sorted(p.name for p in cli_checkpoint.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (cli_checkpoint / "tokenizer" / name).read_bytes() == (model_dir / name).read_bytes()


def test_cli_eval_prints_bits_per_byte_and_perplexity(cli_checkpoint, model_dir, corpus, capsys):
    common = ["--text", str(corpus["eval"]), "--windows", "2", "--seq-len", str(SEQ_LEN), "--quiet"]
    assert main(["eval", str(cli_checkpoint), *common, "--reference", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert f"2 windows of {SEQ_LEN} tokens; recipe quamba" in out
    fp32 = float(out.split("fp32     bits/byte ")[1].split()[0])
    w8a8 = float(out.split("quamba   bits/byte ")[1].split()[0])
    ppl = float(out.split("quamba   bits/byte ")[1].split("perplexity ")[1].split("/")[0])
    assert 1 < ppl < 2 * MODEL_VOCAB and abs(w8a8 / fp32 - 1) < 0.05 and "top-1 agreement" in out
    assert main(["eval", str(model_dir), "--recipe", "none", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fp32     bits/byte ") and float(out.split()[2]) == pytest.approx(fp32, abs=1e-4)


def test_cli_generate_on_the_model_and_the_checkpoint(cli_checkpoint, model_dir, kernel_references, capsys):
    prompt = ["--prompt", "The city of", "--max-new-tokens", "3"]
    assert main(["generate", str(cli_checkpoint), *prompt]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The city of") and " tokens, " in captured.err
    assert main(["generate", str(cli_checkpoint), *prompt, "--kernels", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == captured.out  # cached kernel decoding = greedy by recomputation
    assert main(["generate", str(model_dir), *prompt, "--sample", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The city of")


@pytest.mark.slow
def test_cli_dump_and_bench_on_the_checkpoint(cli_checkpoint, capsys):
    assert main(["dump", str(cli_checkpoint), "--seq-len", "5"]) == 0
    assert f"[1, 5, {MODEL_VOCAB}]" in capsys.readouterr().out
    assert main(["bench", str(cli_checkpoint), "--device", "cpu", "--seq-len", "4", "--repeats", "1"]) == 0
    assert "recipe quamba" in capsys.readouterr().out


def test_an_edited_checkpoint_tokenizer_is_caught(checkpoint, tmp_path):
    # The weights and config were hashed but the tokenizer files were not: an edited tokenizer.json
    # used to load silently and change every text the checkpoint reads and writes.
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    quamba_fx.from_pretrained(copy)
    tokenizer_file = copy / "tokenizer" / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text() + "\n")
    with pytest.raises(quamba_fx.CheckpointError, match=r"tokenizer does not match the SHA-256s recorded in config\.json"):
        quamba_fx.from_pretrained(copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(quamba_fx.CheckpointError, match="a tokenizer file was edited, added or removed"):
        quamba_fx.from_pretrained(copy)
