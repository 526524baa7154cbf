"""benchmarks/train_bytes_model.py: its parallel forward equals HF's, and a tiny CPU run saves a loadable model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import MambaForCausalLM

from quamba_fx.textdata import find_wikitext

from .benchmark_scripts import load_benchmark

tbm = load_benchmark("train_bytes_model.py", "train_bytes_model")


def _model(seed: int = 0, **shape) -> MambaForCausalLM:
    torch.manual_seed(seed)
    model = MambaForCausalLM(tbm.byte_model_config(tbm.ModelShape(**shape)))
    # HF initialises dt_proj, A and D alike in every block; perturb so each block is distinct.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


# --- the parallel forward ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, length, chunk_len",
    [
        (dict(num_hidden_layers=2, hidden_size=32, state_size=8), 37, 8),  # ragged last chunk
        (dict(num_hidden_layers=3, hidden_size=48, state_size=16), 64, 16),  # exact multiple
        (dict(num_hidden_layers=1, hidden_size=32, state_size=4, conv_kernel=3), 5, 64),  # one short chunk
    ],
)
def test_parallel_forward_matches_hf_logits(shape, length, chunk_len):
    model = _model(**shape)
    ids = _ids(2, length)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        actual = tbm.parallel_forward(model, ids, chunk_len)
    assert actual.shape == expected.shape == (2, length, 256)
    assert _rel_diff(actual, expected) < 1e-5


def test_parallel_forward_is_stable_under_strong_decay():
    # Large dt and A make a chunk decay by far more than e^88: the factored exp(S_t) * exp(-S_s)
    # form would overflow here; the chunked scan must not.
    model = _model(num_hidden_layers=2, hidden_size=32, state_size=8)
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.dt_proj.bias.fill_(6.0)
            block.mixer.A_log.add_(2.0)
    ids = _ids(2, 70)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        actual = tbm.parallel_forward(model, ids, 32)
    assert torch.isfinite(actual).all()
    assert _rel_diff(actual, expected) < 1e-5


def test_parallel_forward_gradients_match_hf():
    model = _model(num_hidden_layers=2, hidden_size=32, state_size=8).train()
    ids = _ids(2, 21)
    grads = []
    for forward in (lambda: model(ids, use_cache=False).logits, lambda: tbm.parallel_forward(model, ids, 8)):
        model.zero_grad()
        forward().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    hf, ours = grads
    assert hf.keys() == ours.keys()
    for name in hf:
        assert _rel_diff(ours[name], hf[name]) < 1e-4, name


def test_dropout_only_acts_in_training_mode():
    model = _model(num_hidden_layers=1, hidden_size=32, state_size=4)
    ids = _ids(1, 16)
    with torch.no_grad():
        assert torch.equal(tbm.parallel_forward(model, ids, 8, dropout=0.5), tbm.parallel_forward(model, ids, 8))
        model.train()
        assert not torch.equal(tbm.parallel_forward(model, ids, 8, dropout=0.5), tbm.parallel_forward(model, ids, 8))


def _scan_with_c_one_step_late(x, dt, A, B, C, chunk_len):
    return ORIGINAL_SCAN(x, dt, A, B, torch.roll(C, 1, dims=1), chunk_len)


ORIGINAL_SCAN = tbm.chunked_selective_scan


def test_check_against_hf_passes_and_catches_a_wrong_scan(monkeypatch):
    model = _model(num_hidden_layers=2, hidden_size=64, state_size=8)
    with torch.no_grad():
        for block in model.backbone.layers:  # dt ~ 0.7, so the scan weighs in the logits
            block.mixer.dt_proj.bias.zero_()
    assert tbm.check_against_hf(model, chunk_len=16, seq_len=20) < 1e-5
    monkeypatch.setattr(tbm, "chunked_selective_scan", _scan_with_c_one_step_late)
    with pytest.raises(RuntimeError, match="disagrees"):
        tbm.check_against_hf(model, chunk_len=16, seq_len=20)


# --- training pieces ---------------------------------------------------------------------------


def test_learning_rate_warms_up_then_follows_the_cosine():
    settings = tbm.TrainSettings(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert tbm.learning_rate(0, 0.0, settings) == pytest.approx(0.1)
    assert tbm.learning_rate(9, 0.0, settings) == pytest.approx(1.0)
    assert tbm.learning_rate(50, 0.5, settings) == pytest.approx(0.55)
    assert tbm.learning_rate(99, 1.0, settings) == pytest.approx(0.1)


def test_split_dev_holds_out_the_tail():
    train, dev = tbm.split_dev(torch.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and dev.tolist() == list(range(90, 100))


def test_save_atomically_replaces_the_folder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "model"
    model = _model(num_hidden_layers=1, hidden_size=32, state_size=4)
    tbm.save_atomically(model, {"run": 1}, out)
    tbm.save_atomically(model, {"run": 2}, out)
    assert json.loads((out / tbm.RUN_JSON).read_text()) == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- the whole script on CPU -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 40 kB of valid.txt and 8 kB of test.txt: real text, small enough for a CPU run."""
    folder = tmp_path_factory.mktemp("text")
    train, test = folder / "train.txt", folder / "test.txt"
    train.write_bytes(find_wikitext("valid").read_bytes()[:40_000])
    test.write_bytes(find_wikitext("test").read_bytes()[:8_000])
    return train, test


