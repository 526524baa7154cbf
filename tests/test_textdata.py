"""Byte-level WikiText-2 loading, windowing and the bits-per-byte metric."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quamba_fx.errors import QuambaError
from quamba_fx.textdata import (
    WIKITEXT_ENV,
    EmptyTextError,
    TextDataNotFoundError,
    bits_per_byte,
    chunk_sequences,
    find_wikitext,
    load_bytes,
    next_byte_loss,
    random_batches,
    wikitext_search_dirs,
)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(WIKITEXT_ENV, raising=False)


@pytest.fixture(scope="module")
def valid_ids():
    return load_bytes(find_wikitext("valid"))


# --- finding the data ------------------------------------------------------------------------


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize("split", ["valid", "test"])
def test_find_wikitext_finds_the_shared_copy(split):
    path = find_wikitext(split)
    assert path.name == f"{split}.txt"
    assert path.parent.name == "wikitext-2" and path.parent.parent.name == "data"
    assert path.stat().st_size > 1_000_000


@pytest.mark.usefixtures("no_env")
def test_find_wikitext_works_from_any_working_directory(tmp_path, monkeypatch):
    # Walking up from the package's own location still reaches the shared/ folder beside the checkout.
    monkeypatch.chdir(tmp_path)
    assert find_wikitext("valid").is_file()


def test_env_var_overrides_the_search(tmp_path, monkeypatch):
    (tmp_path / "test.txt").write_bytes(b"hello")
    monkeypatch.setenv(WIKITEXT_ENV, str(tmp_path))
    assert find_wikitext("test") == tmp_path / "test.txt"


def test_env_var_pointing_at_the_wrong_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(WIKITEXT_ENV, str(tmp_path))
    with pytest.raises(TextDataNotFoundError, match=WIKITEXT_ENV) as info:
        find_wikitext("valid")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, QuambaError)
    assert str(tmp_path / "valid.txt") in str(info.value)


@pytest.mark.usefixtures("no_env")
def test_not_found_lists_where_it_looked_and_the_env_var(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        find_wikitext("valid", search_from=[tmp_path])
    message = str(info.value)
    assert str(tmp_path / "shared" / "data" / "wikitext-2") in message
    assert WIKITEXT_ENV in message


def test_search_dirs_include_every_ancestor_once(tmp_path):
    inner = tmp_path / "a" / "b"
    dirs = wikitext_search_dirs([inner, tmp_path])
    assert dirs[0] == inner.resolve() / "shared" / "data" / "wikitext-2"
    assert tmp_path.resolve() / "shared" / "data" / "wikitext-2" in dirs
    assert len(dirs) == len(set(dirs))


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="train"):
        find_wikitext("train")


# --- loading bytes ---------------------------------------------------------------------------


def test_real_text_loads_as_byte_ids(valid_ids):
    assert valid_ids.dtype == torch.int64 and valid_ids.dim() == 1
    assert valid_ids.numel() > 1_000_000
    assert 0 <= int(valid_ids.min()) and int(valid_ids.max()) < 256
    assert b" the " in bytes(valid_ids[:10_000].tolist())


def test_load_bytes_is_one_id_per_utf8_byte(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("é a", encoding="utf-8")
    assert load_bytes(path).tolist() == list("é a".encode())


def test_load_bytes_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bytes(tmp_path / "nope.txt")


def test_load_bytes_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        load_bytes(tmp_path)


def test_load_bytes_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(EmptyTextError, match="empty") as info:
        load_bytes(path)
    assert isinstance(info.value, ValueError)


# --- windows ---------------------------------------------------------------------------------


def test_chunk_sequences_default_is_every_window_from_the_start():
    ids = torch.arange(103)
    windows = chunk_sequences(ids, 10)
    assert windows.shape == (10, 10) and windows.dtype == torch.int64
    assert torch.equal(windows.flatten(), ids[:100])


def test_chunk_sequences_on_real_text_is_deterministic(valid_ids):
    first = chunk_sequences(valid_ids, 512, num_sequences=64)
    again = chunk_sequences(valid_ids, 512, num_sequences=64)
    assert first.shape == (64, 512)
    assert torch.equal(first, again)


@given(total=st.integers(1, 5000), seq_len=st.integers(1, 300), data=st.data())
def test_evenly_spaced_windows_cover_the_text_without_overlap(total, seq_len, data):
    available = total // seq_len
    if available == 0:
        return
    n = data.draw(st.integers(1, available))
    ids = torch.arange(total)
    windows = chunk_sequences(ids, seq_len, num_sequences=n)
    starts = windows[:, 0]
    assert windows.shape == (n, seq_len)
    assert torch.equal(windows, starts[:, None] + torch.arange(seq_len))  # contiguous slices
    assert int(starts[0]) == 0
    if n > 1:
        assert int(windows[-1, -1]) == total - 1  # the last window ends at the last byte
        assert int((starts[1:] - starts[:-1]).min()) >= seq_len


def test_chunk_sequences_with_stride():
    ids = torch.arange(50)
    windows = chunk_sequences(ids, 10, stride=5)
    assert windows[:, 0].tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert chunk_sequences(ids, 10, num_sequences=3, stride=5)[:, 0].tolist() == [0, 5, 10]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(seq_len=11, num_sequences=10), EmptyTextError),
        (dict(seq_len=10, num_sequences=10, stride=20), EmptyTextError),
        (dict(seq_len=101), EmptyTextError),
        (dict(seq_len=0), ValueError),
        (dict(seq_len=10, stride=0), ValueError),
        (dict(seq_len=10, num_sequences=0), ValueError),
    ],
)
def test_chunk_sequences_rejects_impossible_requests(kwargs, error):
    with pytest.raises(error):
        chunk_sequences(torch.arange(100), **kwargs)


def test_chunk_sequences_needs_1d_ids():
    with pytest.raises(ValueError, match="1-D"):
        chunk_sequences(torch.zeros(4, 25, dtype=torch.long), 5)


def test_random_batches_shapes_slices_and_seeding():
    ids = torch.arange(1000)
    batches = random_batches(ids, 8, 32, torch.Generator().manual_seed(1))
    first, second = next(batches), next(batches)
    assert first.shape == (8, 32)
    assert torch.equal(first, first[:, :1] + torch.arange(32))  # each row is a contiguous slice
    assert not torch.equal(first, second)
    replay = random_batches(ids, 8, 32, torch.Generator().manual_seed(1))
    assert torch.equal(next(replay), first)
    other = random_batches(ids, 8, 32, torch.Generator().manual_seed(2))
    assert not torch.equal(next(other), first)


def test_random_batches_can_reach_the_last_byte():
    ids = torch.arange(10)
    batch = next(random_batches(ids, 200, 9, torch.Generator().manual_seed(0)))
    assert set(batch[:, 0].tolist()) == {0, 1}


# --- bits per byte ---------------------------------------------------------------------------


def test_uniform_predictor_scores_eight_bits():
    ids = torch.randint(0, 256, (3, 40))
    assert bits_per_byte(torch.zeros(3, 40, 256), ids) == pytest.approx(8.0, abs=1e-5)


def _one_hot_logits(targets: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, 256).float() * scale


def test_perfect_predictor_scores_about_zero_and_the_shift_is_by_one():
    ids = torch.randint(0, 256, (2, 50))
    next_bytes = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1)
    assert bits_per_byte(_one_hot_logits(next_bytes), ids) == pytest.approx(0.0, abs=1e-6)
    # Predicting the current byte instead of the next one is confidently wrong almost everywhere.
    assert bits_per_byte(_one_hot_logits(ids), ids) > 50


def test_bits_are_nats_over_ln2():
    logits, ids = torch.randn(2, 30, 256), torch.randint(0, 256, (2, 30))
    assert bits_per_byte(logits, ids) == pytest.approx(next_byte_loss(logits, ids).item() / math.log(2))


def test_bits_per_byte_rejects_mismatched_or_too_short_windows():
    with pytest.raises(ValueError, match="do not match"):
        bits_per_byte(torch.zeros(2, 10, 256), torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        bits_per_byte(torch.zeros(2, 1, 256), torch.zeros(2, 1, dtype=torch.long))


def evaluate_bits_per_byte(logits_fn, windows, batch_size):
    from quamba_fx.evaluate import evaluate

    return evaluate(logits_fn, windows, batch_size=batch_size, progress=False).bits_per_byte


def test_evaluate_bits_per_byte_averages_over_uneven_batches(valid_ids):
    windows = chunk_sequences(valid_ids, 64, num_sequences=7)
    uniform = evaluate_bits_per_byte(lambda ids: torch.zeros(*ids.shape, 256), windows, batch_size=3)
    assert uniform == pytest.approx(8.0, abs=1e-5)
    torch.manual_seed(0)
    table = torch.randn(256, 256)
    whole = evaluate_bits_per_byte(lambda ids: table[ids], windows, batch_size=7)
    split = evaluate_bits_per_byte(lambda ids: table[ids], windows, batch_size=2)
    assert whole == pytest.approx(split, rel=1e-6)
    assert whole == pytest.approx(bits_per_byte(table[windows], windows), rel=1e-6)
