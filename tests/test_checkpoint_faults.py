"""save_pretrained under faults: a writer SIGKILLed at each step of the swap, and writers racing.

Writers are forked children of the test process (torch and the graphs are already imported, so a
child costs milliseconds). A kill point is chosen with QUAMBA_FX_TEST_KILL_AT, which makes the save
SIGKILL its own process there: no `finally`, no cleanup, as in a power cut or the OOM killer.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
import warnings

import pytest
import torch

import quamba_fx
from quamba_fx import CheckpointError
from quamba_fx._atomic_dir import KILL_AT_ENV, locked, read_consistently

from .conftest import make_model, tiny_config

IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def graphs():
    """Three float graphs with different weights: what was there, what the killed save wrote, a third."""
    return [quamba_fx.capture(make_model(tiny_config(), seed=seed)) for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def logits(graphs):
    with torch.no_grad():
        return [gm(IDS) for gm in graphs]


def in_child(work, timeout=120) -> int:
    """Run `work()` in a forked child; its exit code (negative: killed by that signal)."""
    child = multiprocessing.get_context("fork").Process(target=work)
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail("the child process hung")
    return child.exitcode


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def which(path, logits) -> int:
    """Index of the graph whose logits the checkpoint at `path` reproduces bit for bit."""
    with torch.no_grad():
        out = quamba_fx.from_pretrained(path)(IDS)
    matches = [i for i, expected in enumerate(logits) if torch.equal(out, expected)]
    assert len(matches) == 1, "the loaded checkpoint is none of the saved graphs"
    return matches[0]


@pytest.mark.parametrize("point, survivor", [
    ("weights-written", 0),        # the new directory is half written: the old checkpoint stays
    ("old-moved-aside", 1),        # no checkpoint at the path: the complete new one is put there
    ("before-backup-removed", 1),  # the new checkpoint is in place, the old one lies aside
])
@pytest.mark.parametrize("next_step", ["load", "save"])
def test_a_save_killed_anywhere_is_recovered_by_the_next_load_or_save(graphs, logits, tmp_path, point, survivor, next_step):
    path = tmp_path / "ckpt"
    graphs[0].save_pretrained(path)

    def killed_save():
        os.environ[KILL_AT_ENV] = point
        graphs[1].save_pretrained(path)

    assert in_child(killed_save) == -9
    assert leftovers(tmp_path), "the kill left nothing to recover: the kill point was not reached"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if next_step == "load":
            assert which(path, logits) == survivor
        else:
            graphs[2].save_pretrained(path)
    restored = [str(w.message) for w in caught if "interrupted save" in str(w.message)]
    if point == "old-moved-aside":
        assert restored and "restored the new checkpoint it was writing" in restored[0]
    else:
        assert not restored
    assert leftovers(tmp_path) == []
    assert which(path, logits) == (survivor if next_step == "load" else 2)


def test_the_old_checkpoint_is_restored_when_the_new_one_is_incomplete(graphs, logits, tmp_path):
    """Killed between the renames, with the new directory damaged afterwards: the backup comes back."""
    path = tmp_path / "ckpt"
    graphs[0].save_pretrained(path)

    def killed_save():
        os.environ[KILL_AT_ENV] = "old-moved-aside"
        graphs[1].save_pretrained(path)

    assert in_child(killed_save) == -9
    (new,) = [p for p in tmp_path.iterdir() if ".quamba-new-" in p.name]
    (new / "model.safetensors").write_bytes(b"torn")
    with pytest.warns(RuntimeWarning, match="restored the checkpoint it was replacing"):
        assert which(path, logits) == 0
    assert leftovers(tmp_path) == []


def test_a_live_writers_directory_is_left_alone(graphs, tmp_path):
    """Recovery removes a dead writer's directory, never one a running save is still filling."""
    path = tmp_path / "ckpt"
    graphs[0].save_pretrained(path)
    context = multiprocessing.get_context("fork")
    written, go_on = context.Event(), context.Event()

    def slow_save():
        import quamba_fx.checkpoint_format as checkpoint  # where saving lives

        real_save_file = checkpoint.save_file

        def save_file_then_wait(*args, **kwargs):
            real_save_file(*args, **kwargs)
            written.set()
            go_on.wait(60)  # while the parent loads and saves

        checkpoint.save_file = save_file_then_wait
        graphs[1].save_pretrained(path)

    child = context.Process(target=slow_save)
    child.start()
    try:
        assert written.wait(60)
        (staging,) = [p for p in tmp_path.iterdir() if ".quamba-new-" in p.name]
        quamba_fx.from_pretrained(path)
        graphs[2].save_pretrained(path)
        assert staging.is_dir()
    finally:
        go_on.set()
        child.join(60)
    assert child.exitcode == 0
    assert leftovers(tmp_path) == []


def racing_writer(graphs, path, rounds, start_together, report):
    def work():
        try:
            for i in range(rounds):
                start_together.wait(60)  # each round, every writer reaches its swap at about the same time
                graphs[(os.getpid() + i) % 2].save_pretrained(path)
        except CheckpointError:
            os._exit(3)
        except BaseException:
            with open(report, "a") as handle:
                handle.write(traceback.format_exc())
            os._exit(2)
    return work


def test_racing_writers_all_succeed_and_leave_a_loadable_checkpoint(graphs, logits, tmp_path):
    context = multiprocessing.get_context("fork")
    for race in range(3):
        path, report = tmp_path / f"race{race}" / "ckpt", tmp_path / "tracebacks.txt"
        path.parent.mkdir()
        start_together = context.Barrier(3)
        writers = [context.Process(target=racing_writer(graphs, path, 8, start_together, report)) for _ in range(3)]
        for writer in writers:
            writer.start()
        if race == 0:  # a reader racing the writers never sees a missing or half-swapped checkpoint
            deadline = time.monotonic() + 60
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.001)
            assert which(path, logits) in (0, 1)
        for writer in writers:
            writer.join(120)
        assert not report.exists(), report.read_text()
        assert [w.exitcode for w in writers] == [0, 0, 0]
        assert which(path, logits) in (0, 1)
        assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_a_read_that_finds_the_directory_missing_waits_for_the_swap_and_retries(tmp_path):
    # A save between its two renames (old moved aside, new not yet in place) holds the lock; a
    # reader that finds nothing there before and after its failed read must wait for it, not fail.
    target = tmp_path / "ckpt"
    holding, release = threading.Event(), threading.Event()

    def saver() -> None:
        with locked(target):
            holding.set()
            release.wait(10)
            target.mkdir()

    def read() -> str:
        release.set()  # the swap completes only after this read has failed
        if not target.is_dir():
            raise CheckpointError(f"{target} is not a directory written by save_pretrained")
        return "read"

    thread = threading.Thread(target=saver)
    thread.start()
    assert holding.wait(10)
    try:
        assert read_consistently(target, read) == "read"
    finally:
        release.set()
        thread.join(10)


def test_a_read_of_a_directory_that_never_appears_still_fails(tmp_path):
    def read() -> str:
        raise CheckpointError("not a directory written by save_pretrained")

    with pytest.raises(CheckpointError):
        read_consistently(tmp_path / "absent", read)
