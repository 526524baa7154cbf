"""Replace a directory atomically under a lock, and put things right after a save that was killed.

A save of `NAME` fills a hidden sibling `.NAME.quamba-new-PID-RANDOM`, then, holding an exclusive
`flock` on `.NAME.quamba-lock`, renames the previous `NAME` aside to `.NAME.quamba-old-PID-RANDOM`,
renames the new directory to `NAME` and removes the old one. A process killed at any instant leaves
at most those siblings behind. Whoever next takes the lock for `NAME` (a save, or a load that sees
leftovers) removes them, and when `NAME` itself is missing (killed between the two renames) first
renames the newest complete one back to `NAME`.

A writer holds an `flock` on its own new directory while it fills it (outside the lock, which is
only held for the short swap), so recovery tells a live writer's directory from a dead one's
without trusting process ids. The lock file is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, TypeVar

KILL_AT_ENV = "QUAMBA_FX_TEST_KILL_AT"
_TAG = "quamba"
T = TypeVar("T")


def crash_point(name: str) -> None:
    """Die here as abruptly as a power cut when the fault tests ask for it (`QUAMBA_FX_TEST_KILL_AT=name`)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{_TAG}-lock")


def _leftover_pattern(target: Path) -> re.Pattern[str]:
    # The random part is mkdtemp's alphabet or hex; a dot can't occur after the pid, so another
    # target's leftovers (`.NAME.quamba-new-1.quamba-new-...`) never match.
    return re.compile(rf"\.{re.escape(target.name)}\.{_TAG}-(new|old)-\d+-[0-9a-z_]+")


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold the exclusive lock of `target` (an `flock` on its hidden lock file beside it)."""
    path = lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder before us may have removed the file while we waited on it: lock anew.
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _leftovers(target: Path) -> list[tuple[str, Path]]:
    """(`new` or `old`, path) of every leftover directory of `target`'s saves."""
    pattern = _leftover_pattern(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [(match.group(1), target.parent / name) for name in names if (match := pattern.fullmatch(name))]


def _claim_abandoned(directory: Path) -> int | None:
    """Lock a new directory whose writer is gone and return the fd keeping it locked; None if one is alive."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _newest_mtime(directory: Path) -> int:
    try:
        return max((entry.stat().st_mtime_ns for entry in os.scandir(directory)), default=0)
    except OSError:
        return 0


def recover(target: Path, is_complete: Callable[[Path], bool]) -> None:
    """With `target`'s lock held: restore an interrupted swap, then remove abandoned leftovers.

    Old directories only exist inside a swap, which holds the lock, so every one found here is
    abandoned; a new directory is abandoned when no live writer holds its `flock`.
    """
    claimed: list[tuple[str, Path, int | None]] = []
    try:
        for kind, directory in _leftovers(target):
            fd = _claim_abandoned(directory) if kind == "new" else None
            if kind == "old" or fd is not None:
                claimed.append((kind, directory, fd))
        if not os.path.lexists(target):
            complete = [(kind, d) for kind, d, _ in claimed if is_complete(d)]
            if complete:
                kind, chosen = max(complete, key=lambda c: (_newest_mtime(c[1]), c[0] == "new"))
                os.rename(chosen, target)
                what = "the new checkpoint it was writing" if kind == "new" else "the checkpoint it was replacing"
                warnings.warn(
                    f"{target} was missing after an interrupted save; restored {what} from {chosen.name}",
                    RuntimeWarning, stacklevel=3,
                )
        for _, directory, _ in claimed:
            if os.path.lexists(directory):
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        for _, _, fd in claimed:
            if fd is not None:
                os.close(fd)


def recover_if_needed(target: Path, is_complete: Callable[[Path], bool]) -> None:
    """`recover` for readers: takes the lock only when `target` is missing (maybe mid-swap) or
    leftovers (or a stale lock file) are there.

    A place we can't write to (a read-only mount) can't be repaired: it is then read as it is.
    """
    if os.path.lexists(target) and not _leftovers(target) and not os.path.lexists(lock_path(target)):
        return
    try:
        with locked(target):
            recover(target, is_complete)
    except OSError:
        pass


def read_consistently(target: Path, read: Callable[[], T], attempts: int = 3) -> T:
    """`read()` the directory `target` without a lock, again if a save swapped it in the meantime.

    Saves replace the directory, never a file in it, so the same directory before and after means
    every file came from one checkpoint. A failed read is retried only if a swap explains it: the
    directory changed, or it is missing (a save between its two renames: the retry waits for it).
    """
    for _ in range(attempts):
        before = _identity(target)
        try:
            result = read()
        except Exception:
            after = _identity(target)
            if after == before and after is not None:
                raise
            if after is None:  # missing: maybe a save between its two renames, which hold the lock
                _wait_for_swap(target)
            continue
        if _identity(target) == before:
            return result
    return read()


def _wait_for_swap(target: Path) -> None:
    """Return once no save is swapping `target` (a save holds the lock for its swap only)."""
    try:
        with locked(target):
            pass
    except OSError:  # a place we can't write a lock file to: nobody can save there either
        pass


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`, moving an existing `target` aside first; the lock is held."""
    backup = None
    if os.path.lexists(target):
        backup = target.with_name(f".{target.name}.{_TAG}-old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, backup)
        crash_point("old-moved-aside")
    try:
        os.rename(staging, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    _fsync(target.parent)
    crash_point("before-backup-removed")
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def replacing(
    target: Path, check_replaceable: Callable[[Path], None], is_complete: Callable[[Path], bool]
) -> Iterator[Path]:
    """Yield an empty hidden directory to fill; when the block ends normally it becomes `target`.

    `check_replaceable(target)` runs under the lock before the directory is made and again just
    before the swap, and raises to refuse. If anything fails, the new directory is removed and
    `target` is as it was. Raises `OSError` when the parent directory can't be written.
    """
    with locked(target):
        recover(target, is_complete)
        check_replaceable(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_TAG}-new-{os.getpid()}-", dir=target.parent))
        try:
            writer_fd = os.open(staging, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(writer_fd, fcntl.LOCK_EX)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    try:
        yield staging
        for entry in os.scandir(staging):
            _fsync(Path(entry.path))
        _fsync(staging)
        with locked(target):
            check_replaceable(target)
            _swap(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(writer_fd)
