"""Bad input gets a clear error naming the problem: wrong models, wrong inputs, broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import quamba_fx
from quamba_fx import CheckpointError, InputError, UnsupportedModelError

from .conftest import make_model, tiny_config


def test_non_mamba_models_are_rejected_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=16))
    with pytest.raises(UnsupportedModelError, match=r"got GPT2LMHeadModel \(config.model_type='gpt2'\)"):
        quamba_fx.capture(gpt2)
    with pytest.raises(UnsupportedModelError, match="got Linear"):
        quamba_fx.capture(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="got Linear"):
        quamba_fx.load_model(nn.Linear(2, 2))


def test_unsupported_activation_is_rejected():
    model = make_model(tiny_config(hidden_act="gelu"))
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        quamba_fx.capture(model)


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(1, 4), "must be int64 or int32 token ids, got dtype torch.float32"),
        (torch.zeros(4, dtype=torch.long), r"must have shape \[batch, seq_len\], got \(4,\)"),
        (torch.zeros(1, 0, dtype=torch.long), r"input_ids is empty \(shape \(1, 0\)\)"),
        (torch.zeros(0, 3, dtype=torch.long), r"input_ids is empty"),
        (torch.tensor([[1, 97]]), r"token ids must lie in \[0, 97\); got values in \[1, 97\]"),
        (torch.tensor([[-1, 2]]), r"got values in \[-1, 2\]"),
    ],
)
def test_wrong_inputs_are_rejected(tiny_model, ids, message):
    gm = quamba_fx.capture(tiny_model)
    with pytest.raises(InputError, match=message):
        gm(ids)


def test_int32_ids_are_accepted(tiny_model):
    gm = quamba_fx.capture(tiny_model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(gm(ids.int()), gm(ids))


@pytest.fixture
def saved(tmp_path, tiny_model):
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    return path


def test_checkpoint_round_trip(saved, tiny_model):
    loaded = quamba_fx.load_model(str(saved))
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(quamba_fx.capture(loaded)(ids), quamba_fx.capture(tiny_model)(ids))


def test_missing_and_malformed_checkpoints(tmp_path, saved):
    with pytest.raises(CheckpointError, match="neither a built-in model .* nor an existing directory"):
        quamba_fx.load_model(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        quamba_fx.load_model(str(tmp_path / "file"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        quamba_fx.load_model(str(empty))
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        quamba_fx.load_model(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'"):
        quamba_fx.load_model(str(empty))
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        quamba_fx.load_model(str(saved))


def test_truncated_weights_are_a_checkpoint_error(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="could not load the checkpoint"):
        quamba_fx.load_model(str(saved))


def test_weights_missing_a_tensor_are_a_checkpoint_error(saved):
    from safetensors.torch import load_file, save_file

    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    del tensors["backbone.layers.1.mixer.x_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks tensors: backbone.layers.1.mixer.x_proj.weight"):
        quamba_fx.load_model(str(saved))


def test_unknown_builtin_name_lists_choices():
    with pytest.raises(UnsupportedModelError, match="built-in names are: mamba-tiny, mamba-130m"):
        quamba_fx.builtin_config("mamba-9b")
