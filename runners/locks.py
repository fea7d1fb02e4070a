"""One trainer per run: a lock file per run signature, shared by every process that trains into
one results folder (several ``bnnbench table`` commands, local workers, Slurm jobs), and one per
run directory, held by whichever process trains into it.

The lock of a run with signature ``key`` (:meth:`RunSpec.key`) is ``OUT/locks/<sha256>.lock``,
held with ``filelock.FileLock`` (an ``flock`` on Linux: released by the kernel when its process
dies, and honoured across the nodes of a cluster file system that supports it, such as NFSv4
or Lustre mounted with ``flock``).  ``OUT/runs/`` keeps holding run directories only, since
everything that reads results scans it.  The lock files stay (0 bytes each): deleting a lock
file another process is waiting on would let two processes hold "the" lock at once.

The lock of a run directory is ``RUN_DIR/.lock`` (:func:`hold_run_directory`), taken by every
process that trains into it, fresh or resumed, and never waited for: ``bnnbench run --resume`` of
a directory another process trains stops with :class:`RunBusy`, and ``bnnbench table`` leaves
such a run to its owner.  It lives in the directory so that it follows the run when the
directory is moved or copied.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_FOLDER = "locks"
RUN_DIRECTORY_LOCK = ".lock"


def lock_path(out: str | Path, key: str) -> Path:
    """Where the lock of the run with signature ``key`` under results root ``out`` lives."""
    return Path(out) / LOCK_FOLDER / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock"


@contextmanager
def run_lock(out: str | Path, key: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of run ``key`` for the block; if another process holds it, say so and wait."""
    path = lock_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if log is not None:
            log(f"    waiting: another process is training this run (lock {path})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class RunBusy(ValueError):
    """Another process holds the lock of a run directory (it is training there)."""


def hold_run_directory(path: str | Path) -> FileLock:
    """The lock of run directory ``path``, now held by this process (release it when done);
    :class:`RunBusy` at once when another process holds it."""
    lock = FileLock(Path(path) / RUN_DIRECTORY_LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunBusy(
            f"run directory {path} is in use: another process is training it (it holds {lock.lock_file}); "
            f"wait until that process ends, or stop it, then continue with bnnbench run --resume {path}"
        ) from None
    return lock


def held_elsewhere(lock_file: str | Path) -> bool:
    """Whether another process holds ``lock_file`` (a run's :func:`lock_path` or its directory's
    :data:`RUN_DIRECTORY_LOCK`) now.

    Creates or changes nothing (``bnnbench table --dry-run`` writes nothing): a missing file was
    never locked; an existing one is opened read-only and tried with a non-blocking ``flock``, the
    lock ``filelock`` takes on Unix.  Always False where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock the probe took
    return False


__all__ = ["LOCK_FOLDER", "RUN_DIRECTORY_LOCK", "RunBusy", "held_elsewhere", "hold_run_directory", "lock_path", "run_lock"]
