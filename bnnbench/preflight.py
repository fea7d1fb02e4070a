"""Up-front checks of the paths a command will write, made before any work starts.

Each failure is one :class:`~bnnbench.errors.PathError` naming the option, the path and the fix,
so that a read-only or full results folder is refused at once, not after an epoch of training.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import PathError

PROBE_BYTES = 1 << 16  # written and synced once: a full disk refuses it
# what the environment, not bnnbench, refuses: told in one line (environment_problem), not as a traceback
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def _reason(exc: OSError) -> str:
    """Why an OS call failed, in a few words."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (free some space)"
    return (exc.strerror or str(exc)).lower()


def environment_problem(exc: OSError) -> str | None:
    """One line for an OS error the environment caused (full disk, read-only or forbidden path), else None."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" {str(exc.filename)!r}" if exc.filename else ""
    return f"cannot write{where}: {_reason(exc)}; fix that or pass another folder"


def writable_folder(path: str | os.PathLike[str], option: str, fix: str = "pass a folder you can write to") -> Path:
    """``path`` as a folder this process can write files into (made when missing), else :class:`PathError`
    naming ``option``, the path and ``fix``."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise PathError(f"{option} {str(path)!r} is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise PathError(f"cannot write into {option} {str(path)!r}: {_reason(exc)}; {fix}") from None
    return path


def writable_file(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a file this process can write (its folder checked by :func:`writable_folder`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PathError(f"{option} {str(path)!r} is a folder; pass the path of a file, e.g. {path / 'model.pt'}")
    writable_folder(path.parent, f"the folder of {option}")
    return path
