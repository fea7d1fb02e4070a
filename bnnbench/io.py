"""Atomic files: write to a temporary file in the same folder, fsync, then rename over the target.

A killed process leaves either the old or the new version of a file, never half of one.
Every file bnnbench writes (run directories, caches, packed models, tables, figures) goes
through :func:`atomic_write`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a binary temporary file next to ``path``, then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