def test_cpu_smoke_run_saves_a_loadable_fp16_model(small_text, tmp_path, capsys):
    train, test = small_text
    out = tmp_path / "mamba-bytes"
    argv = [
        "--device", "cpu", "--steps", "6", "--minutes", "5", "--out", str(out), "--seed", "3",
        "--layers", "2", "--hidden", "32", "--state", "8",
        "--batch", "4", "--seq-len", "64", "--chunk-len", "16", "--warmup", "2",
        "--log-every", "2", "--eval-every", "3", "--eval-seq-len", "64", "--eval-windows", "8",
        "--train-file", str(train), "--test-file", str(test),
    ]  # fmt: skip
    assert tbm.main(argv) == 0
    assert "matches HF before training" in capsys.readouterr().out

    model = MambaForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 256 and model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.backbone.embeddings.weight
    # What the file holds, not what from_pretrained casts it to (transformers 5.0 loads some
    # parameters as fp32 where 5.24 keeps the stored dtype).
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F16"}

    run = json.loads((out / tbm.RUN_JSON).read_text())
    for key in ("model_config", "settings", "steps", "seconds", "final_train_loss", "test_bpb", "device",
                "torch_version", "best_dev_bpb", "hf_check_rel_diff"):  # fmt: skip
        assert key in run, key
    assert run["steps"] == 6 and run["device"] == "cpu" and run["torch_version"] == torch.__version__
    assert run["settings"]["shape"]["hidden_size"] == 32
    assert 0 < run["test_bpb"] < 9 and math.isfinite(run["final_train_loss"])

    # The reported bpb is that of the saved weights, run through HF in fp32.
    from quamba_fx.textdata import bits_per_byte, chunk_sequences, load_bytes

    windows = chunk_sequences(load_bytes(test), 64, num_sequences=8)
    with torch.no_grad():
        bpb = bits_per_byte(model.float()(windows, use_cache=False).logits, windows)
    assert bpb == pytest.approx(run["test_bpb"], rel=1e-5)


# --- Mamba-2 ------------------------------------------------------------------------------------


def _mamba2_model(seed: int = 0, **shape) -> torch.nn.Module:
    torch.manual_seed(seed)
    shape = dict(dict(arch="mamba2", head_dim=16, n_groups=2), **shape)
    model = tbm.model_class(tbm.ModelShape(**shape))(tbm.byte_model_config(tbm.ModelShape(**shape), chunk_len=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("length, chunk_len", [(37, 8), (5, 64)])
def test_mamba2_parallel_forward_matches_hf_logits_and_gradients(length, chunk_len):
    model = _mamba2_model(num_hidden_layers=2, hidden_size=32, state_size=8)
    ids = _ids(2, length)
    with torch.no_grad():
        assert _rel_diff(tbm.parallel_forward(model, ids, chunk_len), model(ids, use_cache=False).logits) < 1e-5
    model.train()
    grads = []
    for forward in (lambda: model(ids, use_cache=False).logits, lambda: tbm.parallel_forward(model, ids, chunk_len)):
        model.zero_grad()
        forward().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert _rel_diff(grads[1][name], grads[0][name]) < 1e-4, name


def test_mamba2_cpu_smoke_run_saves_a_model_quamba_fx_loads(small_text, tmp_path):
    train, test = small_text
    out = tmp_path / "mamba2-bytes"
    argv = [
        "--arch", "mamba2", "--head-dim", "16", "--device", "cpu", "--steps", "4", "--minutes", "5",
        "--out", str(out), "--layers", "2", "--hidden", "32", "--state", "8", "--batch", "4", "--seq-len", "64",
        "--chunk-len", "16", "--warmup", "2", "--eval-every", "2", "--eval-seq-len", "64", "--eval-windows", "4",
        "--train-file", str(train), "--test-file", str(test),
    ]  # fmt: skip
    assert tbm.main(argv) == 0
    run = json.loads((out / tbm.RUN_JSON).read_text())
    assert run["model_config"]["model_type"] == "mamba2" and run["model_config"]["chunk_size"] == 16
    import quamba_fx

    model = quamba_fx.load_model(str(out))
    assert type(model).__name__ == "Mamba2ForCausalLM" and model.config.num_heads == 4
    quamba_fx.verify_topology(quamba_fx.capture(model))
