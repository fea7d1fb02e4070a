"""Atomic files: write to a temporary file in the same folder, fsync, then rename over the target.

A killed process leaves either the old or the new version of a file, never half of one (and
perhaps a ``.<name>.<random>.tmp`` file, which :func:`remove_stale_temporaries` clears).
Every file bnnbench writes (run directories, caches, packed models, tables, figures) goes
through :func:`atomic_write`.  Temporary files and folders are created with modes 0o666 and
0o777 less the umask, as ``open`` and ``mkdir`` make them (not ``tempfile``'s 0o600 and 0o700):
a results folder or cache shared with a group stays readable to it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable

TMP_SUFFIX = ".tmp"  # atomic_write's temporary files are .<name>.<random>.tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a binary temporary file next to ``path``, then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _unique(path.parent, f".{path.name}.", TMP_SUFFIX, lambda name: os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_directory(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new empty folder ``<parent>/<prefix><random>`` (mode 0o777 less the umask), for building an entry to rename into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _, path = _unique(parent, prefix, "", lambda name: os.mkdir(name, 0o777))
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when its process was killed.

    Only call this while no other process writes into ``folder`` (a run directory under its lock).
    """
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _unique(parent: Path, prefix: str, suffix: str, make: Callable[[str], Any]) -> tuple[Any, str]:
    """``make(name)`` on a new random name in ``parent`` (retried while the name exists); its result and the name."""
    while True:
        name = str(parent / f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            return make(name), name
        except FileExistsError:
            continue


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Indented JSON (objects that JSON cannot hold are written as strings)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def read_torch(path: str | os.PathLike[str], what: str, how_to_make: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: nothing in the file is unpickled as code.

    A missing or unreadable file is a clear error naming ``what`` it should have been.
    """
    import torch  # the only module here that needs torch

    path = Path(path)
    fix = f"; {how_to_make}" if how_to_make else ""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{fix}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty (0 bytes), not a bnnbench {what}{fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    except Exception:  # noqa: BLE001 -- torch's text may advise weights_only=False, which runs the file's code: never relay it
        raise ValueError(
            f"{str(path)!r} is not a bnnbench {what}: it is damaged or of another kind, or it holds Python objects, "
            f"which bnnbench never unpickles (it reads tensors and plain values only){fix}"
        ) from None
