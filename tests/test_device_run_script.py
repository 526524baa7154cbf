"""benchmarks/device_run.sh: its steps name scripts, tests and flags that exist (it only runs on a
lent GPU, so a renamed flag would otherwise be found there, at the cost of a device call), and a step
runs, is timed and recorded, and does not stop the steps after it when it fails."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_run.sh"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _steps() -> list[str]:
    listing = _run("--list")
    assert listing.returncode == 0, listing.stderr
    return [line.split()[0] for line in listing.stdout.splitlines()]


def test_every_step_is_listed_with_a_limit_and_a_purpose():
    names = _steps()
    assert {"prefill", "decode", "decode-w4", "mamba2", "scan"} <= set(names)
    assert len(names) == len(set(names))
    for line in _run("--list").stdout.splitlines():
        assert re.match(r"\S+\s+\d+s\s+\S", line), line


@pytest.mark.parametrize("step", _steps())
def test_each_step_names_files_and_flags_that_exist(step):
    dry = _run("--dry-run", step)
    assert dry.returncode == 0, dry.stderr
    words = [w for w in shlex.split(dry.stdout) if "=" not in w or w.startswith("-")]
    files = [w for w in words if w.endswith(".py")]
    assert files, dry.stdout
    for name in files:
        assert (ROOT / name).is_file(), f"{step}: {name} does not exist"
    # Each command of the step (joined by &&): the options after a benchmark script are its own
    # (those before it belong to a wrapper such as ncu).
    command: list[str] = []
    for word in [*words, "&&"]:
        if word != "&&":
            command.append(word)
            continue
        scripts = [i for i, w in enumerate(command) if w.endswith(".py")]
        if scripts and command[scripts[0]].startswith("benchmarks/"):
            script = command[scripts[0]]
            source = (ROOT / script).read_text()
            for flag in (w for w in command[scripts[0] + 1:] if w.startswith("--")):
                assert f'"{flag}"' in source, f"{step}: {script} has no option {flag}"
        command = []


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    run = _run("prefill", "no-such-step", env={"OUT": str(tmp_path)})
    assert run.returncode == 2 and "no step 'no-such-step'" in run.stderr
    assert not list(tmp_path.iterdir())


def test_a_failing_step_is_recorded_and_the_next_one_still_runs(tmp_path):
    # tests-4bit runs pytest; on a python whose pytest cannot start, it fails, and tests-4bit runs again.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text("#!/bin/sh\nexit 3\n")
    (fake_bin / "python").chmod(0o755)
    out = tmp_path / "out"
    run = _run("tests-4bit", "tests-4bit", env={"OUT": str(out), "COMMIT": "abc123",
                                                "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
    assert run.returncode == 1
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["tests-4bit", "status=3"]] * 2
    environment = (out / "environment.txt").read_text().splitlines()
    assert environment[0].startswith("commit abc123")
    assert environment[1] == f"sources {_digest(ROOT)}"


def _digest(root: Path) -> str:
    run = subprocess.run(["bash", str(root / "benchmarks" / "device_run.sh"), "--digest"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_the_sources_digest_names_the_tree_that_ran(tmp_path):
    # A copy of the sources as the device gets them, with a cache and a log beside them.
    copy = tmp_path / "copy"
    for part in ("quamba_fx", "benchmarks", "tests"):
        shutil.copytree(ROOT / part, copy / part)
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    (copy / "quamba_fx" / "__pycache__").mkdir(exist_ok=True)
    (copy / "quamba_fx" / "__pycache__" / "stale.py").write_text("x = 1\n")
    (copy / "benchmarks" / "notes.log").write_text("not a source\n")
    digest = _digest(copy)
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert digest == _digest(ROOT)
    with open(copy / "quamba_fx" / "kernels" / "scan.py", "a") as f:
        f.write("# edited\n")
    assert _digest(copy) != digest
