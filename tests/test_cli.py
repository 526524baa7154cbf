"""The command line: dump and demo work, errors are one line with a reliable exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from quamba_fx.cli import main


def test_dump_json_to_stdout(capsys):
    assert main(["dump", "mamba-tiny", "--format", "json", "--block", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {n["block"] for n in doc["nodes"]} == {1}


def test_dump_of_a_large_builtin_uses_the_meta_device(tmp_path, capsys):
    out = tmp_path / "g.dot"
    assert main(["dump", "mamba-2.8b", "--format", "dot", "--block", "63", "--out", str(out)]) == 0
    assert "cluster_block63" in out.read_text()
    assert "wrote dot dump of mamba-2.8b" in capsys.readouterr().err


def test_dump_of_a_saved_checkpoint(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["dump", str(tmp_path / "m"), "--seq-len", "5"]) == 0
    assert "[1, 5, 97]" in capsys.readouterr().out


def test_demo_on_tiny_model_quantizes_and_evaluates(capsys):
    assert main(["demo", "--model", "mamba-tiny", "--run", "4", "--windows", "2", "--seq-len", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "graph: 74 nodes, 2 conv1d, 2 selective_scan ops" in out
    assert "topology verified" in out and "capture" in out and "logits (1, 4, 256)" in out
    assert "quantized W8A8 (quamba recipe)" in out and "accuracy on 2 windows of 64 bytes" in out
    assert "W8A8     bits/byte" in out and "vs fp32" in out


def test_demo_on_the_trained_mamba2_names_its_own_topology(capsys):
    assert main(["demo", "--model", "mamba2-bytes-wt2", "--run", "4", "--windows", "2", "--seq-len", "64",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 conv1d, 4 ssd_scan ops" in out and out.count("256->1160") == 4 and "x_proj" not in out
    assert "every block is in_proj -> conv1d -> scan" in out
    fp32 = float(out.split("fp32     bits/byte ")[1].split()[0])
    w8a8 = float(out.split("W8A8     bits/byte ")[1].split()[0])
    assert abs(w8a8 / fp32 - 1) < 0.01


def test_mamba2_checkpoint_quantizes_and_evaluates_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "m2"
    assert main(["quantize", "mamba2-bytes-wt2", "--out", str(out), "--calib-windows", "2", "--seq-len", "64",
                 "--quiet"]) == 0
    assert main(["eval", str(out), "--windows", "2", "--seq-len", "64", "--reference", "mamba2-bytes-wt2",
                 "--quiet"]) == 0
    assert "quamba   bits/byte" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["quamba2-w4a16", "quamba2-w4a8"])
def test_4bit_recipes_quantize_and_evaluate_from_the_command_line(tmp_path, capsys, recipe):
    out = tmp_path / "w4"
    assert main([*QUICK_QUANTIZE[:2], "--out", str(out), "--recipe", recipe, *QUICK_QUANTIZE[2:]]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["name"] == recipe and config["recipe"]["weights"]["bits"] == 4
    assert main(["eval", str(out), "--windows", "2", "--seq-len", "32", "--reference", "mamba-tiny", "--quiet"]) == 0
    assert f"recipe {recipe}" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_default_is_the_trained_byte_model(capsys):
    assert main(["demo", "--quiet", "--windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "mamba-bytes-wt2" in out and "4 conv1d, 4 selective_scan ops" in out
    fp32 = float(out.split("fp32     bits/byte ")[1].split()[0])
    w8a8 = float(out.split("W8A8     bits/byte ")[1].split()[0])
    assert 1.5 < fp32 < 2.3 and abs(w8a8 / fp32 - 1) < 0.02


@pytest.mark.slow
def test_demo_on_mamba_130m_captures_without_quantizing(capsys):
    assert main(["demo", "--model", "mamba-130m", "--run", "0"]) == 0
    out = capsys.readouterr().out
    assert "24 conv1d, 24 selective_scan ops" in out and out.count("768->3072") == 24
    assert "W8A8 quantization and text accuracy run on byte-level models" in out


def test_eval_prints_bits_per_byte_for_each_recipe(capsys):
    args = ["eval", "mamba-bytes-wt2", "--windows", "2", "--calib-windows", "2", "--seq-len", "96", "--quiet"]
    assert main(args + ["--recipe", "none"]) == 0
    assert capsys.readouterr().out.startswith("fp32     bits/byte ")
    assert main(args + ["--recipe", "naive"]) == 0
    out = capsys.readouterr().out
    assert "recipe naive" in out and "naive    bits/byte" in out and "top-1 agreement" in out


def test_eval_rejects_token_models(capsys):
    assert main(["eval", "mamba-130m", "--windows", "1"]) == 1
    assert "mamba-130m has vocab_size 50280 and no tokenizer" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_codes(capsys):
    assert main(["dump", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quamba-fx: error: 'no-such-model' is neither a built-in model") and err.count("\n") == 1
    # A block the model does not have is found once the model is loaded: the command fails (1);
    # only what the parser itself can reject is bad usage (2).
    assert main(["dump", "mamba-tiny", "--block", "9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quamba-fx: error: block 9 does not exist") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["dump"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    assert main(["quantize", "mamba-bytes-wt2", "--out", str(out), "--calib-windows", "2", "--seq-len", "64",
                 "--fuse", "--quiet"]) == 0
    return out


QUICK_QUANTIZE = ["quantize", "mamba-tiny", "--calib-windows", "1", "--seq-len", "32", "--quiet"]


def test_quantize_never_replaces_what_is_not_a_checkpoint(tmp_path, capsys):
    # --out over a directory of someone's files used to delete them all, exit 0, no message.
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years")
    assert main([*QUICK_QUANTIZE, "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "is not a quamba-fx checkpoint" in err and err.count("\n") == 1
    assert (out / "thesis.txt").read_text() == "four years" and (out / "photos").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_quantize_replaces_a_checkpoint_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "q"
    assert main([*QUICK_QUANTIZE, "--out", str(out)]) == 0
    weights = (out / "model.safetensors").read_bytes()
    assert main([*QUICK_QUANTIZE, "--out", str(out), "--recipe", "naive"]) == 1
    assert "already holds a quamba-fx checkpoint; pass overwrite=True (command line: --overwrite)" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights
    assert main([*QUICK_QUANTIZE, "--out", str(out), "--recipe", "naive", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["recipe"]["name"] == "naive"


def test_quantize_to_an_unwritable_place_is_one_line(capsys):
    assert main([*QUICK_QUANTIZE, "--out", "/proc/quamba-fx-ckpt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quamba-fx: error: cannot write a checkpoint to /proc/quamba-fx-ckpt") and err.count("\n") == 1


def test_quantize_writes_a_checkpoint(checkpoint, capsys):
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["recipe"]["name"] == "quamba" and config["fused"] is True


@pytest.mark.slow
def test_eval_dump_and_bench_take_a_checkpoint(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--windows", "2", "--seq-len", "64", "--quiet",
                 "--reference", "mamba-bytes-wt2"]) == 0
    out = capsys.readouterr().out
    assert "recipe quamba" in out and "quamba   bits/byte" in out and "top-1 agreement" in out
    assert main(["dump", str(checkpoint), "--format", "json", "--block", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (conv,) = [n for n in doc["nodes"] if n["is_conv1d"]]
    assert conv["target"] == "torch.ops.quamba.conv1d_silu_int8" and conv["dtype"] == "int8"
    assert main(["bench", str(checkpoint), "--device", "cpu", "--seq-len", "16", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "recipe quamba" in out and "tokens/s" in out and "state dict:" in out


def test_quantize_refuses_token_models_without_writing(tmp_path, capsys):
    assert main(["quantize", "mamba-130m", "--out", str(tmp_path / "x")]) == 1
    assert "has vocab_size 50280 and no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_generate_continues_a_prompt(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "The city", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The city") and len(captured.out.rstrip("\n").encode()) >= len("The city")
    assert "12 bytes" in captured.err or "bytes in" in captured.err
    assert main(["generate", "mamba-130m", "--prompt", "x", "--max-new-tokens", "1"]) == 1
    assert "byte-level" in capsys.readouterr().err


@pytest.mark.slow
def test_kernels_flag_lowers_a_checkpoint(checkpoint, capsys):
    prompt = ["--prompt", "The city", "--max-new-tokens", "3"]
    assert main(["generate", str(checkpoint), *prompt]) == 0
    reference = capsys.readouterr().out
    assert main(["generate", str(checkpoint), *prompt, "--kernels", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == reference  # greedy from the decode cache = greedy by recomputation
    assert "decode cache" in captured.err
    assert main(["bench", str(checkpoint), "--device", "cpu", "--seq-len", "4", "--repeats", "1", "--kernels",
                 "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "quamba kernels" in out and "decode: 2 steps at batch 1" in out  # the recipe names them
    assert main(["dump", str(checkpoint), "--kernels", "--block", "0"]) == 0
    assert "triton:selective_scan_int8" in capsys.readouterr().out


def test_kernels_flag_refuses_float_models_and_sampling(checkpoint, capsys):
    assert main(["bench", "mamba-tiny", "--device", "cpu", "--kernels"]) == 1
    assert "is a float model; quantize it first" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "x", "--kernels", "--sample", "--device", "cpu"]) == 1
    assert "--kernels decodes greedily" in capsys.readouterr().err


USAGE_ERRORS = [
    (["bench", "mamba-tiny", "--seq-len", "-5"], "argument --seq-len: must be at least 1, got -5"),
    (["dump", "mamba-tiny", "--seq-len", "-5"], "argument --seq-len: must be at least 1, got -5"),
    (["dump", "mamba-tiny", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["dump", "mamba-tiny", "--block", "-1"], "argument --block: must be at least 0, got -1"),
    (["bench", "mamba-tiny", "--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["bench", "mamba-tiny", "--batch", "two"], "argument --batch: expected an integer, got 'two'"),
    (["quantize", "mamba-tiny", "--out", "x", "--percentile", "200"], "a percentile lies in (0, 100], got 200"),
    (["eval", "mamba-tiny", "--calib", "/no/such/file.txt"], "argument --calib: /no/such/file.txt does not exist"),
    (["generate", "mamba-tiny", "--prompt", "a", "--temperature", "nan"], "must be a finite number above 0, got nan"),
]


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=[" ".join(a[:1] + a[2:3]) for a, _ in USAGE_ERRORS])
def test_bad_arguments_are_usage_errors_from_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_and_usage_errors_import_neither_torch_nor_transformers():
    # `quamba-fx --help` used to pay seconds of torch/transformers imports before printing anything.
    script = textwrap.dedent("""
        import sys
        from quamba_fx.cli import main
        for argv in (["--help"], ["bench", "m", "--seq-len", "-5"], ["dump"]):
            try:
                main(argv)
            except SystemExit:
                pass
        heavy = sorted(m for m in ("torch", "transformers", "triton") if m in sys.modules)
        print("heavy:", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["bench", "mamba-tiny", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err == "quamba-fx: error: --device cuda: no CUDA GPU is visible to torch here; use --device cpu\n"


def test_unwritable_dump_destination_is_one_line(capsys):
    assert main(["dump", "mamba-tiny", "--out", "/proc/quamba-fx-dump.txt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quamba-fx: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_an_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    from quamba_fx import commands

    def broken(args):
        raise RuntimeError("something\nthat spans lines")

    monkeypatch.setattr(commands, "cmd_dump", broken)
    assert main(["dump", "mamba-tiny"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("quamba-fx: internal error: RuntimeError: something that spans lines (rerun with --debug")
    with pytest.raises(RuntimeError):
        main(["--debug", "dump", "mamba-tiny"])


def test_state_bytes_counts_wide_floats_as_fp16_and_keeps_narrower_ones():
    """The size quoted "as deployed": fp32 tensors at 2 bytes, int8 and e4m3 weights at 1, a tied
    tensor once."""
    from quamba_fx.commands import state_bytes

    module = torch.nn.Module()
    module.register_buffer("f32", torch.zeros(10))
    module.register_buffer("e4m3", torch.zeros(10).to(torch.float8_e4m3fn))
    module.register_buffer("i8", torch.zeros(10, dtype=torch.int8))
    module.register_buffer("tied", module.f32)
    assert state_bytes(module, float_bytes=2) == 10 * 2 + 10 + 10
    assert state_bytes(module) == 10 * 4 + 10 + 10
