"""The on-disk cache: where it lives, md5 keys, atomic writes.

The cache root is ``$BNNBENCH_CACHE`` when set, else ``~/.cache/bnnbench``.  Everything
written there goes to a temporary name first and is renamed into place, so an
interrupted build never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..io import temporary_directory
from ..preflight import writable_folder


CACHE_ENV = "BNNBENCH_CACHE"

# md5 of archives we know, with the note that must travel with every number measured on them
KNOWN_ARCHIVES: dict[str, str] = {
    "63ef9f0d0f37ee9d39df1f47bfeb8eb8": "CIFAR-10 (JPEG q75 copy)",
}


def cache_root() -> Path:
    """The cache directory (``$BNNBENCH_CACHE`` or ``~/.cache/bnnbench``); not created here."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bnnbench"


def writable_cache(entry: Path) -> None:
    """Refuse in one line, before any work, a cache entry whose folder cannot be written."""
    writable_folder(entry.parent, "the bnnbench cache folder", f"set {CACHE_ENV} to a folder you can write to")


def file_md5(path: Path, chunk: int = 1 << 22) -> str:
    """md5 hex digest of a file, read in 4 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``; rename it to ``target`` on success.

    If ``target`` appeared meanwhile (another process built the same entry), ours is dropped.
    On an exception the temporary folder is removed and ``target`` is left untouched.
    """
    writable_cache(target)
    tmp = temporary_directory(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` (call inside :func:`atomic_directory` or on a temporary path)."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
